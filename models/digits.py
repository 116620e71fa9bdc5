"""Tiny CNN for scikit-learn's 8x8 digits: the embedded example of ``make demo``.

scikit-learn (``pip install onnxcomp[demo]``) is imported lazily; the data ships with it.
Inputs are ``(N, 1, 8, 8)`` float32 pixels scaled to [0, 1] (raw value / 16).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["DigitsCNN", "load_digits_arrays", "train_digits_model"]


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x2, 2x2 max-pool, Linear-BN1d-ReLU, Linear (about 22k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(32 * 4 * 4, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(inplace=True),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_digits_arrays(
    seed: int = 0, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)``: x float32 (N, 1, 8, 8) in [0, 1], y int64.

    The split is stratified per class and fixed by ``seed``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits example needs scikit-learn: pip install onnxcomp[demo]"
        ) from exc
    data = load_digits()
    x = (np.asarray(data.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(data.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test_idx.append(idx[: round(len(idx) * test_fraction)])
    test = np.zeros(len(y), dtype=bool)
    test[np.concatenate(test_idx)] = True
    return x[~test], y[~test], x[test], y[test]


def train_on_arrays(
    x: np.ndarray, y: np.ndarray, epochs: int = 15, seed: int = 0, batch_size: int = 64
) -> DigitsCNN:
    """Train a fresh :class:`DigitsCNN` with Adam on the given arrays; returns it in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN(int(y.max()) + 1 if len(y) else 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm1d needs more than one sample in training mode
                continue
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def train_digits_model(epochs: int = 15, seed: int = 0) -> tuple[DigitsCNN, np.ndarray, np.ndarray]:
    """Train :class:`DigitsCNN` on sklearn digits (a few seconds on CPU, >90% test accuracy).

    Returns ``(model in eval mode, x_test, y_test)``.
    """
    x_train, y_train, x_test, y_test = load_digits_arrays(seed)
    model = train_on_arrays(x_train, y_train, epochs=epochs, seed=seed)
    return model, x_test, y_test
