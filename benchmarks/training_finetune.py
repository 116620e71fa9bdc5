"""KD fine-tuning of the thinet-pruned CIFAR ResNet-56 (issue #9: "pruned to 0.5 of the MACs +
finetune with KD from the original: within 0.5 points of fp32"), through the same job as
``onnxcomp finetune`` (BatchNorm re-inserted into the folded convs, folded back when written).

The models are `benchmarks/training_recovery.py`'s (exported with BN, folded = the fp32 teacher,
pruned with thinet to ``--macs``; ``--start recovered`` takes its block-recovered file, tag
``--recovered-tag``). Training data: ``--images`` of the CIFAR-10 training JPEGs (a seeded
subset), random crop + flip unless ``--no-augment`` (then the teacher's outputs are cached),
pure KD by default (``--alpha 0.9`` mixes in the labels). Accuracy and top-1 agreement with the
fp32 model on the same seeded test subset as the recovery benchmark, in ONNX Runtime.

    python -m benchmarks.training_finetune --images 10000 --epochs 2 --threads 2

Not a test: a stated budget (images x epochs), read the JSON / the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import (
    BENCH_OUT,
    CIFAR_TRAIN,
    markdown_table,
    peak_rss_bytes,
    timed_training_job,
)
from benchmarks.training_recovery import evaluate, prepare

OUT = BENCH_OUT / "training_finetune"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--start", choices=("pruned", "recovered"), default="recovered")
    parser.add_argument("--recovered-tag", default="it100_lr1e-3_mix0.5")
    parser.add_argument("--train", type=Path, default=CIFAR_TRAIN)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="default: the job's by kind")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--alpha", type=float, default=1.0, help="KD share (1: no labels)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="default")
    return parser.parse_args(argv)


def finetune(start: Path, teacher: Path, args: argparse.Namespace) -> dict:
    from onnxcomp.training.job import JobOptions
    from onnxcomp.training.losses import DistillationConfig
    from onnxcomp.training.trainer import TrainConfig

    OUT.mkdir(parents=True, exist_ok=True)
    output = OUT / f"{args.model}_{args.start}_ft_{args.tag}.onnx"
    train = TrainConfig(
        epochs=args.epochs, lr=args.lr or 1e-3, batch_size=args.batch_size,
        weight_decay=args.weight_decay, device="cpu", augment=args.augment,
        num_threads=args.threads, seed=0,
    )  # fmt: skip
    options = JobOptions(
        output=output,
        distillation=DistillationConfig("kd", temperature=args.temperature, alpha=args.alpha),
        train=train,
        lr_by_kind=args.lr is None,
        force=True,
        verify=False,
    )
    job = timed_training_job(start, teacher, options, args.images, args.train)
    report = job.report
    return {
        "file": str(output),
        "seconds": job.seconds,
        "train_seconds": sum(s.seconds for s in report.history),
        "history": [vars(s) for s in report.history],
        "notes": report.notes,
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "load_before": job.load_before,
        "load_after": job.load_after,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    paths = prepare(args.model, args.macs)
    start = paths["pruned"]
    if args.start == "recovered":
        start = start.with_name(f"{start.stem}_recovered_{args.recovered_tag}.onnx")
        if not start.exists():
            raise SystemExit(
                f"{start}: missing; run benchmarks/training_recovery.py --tag "
                f"{args.recovered_tag} (with its settings) or pass --start pruned"
            )
    run = finetune(start, paths["fp32"], args)
    fp32, before, after = evaluate([paths["fp32"], start, Path(run["file"])], args.test_limit)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "fp32": fp32}
    result.update({"before": before, "after": after, **run})
    (OUT / f"result_{args.tag}.json").write_text(json.dumps(result, indent=2))
    rows = [
        [label, f"{100 * r['accuracy']:.2f}", f"{100 * (r['accuracy'] - fp32['accuracy']):+.2f}",
         f"{100 * r['agreement']:.2f}"]
        for label, r in (("fp32", fp32), (args.start, before), ("fine-tuned", after))
    ]  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1))
    print(markdown_table(["model", "accuracy %", "vs fp32 (pts)", "agreement %"], rows))


if __name__ == "__main__":
    main()
