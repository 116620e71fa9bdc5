"""What each deployment target wants from an int8 model (``--target``).

A :class:`Target` says which runtime runs the model and how its int8 kernels like their
inputs: activation type (uint8 activations are quantized asymmetric, int8 symmetric, as ONNX
Runtime's quantizer does), per-channel weights, and the channel multiple its kernels prefer
(pruning that keeps channel counts in that multiple gets the most speed for the MACs removed).
``QuantizeConfig`` resolves ``--target`` here; a new target is one entry in :data:`TARGETS`.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from onnxcomp.errors import OptionError

ACTIVATION_TYPES = ("uint8", "int8")


@dataclass(frozen=True)
class Target:
    """One deployment target and the int8 scheme its kernels run fastest."""

    name: str
    description: str
    activation_type: str  # "uint8" (asymmetric) or "int8" (symmetric)
    per_channel_weights: bool
    channel_multiple: int
    backend: str = "onnxruntime"
    provider: str = "cpu"
    # 7-bit weights: ONNX Runtime's x86 U8S8 kernels without VNNI (AVX2, AVX-512F) add pairs
    # of u8 x s8 products in int16 (vpmaddubsw) and saturate; None: decided from this CPU.
    reduce_range: bool | None = False

    @property
    def symmetric_activations(self) -> bool:
        """int8 activations are symmetric (zero point 0), uint8 ones asymmetric."""
        return self.activation_type == "int8"

    @property
    def scheme(self) -> str:
        """ORT's name of the activation x weight types: U8S8 or S8S8."""
        return "U8S8" if self.activation_type == "uint8" else "S8S8"


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            "x86",
            # uint8 activations with int8 weights (U8S8), ONNX Runtime's fastest x86 scheme;
            # 8-bit weights where this CPU has VNNI, 7-bit ones where it has not.
            "ONNX Runtime on this x86 CPU (U8S8; 7-bit weights without VNNI)",
            activation_type="uint8",
            per_channel_weights=True,
            channel_multiple=16,
            reduce_range=None,
        ),
        Target(
            "x86-vnni",
            # VNNI adds u8 x s8 products in int32: full 8-bit weights. ONNX Runtime's AVX-512
            # NCHWc convolutions work on blocks of 16 channels.
            "ONNX Runtime on x86 CPUs with VNNI (U8S8)",
            activation_type="uint8",
            per_channel_weights=True,
            channel_multiple=16,
        ),
        Target(
            "x86-avx2",
            # Measured on an AVX2-only AMD EPYC, CIFAR ResNet-20: U8S8 with 8-bit weights kept
            # 92.5 % top-1 agreement with fp32, 7-bit weights 98.1 % (same kernels).
            "ONNX Runtime on x86 CPUs without VNNI (U8S8, 7-bit weights)",
            activation_type="uint8",
            per_channel_weights=True,
            channel_multiple=8,
            reduce_range=True,
        ),
        Target(
            "arm",
            "ONNX Runtime on ARM CPUs (U8S8)",
            activation_type="uint8",
            per_channel_weights=True,
            channel_multiple=8,
        ),
        Target(
            "tensorrt",
            # TensorRT and most NPUs: symmetric int8 activations; int8 Tensor Cores want
            # channel counts in multiples of 16.
            "TensorRT and NPUs (S8S8, symmetric activations)",
            activation_type="int8",
            per_channel_weights=True,
            channel_multiple=16,
            provider="tensorrt",
        ),
    )
}


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def resolve_reduce_range(target: Target, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """Whether to quantize weights to 7 bits for ``target``, and why (for the report).

    A target that leaves it to the CPU gets 8-bit weights only where this CPU has VNNI; on
    other machines (and where the flags cannot be read) 7-bit weights, which are safe
    everywhere: a model made here for a VNNI server loses a little weight precision, never
    the saturation of 8-bit weights on AVX2.
    """
    if target.reduce_range is not None:
        return target.reduce_range, f"--target {target.name}"
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return False, f"not an x86 CPU ({machine})"
    found = cpu_flags() if flags is None else flags
    vnni = sorted(found & VNNI_FLAGS)
    if vnni:
        return False, f"this CPU has {vnni[0]}"
    reason = "this CPU has no VNNI" if found else "this CPU's features are unknown"
    return True, f"{reason}: 7-bit weights (--target x86-vnni for 8-bit)"


def get_target(name: str) -> Target:
    """The target called ``name``, or a one-line OptionError listing the known ones."""
    if name not in TARGETS:
        raise OptionError(f"--target {name}: choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def targets_help() -> str:
    """One line for ``--target``'s help: every target and its scheme."""
    return "Hardware: " + ", ".join(f"{t.name} ({t.scheme})" for t in TARGETS.values()) + "."
