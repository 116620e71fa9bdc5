"""Latency-aware channel counts for pruning followed by int8 (issue 14, item 4), ResNet-56:
fp32, int8 alone, and ``--prune-macs 0.5`` + int8 with and without ``--prune-latency int8``,
b64 latency ratios measured interleaved in one process (``onnxcomp.backends.bench``), repeated.

Reuses ``benchmarks/prune_cifar.py``'s data and model (prepared in ``bench_out/``).

    .venv/bin/python benchmarks/prune_latency_cifar.py [--method l1|thinet] [--test-limit 2000]

Accuracy on a seeded random subset of ``--test-limit`` of the 10,000 CIFAR-10 test JPEGs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BENCH_OUT, load_average, markdown_table
from benchmarks.int8_cifar import load_test, predictions
from benchmarks.prune_cifar import CALIB, TEST
from onnxcomp.backends.base import SessionConfig
from onnxcomp.backends.bench import benchmark
from onnxcomp.converter.convert import convert
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.prune import PruneConfig
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
from onnxcomp.core.analysis import summarize
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OnnxcompError


def variants(method: str, macs: float) -> dict[str, PipelineOptions]:
    """Configuration label -> pipeline options (the first is the fp32 baseline). No
    ``--prune-multiple 16`` row: ResNet-56's 16-channel stage then stays whole and 0.5 of the
    MACs is out of reach (floor 0.57, BENCHMARKS.md's pruning section)."""
    return {
        "fp32 (BN folded)": PipelineOptions(),
        "int8 alone": PipelineOptions(int8=QuantizeConfig()),
        f"prune {method} macs {macs} + int8 (multiple 8)": PipelineOptions(
            prune=PruneConfig(ratio=None, macs=macs, method=method), int8=QuantizeConfig()
        ),
        f"prune {method} macs {macs} + int8, --prune-latency int8 (multiple 4)": PipelineOptions(
            prune=PruneConfig(ratio=None, macs=macs, method=method, multiple=4, latency="int8"),
            int8=QuantizeConfig(),
        ),
    }


def build(
    name: str, method: str, macs: float, limit: int, rebuild: bool, time_only: bool = False
) -> list[dict]:
    """Convert each variant (kept when its file exists, unless ``rebuild``), then accuracy and
    top-1 agreement with fp32 on a seeded subset of ``limit`` test JPEGs."""
    source = BENCH_OUT / "int8" / f"{name}_bn.onnx"
    if not source.exists():
        from benchmarks.int8_cifar import prepare_models

        prepare_models([name])
    folder = BENCH_OUT / "prune_latency" / name
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_test(TEST, limit)
    rows = []
    for index, (label, options) in enumerate(variants(method, macs).items()):
        out = folder / f"{method}_{macs}_v{index}.onnx"
        start = time.perf_counter()
        changes: list[str] = []
        if rebuild or not out.exists():
            try:
                report = convert(
                    source, out, options, force=True,
                    calibration=DataOptions(data=CALIB, batch_size=32),
                )  # fmt: skip
            except OnnxcompError as error:  # e.g. a MACs target the multiple cannot reach
                print(f"{label}: {error}", flush=True)
                continue
            changes = [c for record in report.records for c in record.changes]
        top1 = labels * 0 if time_only else predictions(out, images, threads=2)
        reference = top1 if index == 0 else rows[0]["top1"]
        summary = summarize(onnx.load(out, load_external_data=False), path=out)
        row = {
            "label": label,
            "path": str(out),
            "macs": summary.total_macs,
            "accuracy": float(np.mean(top1 == labels)),
            "agreement": float(np.mean(top1 == np.asarray(reference))),
            "seconds": time.perf_counter() - start,
            "changes": changes,
            "index": index,
            "top1": top1.tolist(),
        }
        print(
            json.dumps({k: v for k, v in row.items() if k not in ("changes", "top1")}), flush=True
        )
        rows.append(row)
    return rows


def time_rows(rows: list[dict], repeats: int, seconds: float) -> None:
    """b64 p50 of every model, interleaved in one run; ``repeats`` runs; speed-ups vs row 0."""
    config = SessionConfig(intra_op_threads=2, inter_op_threads=1, allow_spinning=False)
    for row in rows:
        row["speedups"], row["loadavg"] = [], []
    for _ in range(repeats):
        load = load_average()
        results = benchmark([r["path"] for r in rows], config, batch=64, min_time_s=seconds)
        base = results[0].latency_p50_ms
        for row, result in zip(rows, results, strict=True):
            row["speedups"].append(base / result.latency_p50_ms)
            row["loadavg"].append(load)
        print("speed-ups", [round(r["speedups"][-1], 2) for r in rows], "load", load, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--method", default="l1")
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--time-only", action="store_true", help="skip the accuracy (its columns read 0)"
    )
    parser.add_argument("--rebuild", action="store_true", help="convert even where files exist")
    args = parser.parse_args(argv)
    raw = BENCH_OUT / f"prune_latency_{args.model}_{args.method}.json"
    rows = build(args.model, args.method, args.macs, args.test_limit, args.rebuild, args.time_only)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    time_rows(rows, args.repeats, args.seconds)
    raw.write_text(json.dumps({"started": started, "rows": rows}, indent=2) + "\n")
    base = rows[0]
    table = markdown_table(
        ["configuration", "MACs kept", "accuracy %", "top-1 agree %", "b64 speed-up (median)",
         "spread (min-max)"],
        [
            [
                r["label"],
                f"{r['macs'] / base['macs']:.2f}",
                f"{100 * r['accuracy']:.2f}",
                f"{100 * r['agreement']:.2f}",
                f"{np.median(r['speedups']):.2f}x",
                f"{min(r['speedups']):.2f}-{max(r['speedups']):.2f}",
            ]
            for r in rows
        ],
    )  # fmt: skip
    loads = [r for r in rows[0]["loadavg"]]
    print(f"Run {started}, {args.test_limit} test JPEGs, load averages per repeat {loads}\n")
    print(table)
    for r in rows:
        for change in r["changes"]:
            if "fast" in change or "channels" in change:
                print(f"- {r['label']}: {change}")


if __name__ == "__main__":
    main()
