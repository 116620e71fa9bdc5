"""The deployment targets: what each wants from an int8 model."""

from __future__ import annotations

import pytest

from onnxcomp.backends.registry import BACKENDS
from onnxcomp.backends.targets import (
    ACTIVATION_TYPES,
    TARGETS,
    Target,
    get_target,
    resolve_reduce_range,
    targets_help,
)
from onnxcomp.errors import OptionError


def test_each_target_says_what_its_kernels_want():
    assert set(TARGETS) == {"x86", "x86-vnni", "x86-avx2", "arm", "tensorrt"}
    x86, arm, trt = TARGETS["x86"], TARGETS["arm"], TARGETS["tensorrt"]
    # ONNX Runtime on CPUs: uint8 activations (asymmetric) with int8 weights, U8S8
    assert (x86.activation_type, x86.symmetric_activations, x86.scheme) == ("uint8", False, "U8S8")
    assert (arm.activation_type, arm.symmetric_activations) == ("uint8", False)
    # TensorRT: symmetric int8 activations, S8S8, on its execution provider
    assert (trt.activation_type, trt.symmetric_activations, trt.scheme) == ("int8", True, "S8S8")
    assert trt.provider == "tensorrt" and x86.provider == arm.provider == "cpu"
    # AVX-512 NCHWc convolutions work on 16-channel blocks
    assert x86.channel_multiple == 16
    for target in TARGETS.values():
        assert isinstance(target, Target) and target.name in TARGETS
        assert target.activation_type in ACTIVATION_TYPES
        assert target.per_channel_weights
        assert target.channel_multiple >= 1
        assert target.backend in BACKENDS


def test_unknown_target_is_an_option_error():
    assert get_target("arm") is TARGETS["arm"]
    with pytest.raises(
        OptionError, match="--target gpu: choose one of x86, x86-vnni, x86-avx2, arm, tensorrt"
    ):
        get_target("gpu")


def test_help_lists_every_target_with_its_scheme():
    assert targets_help() == (
        "Hardware: x86 (U8S8), x86-vnni (U8S8), x86-avx2 (U8S8), arm (U8S8), tensorrt (S8S8)."
    )


@pytest.mark.parametrize(
    ("flags", "machine", "reduce"),
    [
        ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),
        ({"avx2", "avx_vnni"}, "x86_64", False),
        ({"avx", "avx2"}, "x86_64", True),  # AVX2 only: U8S8 saturates with 8-bit weights
        (set(), "x86_64", True),  # unknown features: the safe choice
        ({"asimd"}, "aarch64", False),
    ],
)
def test_x86_decides_the_weight_bits_from_the_cpu(flags, machine, reduce, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: machine)
    chosen, reason = resolve_reduce_range(TARGETS["x86"], frozenset(flags))
    assert chosen is reduce
    assert ("7-bit" in reason) is reduce


def test_explicit_x86_targets_ignore_the_cpu():
    assert resolve_reduce_range(TARGETS["x86-vnni"], frozenset()) == (False, "--target x86-vnni")
    assert resolve_reduce_range(TARGETS["x86-avx2"], frozenset({"avx512_vnni"}))[0] is True
    assert resolve_reduce_range(TARGETS["tensorrt"], frozenset())[0] is False
