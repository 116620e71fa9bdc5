"""CPU training cost of the CIFAR ResNets and 1 -> 2 process DDP scaling (not a test).

Measures, each in a fresh subprocess (so peak RSS is the measurement's own):
1. ResNet-20 and ResNet-56 (the real checkpoints when ../shared/data/pretrained has them):
   forward + backward + SGD step time per batch of 128 (32x32 inputs) at `--threads` torch
   threads, peak RSS, and the extrapolated time of a 50,000-image epoch.
2. onnxcomp.training.trainer.train on a `--ddp-samples` subset (synthetic uint8 CIFAR-sized
   images with the crop/flip augmentation) in 1 and in 2 processes (torch.distributed.run,
   gloo, 1 thread each), global batch 128: throughput from the epoch time of rank 0.

Usage: .venv/bin/python benchmarks/training_epoch_cost.py [--threads 2] [--iters 5]
Prints a JSON summary with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHARED_DATA, load_average, peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
EPOCH_IMAGES = 50_000


def step_cost(depth: int, threads: int, iters: int, batch: int) -> dict:
    """Seconds per forward+backward+step of `batch` images, median of `iters` after a warm-up."""
    import torch

    from models.resnet_cifar import load_pretrained, resnet20, resnet56

    torch.set_num_threads(threads)
    try:
        model = load_pretrained(depth, SHARED_DATA)
        weights = "pretrained"
    except FileNotFoundError:
        model = {20: resnet20, 56: resnet56}[depth]()
        weights = "random init"
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(iters + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i:  # the first step pays lazy imports and allocations
            times.append(time.perf_counter() - start)
    per_batch = sorted(times)[len(times) // 2]
    return {
        "model": f"resnet{depth}",
        "weights": weights,
        "threads": threads,
        "batch": batch,
        "seconds_per_batch": per_batch,
        "images_per_s": batch / per_batch,
        "epoch_minutes_50k": EPOCH_IMAGES / batch * per_batch / 60,
        "peak_rss_mib": peak_rss_bytes() / 2**20,
    }


def ddp_worker(samples: int, out: Path) -> None:
    """Run under torch.distributed.run: 1 epoch of ResNet-20 over a synthetic subset."""
    import numpy as np
    import torch

    from models.resnet_cifar import resnet20
    from onnxcomp.data import get_preset
    from onnxcomp.training.data import TrainingData
    from onnxcomp.training.trainer import TrainConfig, train

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(samples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=samples)
    data = TrainingData(
        {"input": pixels}, labels, "synthetic", preprocess=get_preset("cifar10"),
        pixel=frozenset({"input"}),
    )  # fmt: skip

    def ce(outputs, teacher_outputs, target):
        loss = torch.nn.functional.cross_entropy(outputs["logits"], target)
        return loss, {}

    torch.manual_seed(0)
    config = TrainConfig(epochs=1, lr=0.05, batch_size=128, device="cpu", num_threads=1)
    result = train(resnet20(), ce, data, config)
    if int(os.environ.get("RANK", "0")) == 0:
        stats = result.history[-1]
        out.write_text(json.dumps({"seconds": stats.seconds, "samples": stats.samples}))


def _subprocess_json(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def ddp_throughput(processes: int, samples: int, tmp: Path) -> dict:
    out = tmp / f"ddp{processes}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(processes), __file__, "--ddp-worker", str(samples), str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    figures = json.loads(out.read_text())
    figures["processes"] = processes
    figures["images_per_s"] = figures["samples"] / figures["seconds"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--ddp-samples", type=int, default=1024)
    parser.add_argument("--step", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step_cost(args.step, args.threads, args.iters, args.batch)))
        return
    if args.ddp_worker:
        ddp_worker(int(args.ddp_worker[0]), Path(args.ddp_worker[1]))
        return
    summary: dict = {"load_average_before": load_average()}
    common = ["--threads", str(args.threads), "--iters", str(args.iters)]
    summary["steps"] = [
        _subprocess_json(["--step", str(depth), *common, "--batch", str(args.batch)])
        for depth in (20, 56)
    ]
    tmp = ROOT / "bench_out"
    tmp.mkdir(exist_ok=True)
    summary["ddp"] = [ddp_throughput(n, args.ddp_samples, tmp) for n in (1, 2)]
    summary["ddp_speedup_2_over_1"] = (
        summary["ddp"][1]["images_per_s"] / summary["ddp"][0]["images_per_s"]
    )
    summary["load_average_after"] = load_average()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
