"""DDP: the trainer in 2 CPU (gloo) processes, as torchrun starts them (RANK, WORLD_SIZE...).

The fast test forks the 2 workers from pytest (torch already imported: seconds); the slow one
launches them with ``python -m torch.distributed.run --nproc_per_node 2`` exactly as a user
would (three fresh interpreters importing torch: tens of seconds on a busy 2-core machine).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import training_ddp_worker as worker  # noqa: E402

from onnxcomp.training.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _forked_worker(rank: int, port: int, out: str, ddp_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    worker.run(Path(out), Path(ddp_dir))


@pytest.fixture(scope="module")
def single():
    """The 1-process run with the same global batch (run first: the forked workers then
    inherit torch's lazily imported modules instead of importing them again)."""
    torch.set_num_threads(1)
    return train(worker.toy_model(), worker.ce_objective, worker.toy_data(), worker.config(None))


def test_two_forked_gloo_processes_match_one_process(tmp_path, single):
    out = tmp_path / "out"
    out.mkdir()
    ddp_dir = tmp_path / "ddp_ckpt"
    args = (_free_port(), str(out), str(ddp_dir))
    torch.multiprocessing.start_processes(_forked_worker, args, nprocs=2, start_method="fork")
    _check_against_one_process(out, ddp_dir, single)


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun(tmp_path, single, request):
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("launches 3 fresh interpreters (~50 s on a busy 2-core machine): run -m slow")
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
    _check_against_one_process(out, ddp_dir, single)


def _check_against_one_process(out: Path, ddp_dir: Path, single) -> None:
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
    for key, value in single.last_state.items():
        torch.testing.assert_close(rank0["state"][key], value, rtol=1e-5, atol=1e-6)
    assert rank0["loss"] == pytest.approx([s.loss for s in single.history], rel=1e-5)
    # and the training moved the weights (the comparison is not trivially true)
    start = worker.toy_model().state_dict()
    assert not torch.allclose(start["0.weight"], single.last_state["0.weight"])
