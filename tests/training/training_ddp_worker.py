"""Run by test_training_ddp.py under ``python -m torch.distributed.run --nproc_per_node 2``.

Also imported by the test for the shared toy problem (`toy_data`, `toy_model`, `config`).
Usage: python training_ddp_worker.py OUT_DIR CHECKPOINT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onnxcomp.training import trainer
from onnxcomp.training.data import TrainingData


def toy_data(count: int = 48) -> TrainingData:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=count)
    centres = np.array([[2.0, 0.0, 0.0, 1.0], [0.0, 2.0, 1.0, 0.0], [-2.0, -1.0, 0.0, 0.0]])
    x = centres[labels] + 0.5 * rng.standard_normal((count, 4))
    return TrainingData({"x": x.astype(np.float32)}, labels.astype(np.int64), "toy")


def toy_model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def ce_objective(outputs, teacher_outputs, labels):
    loss = nn.functional.cross_entropy(outputs["logits"], labels)
    return loss, {"ce": float(loss.detach())}


def config(checkpoint_dir: Path | None) -> trainer.TrainConfig:
    return trainer.TrainConfig(
        epochs=2, lr=0.2, batch_size=8, device="cpu", seed=5, checkpoint_dir=checkpoint_dir,
        num_threads=1, augment=False, weight_decay=1e-3,
    )  # fmt: skip


def run(out: Path, checkpoints: Path) -> None:
    """Train the toy model in this process (rank from the environment); save what it ended with."""
    rank = int(os.environ["RANK"])
    saves = []
    original = trainer.atomic_save

    def counting_save(state, path):
        saves.append(str(path))
        original(state, path)

    trainer.atomic_save = counting_save
    model = toy_model()
    result = trainer.train(model, ce_objective, toy_data(), config(checkpoints))
    torch.save(
        {"state": result.last_state, "saves": saves, "loss": [s.loss for s in result.history]},
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]))
