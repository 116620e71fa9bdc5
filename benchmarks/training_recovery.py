"""Block-wise recovery (BRECQ-style, `onnxcomp.training.recover`) of the thinet-pruned CIFAR
ResNets on CPU (issue #9 item 4; not a test).

For each model: the pretrained network exported with BatchNorm (as `benchmarks/int8_cifar.py`
does), folded (the fp32 reference and teacher), pruned to `--macs` of the MACs with thinet on
the 512 calibration images exactly as `benchmarks/prune_cifar.py`'s "prune thinet macs 0.5"
row, then `recover_blocks` on `--samples` images of `cifar10_calib2048.npz` (balanced over the
classes; the 512 thinet images are among them). Accuracy of fp32, pruned and pruned+recovered
on the CIFAR-10 test JPEGs (`--test-limit`, a seeded subset, or all 10,000), recovery time,
peak RSS and the load average. Models are cached in bench_out/recover/.

    .venv/bin/python benchmarks/training_recovery.py [--models resnet56 resnet20]
        [--samples 1024] [--iters 200] [--lr 1e-3] [--test-limit 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BENCH_OUT, SHARED_DATA, load_average, markdown_table, peak_rss_bytes

OUT = BENCH_OUT / "recover"
CALIB = BENCH_OUT / "cifar10_calib512.npz"
CALIB_LARGE = BENCH_OUT / "cifar10_calib2048.npz"
TEST = BENCH_OUT / "cifar10_test.npz"


def prepare(name: str, macs: float) -> dict[str, Path]:
    """The BN export, the folded fp32 model and the thinet-pruned one (cached)."""
    from models import zoo
    from onnxcomp.converter.convert import convert
    from onnxcomp.converter.pipeline import PipelineOptions
    from onnxcomp.converter.prune import PruneConfig
    from onnxcomp.data.batches import DataOptions

    if not CALIB_LARGE.exists() or not TEST.exists():
        from benchmarks.int8_cifar import prepare_data

        prepare_data([512, 2048])
    OUT.mkdir(parents=True, exist_ok=True)
    paths = {
        "bn": OUT / f"{name}_bn.onnx",
        "fp32": OUT / f"{name}_fp32.onnx",
        "pruned": OUT / f"{name}_thinet_macs{macs}.onnx",
    }
    if not paths["bn"].exists():
        zoo.export_reference(name, paths["bn"], keep_batchnorm=True, pretrained_dir=SHARED_DATA)
    if not paths["fp32"].exists():
        convert(paths["bn"], paths["fp32"], PipelineOptions())
    if not paths["pruned"].exists():
        prune = PruneConfig(ratio=None, macs=macs, method="thinet")
        calibration = DataOptions(data=CALIB, batch_size=32)
        convert(paths["bn"], paths["pruned"], PipelineOptions(prune=prune), calibration=calibration)
    return paths


class _Printer:
    """One line per block."""

    def start_block(self, index: int, total: int, name: str, iterations: int) -> None:
        self.index, self.total = index, total

    def step(self, loss: float) -> None:
        pass

    def end_block(self, record) -> None:
        print(
            f"  block {self.index + 1}/{self.total} {record.name}: relative error "
            f"{record.relative_before:.4f} -> {record.relative_after:.4f} "
            f"({record.seconds:.1f} s{'' if record.kept else ', reverted'})",
            flush=True,
        )


def recover(paths: dict[str, Path], args: argparse.Namespace) -> dict:
    import onnx_ir as ir

    from onnxcomp.training.data import load_training_data
    from onnxcomp.training.importer import import_onnx
    from onnxcomp.training.recover import RecoverConfig, recover_blocks

    config = RecoverConfig(
        iterations=args.iters,
        lr=args.lr,
        batch_size=args.batch_size,
        samples=args.samples,
        input_mix=args.input_mix,
    )
    data = load_training_data(CALIB_LARGE, ["input"])
    student = import_onnx(ir.load(paths["pruned"]))
    load = load_average()
    start = time.perf_counter()
    result = recover_blocks(student, ir.load(paths["fp32"]), data, config, _Printer())
    seconds = time.perf_counter() - start
    out = paths["pruned"].with_name(paths["pruned"].stem + f"_recovered_{args.tag}.onnx")
    ir.save(student.export_onnx(), out)
    return {
        "file": str(out),
        "seconds": seconds,
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "load_before": load,
        "load_after": load_average(),
        "notes": result.notes,
        "blocks": [vars(b) for b in result.blocks],
    }


def evaluate(paths: list[Path], limit: int | None) -> list[dict]:
    from benchmarks.int8_cifar import load_test, predictions

    images, labels = load_test(TEST, limit)
    top1 = [predictions(path, images) for path in paths]
    return [
        {"accuracy": float(np.mean(p == labels)), "agreement": float(np.mean(p == top1[0]))}
        for p in top1
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet56"])
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-mix", type=float, default=0.0)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="default", help="names the recovered file and run")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    report = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    for name in args.models:
        paths = prepare(name, args.macs)
        run = recover(paths, args)
        fp32, pruned, recovered = evaluate(
            [paths["fp32"], paths["pruned"], Path(run["file"])], args.test_limit
        )
        report[name] = {"fp32": fp32, "pruned": pruned, "recovered": recovered, **run}
        print(json.dumps({k: v for k, v in report[name].items() if k != "blocks"}), flush=True)
    (BENCH_OUT / f"training_recovery_{args.tag}.json").write_text(json.dumps(report, indent=2))
    rows = []
    for name in args.models:
        r = report[name]
        for label in ("fp32", "pruned", "recovered"):
            acc = r[label]["accuracy"]
            rows.append(
                [
                    f"{name} {label}",
                    f"{100 * acc:.2f}",
                    f"{100 * (acc - r['fp32']['accuracy']):+.2f}",
                    f"{100 * r[label]['agreement']:.2f}",
                ]
            )
    print(markdown_table(["model", "accuracy %", "Δ vs fp32 (pts)", "top-1 agree %"], rows))


if __name__ == "__main__":
    main()
