"""int8 QAT (LSQ, KD from the fp32 model) of the PTQ ResNet-20 (`onnxcomp convert --int8`
default: mse U8S8), through the same job as `onnxcomp finetune`.

Not a test: run it by hand with a stated budget (images, epochs) and read the JSON / the table.
Top-1 agreement with fp32 is measured in ONNX Runtime on `--eval` test images, before (the PTQ
model) and after (the written QAT model), by the job's own verification.

    onnxcomp convert bench_out/int8/resnet20_fp32.onnx --int8 \
        --calib bench_out/cifar10_calib512.npz -o bench_out/int8/resnet20_ptq_default.onnx
    python -m benchmarks.training_qat --int8 bench_out/int8/resnet20_ptq_default.onnx \
        --images 2048 --epochs 1 --threads 1 --scale-lr 100 --scale-lr 1

The LSQ steps learn in the log domain, so ``--scale-lr`` is a rate of relative change,
independent of ``--lr`` (default: the job's SCALE_LR). The weights are BN-folded: ``--lr``
0.002 diverged within 5 steps on ResNet-20 (KD loss 0.03 -> 25), 2e-4 trains.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import BENCH_OUT, load_average, markdown_table

OUT = BENCH_OUT / "training_qat"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, default=BENCH_OUT / "int8" / "resnet20_fp32.onnx")
    parser.add_argument(
        "--int8", type=Path, default=BENCH_OUT / "int8" / "resnet20_ptq_default.onnx"
    )
    parser.add_argument("--train", type=Path, default=BENCH_OUT / "cifar10_calib2048.npz")
    parser.add_argument("--test", type=Path, default=BENCH_OUT / "cifar10_test.npz")
    parser.add_argument("--images", type=int, default=2048, help="training images")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--scale-lr", type=float, action="append", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval", type=int, default=2000, help="test images for agreement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument(
        "--ort-opt",
        choices=("all", "disable"),
        default="all",
        help="ORT graph optimizations for the agreement runs; 'disable' runs each Q/DQ as its own "
        "op: the exact int8 arithmetic, free of this CPU's kernels (U8S8 saturates 8-bit weights "
        "without VNNI)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def run_one(args: argparse.Namespace, scale_lr: float) -> dict:
    """One QAT run; its budget, times and agreement before/after."""
    from onnxcomp.backends.base import SessionConfig
    from onnxcomp.training.job import DataSpec, JobOptions, run_job
    from onnxcomp.training.losses import DistillationConfig
    from onnxcomp.training.trainer import TrainConfig

    args.out.mkdir(parents=True, exist_ok=True)
    output = args.out / f"{args.int8.stem}_qat_scalelr{scale_lr:g}.onnx"
    options = JobOptions(
        output=output,
        distillation=DistillationConfig("kd", temperature=args.temperature, alpha=1.0),
        train=TrainConfig(
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, weight_decay=0.0,
            device="cpu", augment=False, num_threads=args.threads,
        ),
        scale_lr=scale_lr,
        session=SessionConfig(optimization_level=args.ort_opt),
        force=True,
    )  # fmt: skip
    from onnxcomp.data import get_preset

    data = DataSpec(
        path=args.train,
        preprocess=get_preset("cifar10") if args.train.is_dir() else None,  # JPEG folders
        limit=args.images,
        val=args.test,
        val_limit=args.eval,
        batch_size=250,
    )
    load_before = load_average()
    start = time.perf_counter()
    report = run_job(args.int8, args.fp32, data, options)
    return {
        "scale_lr": scale_lr,
        "budget": {
            "images": args.images,
            "epochs": args.epochs,
            "batch": args.batch_size,
            "lr": args.lr,
            "threads": args.threads,
            "teacher_cached": True,
        },
        "agreement_before": report.before.top1_agreement,
        "agreement_after": report.after.top1_agreement,
        "accuracy_fp32": report.before.reference_accuracy,
        "accuracy_ptq": report.before.candidate_accuracy,
        "accuracy_qat": report.after.candidate_accuracy,
        "train_seconds": sum(s.seconds for s in report.history),
        "job_seconds": time.perf_counter() - start,
        "epoch_loss": [s.loss for s in report.history],
        "scales_changed": report.scales_changed,
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
        "output": str(output),
    }


def table(runs: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    rows = [
        [
            f"{r['scale_lr']:g}",
            f"{r['budget']['images']} x {r['budget']['epochs']}",
            pct(r["agreement_before"]),
            pct(r["agreement_after"]),
            pct(r["accuracy_ptq"]),
            pct(r["accuracy_qat"]),
            pct(r["accuracy_fp32"]),
            f"{r['train_seconds']:.0f}",
            " ".join(f"{x:.1f}" for x in r["loadavg_before"]),
        ]
        for r in runs
    ]
    headers = [
        "scale lr", "images x epochs", "agree PTQ %", "agree QAT %", "acc PTQ %",
        "acc QAT %", "acc fp32 %", "train s", "loadavg",
    ]  # fmt: skip
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from onnxcomp.training.job import SCALE_LR

    runs = [run_one(args, scale_lr) for scale_lr in args.scale_lr or [SCALE_LR]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_qat.json").write_text(json.dumps(runs, indent=2))
    print(table(runs))


if __name__ == "__main__":
    main()
