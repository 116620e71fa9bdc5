"""Registry of reference models and their ONNX export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from models import torchvision_style as tv
from models.digits import DigitsCNN
from models.mobilenetv2_cifar import mobilenetv2_cifar
from models.resnet_cifar import load_pretrained, resnet20, resnet56
from models.vgg_cifar import vgg_cifar
from onnxcomp.export import export_torch

__all__ = [
    "MODELS",
    "PRETRAINED",
    "build",
    "calibrate_batchnorm",
    "export_reference",
    "input_shape",
]

MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "mobilenetv2_cifar": mobilenetv2_cifar,
    "vgg_cifar": vgg_cifar,
    "resnet18": tv.resnet18,
    "mobilenet_v2": tv.mobilenet_v2,
    "mobilenet_v3_small": tv.mobilenet_v3_small,
    "efficientnet_b0": tv.efficientnet_b0,
    "shufflenet_v2_x0_5": tv.shufflenet_v2_x0_5,
    "digits_cnn": DigitsCNN,
}

# Models with real weights in shared/data/pretrained: name -> depth for load_pretrained.
PRETRAINED: dict[str, int] = {"resnet20": 20, "resnet56": 56}

_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (1, 3, 64, 64),
    "mobilenet_v2": (1, 3, 64, 64),
    "mobilenet_v3_small": (1, 3, 64, 64),
    "efficientnet_b0": (1, 3, 64, 64),
    "shufflenet_v2_x0_5": (1, 3, 64, 64),
    "digits_cnn": (1, 1, 8, 8),
}


def input_shape(name: str) -> tuple[int, int, int, int]:
    """NCHW input shape (batch 1) used to run and export model ``name``."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return _SHAPES.get(name, (1, 3, 32, 32))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Give a randomly initialised model non-trivial BatchNorm parameters and statistics.

    Affine weights/biases are randomised, then running statistics are measured on random inputs,
    so folding BatchNorm is a real computation and activations stay well scaled.
    Returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) * 1.0 + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.2)
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    for _ in range(2):
        model(torch.randn((8, *shape[1:]), generator=gen))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    return model.eval()


def build(name: str, pretrained_dir: Path | None = None, seed: int = 0) -> nn.Module:
    """Build model ``name`` in eval mode.

    With ``pretrained_dir`` (the shared data folder holding ``pretrained/``, or that folder itself)
    models in :data:`PRETRAINED` get real weights; otherwise a seeded random init with
    randomised BatchNorm affine parameters and calibrated running statistics.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if pretrained_dir is not None and name in PRETRAINED:
        return load_pretrained(PRETRAINED[name], pretrained_dir)
    torch.manual_seed(seed)
    return calibrate_batchnorm(MODELS[name](), input_shape(name), seed)


def export_reference(
    name: str, path: Path, keep_batchnorm: bool, pretrained_dir: Path | None = None
) -> Path:
    """Build model ``name`` (see :func:`build`) and export it to ONNX at ``path``."""
    model = build(name, pretrained_dir)
    return export_torch(model, path, input_shape=input_shape(name), keep_batchnorm=keep_batchnorm)
