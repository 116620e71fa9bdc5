"""Small VGG-style CIFAR net: conv-BN-ReLU blocks, max-pooling, Linear-BN1d-ReLU classifier."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGGCifar", "vgg_cifar"]

# Channels per conv layer; "M" is a 2x2 max-pool.
SMALL_CONFIG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class VGGCifar(nn.Module):
    """VGG-style features for 32x32 inputs and a classifier with a BatchNorm1d between Linears."""

    def __init__(
        self, num_classes: int = 10, config: tuple[int | str, ...] = SMALL_CONFIG, hidden: int = 256
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = 3, 32
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                cout = int(item)
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
                layers.append(nn.ReLU(inplace=True))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(cin * size * size, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg_cifar(num_classes: int = 10) -> VGGCifar:
    """Small VGG for CIFAR-10 (about 0.8M parameters)."""
    return VGGCifar(num_classes)
