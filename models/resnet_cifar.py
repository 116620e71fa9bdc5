"""CIFAR ResNet of He et al. (2016), option-A shortcuts, as in akamaster/pytorch_resnet_cifar10.

Matches the checkpoints in ``shared/data/pretrained`` (``resnet20.th``, ``resnet56.th``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNetCifar", "load_pretrained", "resnet20", "resnet56"]


class PadShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2 and zero-pad channels."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stages of 16, 32, 64 channels, then Linear(64, classes)."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> ResNetCifar:
    """ResNet-20 (0.27M parameters)."""
    return ResNetCifar(3, num_classes)


def resnet56(num_classes: int = 10) -> ResNetCifar:
    """ResNet-56 (0.85M parameters)."""
    return ResNetCifar(9, num_classes)


def load_pretrained(depth: int, data_dir: Path) -> nn.Module:
    """Load ``data_dir/pretrained/resnet{depth}.th`` (20 or 56) strictly; returns the eval model.

    ``data_dir`` is the shared data folder (the one holding ``pretrained/``); the folder
    ``pretrained`` itself is accepted too.
    """
    builders = {20: resnet20, 56: resnet56}
    if depth not in builders:
        raise ValueError(f"no pretrained CIFAR ResNet-{depth}: choose 20 or 56")
    data_dir = Path(data_dir)
    path = data_dir / "pretrained" / f"resnet{depth}.th"
    if not path.is_file() and (data_dir / f"resnet{depth}.th").is_file():
        path = data_dir / f"resnet{depth}.th"
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    model = builders[depth]()
    # The checkpoints predate num_batches_tracked; BatchNorm fills it in, every other key is strict.
    model.load_state_dict(state, strict=True)
    return model.eval()
