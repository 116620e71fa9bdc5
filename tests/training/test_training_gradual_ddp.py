"""Gradual pruning (onnxcomp/training/gradual.py, rule 5) under DDP: 2 forked gloo processes.

Each rank trains the same small CNN on its own shard of every global batch with the pruner's
``on_step`` as `finetune --sparsity` drives it. Two students:

* plain (no re-inserted BatchNorm): DDP all-reduces the gradients, so the weights, hence the
  masks, are the same on both ranks anyway, and equal those of a 1-process run with the same
  global batch;
* with re-inserted BatchNorm (as the job trains a folded Conv): the ranking reads
  ``gamma / sqrt(running_var + eps)`` and the running statistics are per process (each rank's
  last forward saw only its shard; DDP broadcasts buffers at the start of a forward, not after
  the step), so only rank 0's masks, broadcast after each update, keep the ranks equal. No
  1-process comparison here: a train-mode BatchNorm normalises each rank's half batch with its
  own batch statistics, so the gradients differ from one process normalising the whole batch.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
from int8_models import small_cnn  # noqa: E402
from torch import nn  # noqa: E402

from onnxcomp.training.data import TrainingData  # noqa: E402
from onnxcomp.training.gradual import GradualConfig, attach_gradual_pruning  # noqa: E402
from onnxcomp.training.importer import import_onnx  # noqa: E402
from onnxcomp.training.reparam import reinsert_batchnorm, weight_scales  # noqa: E402
from onnxcomp.training.trainer import TrainConfig, train  # noqa: E402

SPARSITY = 0.6
PRUNED = ("w2", "wf")  # small_cnn's conv1 is the first layer, left dense


def toy_data(count: int = 64) -> TrainingData:
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1, (count, 3, 8, 8)).astype(np.float32)
    x[count // 2 :] = 3.0 * x[count // 2 :] + 1.0  # heterogeneous: per-shard statistics differ
    labels = rng.integers(0, 10, size=count).astype(np.int64)
    return TrainingData({"input": x}, labels, "toy")


def ce_objective(outputs, teacher_outputs, labels):
    loss = nn.functional.cross_entropy(outputs["logits"], labels)
    return loss, {"ce": float(loss.detach())}


def config() -> TrainConfig:
    # 64 samples, global batch 16: 8 steps; ramp 1.0, 4 updates: masks at steps 2, 4, 6, 8
    return TrainConfig(
        epochs=2, lr=0.05, batch_size=16, device="cpu", seed=5, num_threads=1, augment=False,
    )  # fmt: skip


def pruned_student(data: TrainingData, reinsert: bool) -> dict:
    """Train small_cnn with gradual pruning as the job does (masks attached before the
    re-insertion, scales from it); the masks, weights and sparsity it ends with."""
    model = ir.from_proto(small_cnn(seed=1))
    module = import_onnx(model)
    gradual = GradualConfig(SPARSITY, "layer", ramp=1.0, updates=4)
    pruner, _ = attach_gradual_pruning(module, model, gradual, lambda: weight_scales(module))
    if reinsert:
        feeds = [batch.inputs for batch in data.batches(32, shuffle=False)]  # as the job does
        assert reinsert_batchnorm(module, feeds)
    train(module, ce_objective, data, config(), on_step=pruner.on_step)
    return {
        "masks": [pruner.mask(i).clone() for i in range(len(pruner.weights))],
        "weights": {
            n: p.detach().clone() for n, p in zip(pruner.names, pruner.weights, strict=True)
        },
        "fractions": pruner.fractions(),
    }


def _forked_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    try:
        data = toy_data()
        runs = {flag: pruned_student(data, flag) for flag in (False, True)}
    finally:
        dist.destroy_process_group()
    torch.save(runs, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gradual_ddp")
    args = (_free_port(), str(out))
    torch.multiprocessing.start_processes(_forked_worker, args, nprocs=2, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _check_ranks_agree(rank0: dict, rank1: dict) -> None:
    for i, (m0, m1) in enumerate(zip(rank0["masks"], rank1["masks"], strict=True)):
        assert torch.equal(m0, m1), f"mask {i} differs between the ranks"
    for name in PRUNED:
        w0, w1 = rank0["weights"][name], rank1["weights"][name]
        assert torch.equal(w0 == 0, w1 == 0), f"{name}: zero sets differ between the ranks"
        torch.testing.assert_close(w0, w1, rtol=1e-5, atol=1e-6)
        assert torch.equal(w0 == 0, rank0["masks"][PRUNED.index(name)] == 0), name
        zeros = int((w0 == 0).sum())
        assert zeros == round(SPARSITY * w0.numel()), name  # layer scope: exactly S each
    assert rank0["fractions"] == rank1["fractions"]


def test_plain_student_masks_agree_across_ranks_and_with_one_process(ranks):
    rank0, rank1 = ranks[0][False], ranks[1][False]
    _check_ranks_agree(rank0, rank1)
    single = pruned_student(toy_data(), reinsert=False)  # no process group: 1 process
    for i, (mask, want) in enumerate(zip(rank0["masks"], single["masks"], strict=True)):
        assert torch.equal(mask, want), f"mask {i} differs from the 1-process run"
    for name in PRUNED:
        torch.testing.assert_close(rank0["weights"][name], single["weights"][name],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_reinserted_batchnorm_student_gets_rank0_masks_on_both_ranks(ranks):
    rank0, rank1 = ranks[0][True], ranks[1][True]
    _check_ranks_agree(rank0, rank1)
    # re-inserted BatchNorm changed the ranking: the masks are not the plain student's
    plain = ranks[0][False]["masks"]
    assert any(not torch.equal(a, b) for a, b in zip(rank0["masks"], plain, strict=True))
