"""DDP: the trainer under ``torch.distributed.run`` with 2 CPU (gloo) processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import training_ddp_worker as worker  # noqa: E402

from onnxcomp.training.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ddp_dir = tmp_path / "ddp_ckpt"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(Path(worker.__file__).parent)])
    )
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        worker.__file__, str(out), str(ddp_dir),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(out / "rank0.pt", weights_only=False)
    rank1 = torch.load(out / "rank1.pt", weights_only=False)

    # both processes end with the same weights and the same (all-reduced) epoch losses
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key
    assert rank0["loss"] == rank1["loss"]
    # only rank 0 writes: one checkpoint per epoch, one file
    assert len(rank0["saves"]) == 2 and rank1["saves"] == []
    assert sorted(p.name for p in ddp_dir.iterdir()) == ["last.pt"]

    # a 1-process run with the same global batch reaches the same weights
    torch.set_num_threads(1)
    single = train(worker.toy_model(), worker.ce_objective, worker.toy_data(), worker.config(None))
    for key, value in single.last_state.items():
        torch.testing.assert_close(rank0["state"][key], value, rtol=1e-5, atol=1e-6)
    assert rank0["loss"] == pytest.approx([s.loss for s in single.history], rel=1e-5)
    # and the training moved the weights (the comparison is not trivially true)
    start = worker.toy_model().state_dict()
    assert not torch.allclose(start["0.weight"], single.last_state["0.weight"])
