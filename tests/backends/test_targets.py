"""The deployment targets: what each wants from an int8 model."""

from __future__ import annotations

import pytest

from onnxcomp.backends.registry import BACKENDS
from onnxcomp.backends.targets import ACTIVATION_TYPES, TARGETS, Target, get_target, targets_help
from onnxcomp.errors import OptionError


def test_each_target_says_what_its_kernels_want():
    assert set(TARGETS) == {"x86", "arm", "tensorrt"}
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
    with pytest.raises(OptionError, match="--target gpu: choose one of x86, arm, tensorrt"):
        get_target("gpu")


def test_help_lists_every_target_with_its_scheme():
    assert targets_help() == "Hardware: x86 (U8S8), arm (U8S8), tensorrt (S8S8)."
