"""What each deployment target wants from an int8 model (``--target``).

A :class:`Target` says which runtime runs the model and how its int8 kernels like their
inputs: activation type (uint8 activations are quantized asymmetric, int8 symmetric, as ONNX
Runtime's quantizer does), per-channel weights, and the channel multiple its kernels prefer
(pruning that keeps channel counts in that multiple gets the most speed for the MACs removed).
``QuantizeConfig`` resolves ``--target`` here; a new target is one entry in :data:`TARGETS`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
            # uint8 activations with int8 weights (U8S8) run on VNNI kernels; ONNX Runtime's
            # AVX-512 NCHWc convolutions work on blocks of 16 channels.
            "ONNX Runtime on x86 CPUs (U8S8, VNNI)",
            activation_type="uint8",
            per_channel_weights=True,
            channel_multiple=16,
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


def get_target(name: str) -> Target:
    """The target called ``name``, or a one-line OptionError listing the known ones."""
    if name not in TARGETS:
        raise OptionError(f"--target {name}: choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def targets_help() -> str:
    """One line for ``--target``'s help: every target and its scheme."""
    return "Hardware: " + ", ".join(f"{t.name} ({t.scheme})" for t in TARGETS.values()) + "."
