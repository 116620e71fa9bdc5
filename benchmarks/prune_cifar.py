"""Channel pruning and low-rank factorization on the pretrained CIFAR ResNets, no fine-tuning:
accuracy against MACs kept, with the measured latency ratio (issue #4). Results go into
BENCHMARKS.md between ``<!-- prune:begin -->`` and ``<!-- prune:end -->``.

Uses the arrays and models ``benchmarks/int8_cifar.py`` prepares in ``bench_out/`` (prepares
them when they are missing), plus 2,048 calibration images for the "2048 calib" row.

    .venv/bin/python benchmarks/prune_cifar.py [--models resnet56] [--test-limit N]
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

from benchmarks.common import (
    BENCH_OUT,
    ROOT,
    latency_rounds,
    load_average,
    markdown_table,
    replace_section,
)
from onnxcomp.converter.convert import convert
from onnxcomp.converter.lowrank import LowRankConfig
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.prune import PruneConfig
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
from onnxcomp.converter.verify import VerifyOptions
from onnxcomp.core.analysis import summarize
from onnxcomp.data.batches import DataOptions

CALIB = BENCH_OUT / "cifar10_calib512.npz"
CALIB_LARGE = BENCH_OUT / "cifar10_calib2048.npz"  # labels ending in "2048 calib"
TEST = BENCH_OUT / "cifar10_test.npz"


def variants() -> dict[str, PipelineOptions]:
    """Configuration label -> pipeline options."""
    out: dict[str, PipelineOptions] = {"fp32 (BN folded)": PipelineOptions()}
    for macs in (0.75, 0.5, 0.35):
        for method in ("l1", "thinet"):
            out[f"prune {method} macs {macs}"] = PipelineOptions(
                prune=PruneConfig(ratio=None, macs=macs, method=method)
            )
    for macs in (0.75, 0.6):  # channel counts aligned to ORT's 16-float NCHWc blocks
        for method in ("l1", "thinet"):
            out[f"prune {method} macs {macs} multiple 16"] = PipelineOptions(
                prune=PruneConfig(ratio=None, macs=macs, method=method, multiple=16)
            )
    for energy in (0.99, 0.95, 0.9):
        out[f"lowrank energy {energy}"] = PipelineOptions(lowrank=LowRankConfig(energy))
    for error in (0.05, 0.1):
        out[f"lowrank output error {error} + refit"] = PipelineOptions(
            lowrank=LowRankConfig(output_error=error, refit=True)
        )
    out["lowrank output error 0.1 + refit + latency"] = PipelineOptions(
        lowrank=LowRankConfig(output_error=0.1, refit=True, measure_latency=True)
    )
    out["prune thinet macs 0.5 2048 calib"] = PipelineOptions(
        prune=PruneConfig(ratio=None, macs=0.5, method="thinet", refit_samples=2048)
    )
    out["prune thinet macs 0.5 + int8"] = PipelineOptions(
        prune=PruneConfig(ratio=None, macs=0.5, method="thinet"), int8=QuantizeConfig()
    )
    out["int8 alone"] = PipelineOptions(int8=QuantizeConfig())
    return out


def run_model(
    name: str, limit: int | None, rounds: int, only: list[str] | None = None
) -> list[dict]:
    source = BENCH_OUT / "int8" / f"{name}_bn.onnx"
    if not source.exists() or not CALIB_LARGE.exists():
        from benchmarks.int8_cifar import prepare_data, prepare_models

        prepare_data([512, 2048])
        prepare_models([name])
    folder = BENCH_OUT / "prune" / name
    folder.mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    for label, options in variants().items():
        if only and label != "fp32 (BN folded)" and not any(o in label for o in only):
            continue
        out = folder / (
            label.replace(" ", "_").replace("+", "plus").replace("(", "").replace(")", "") + ".onnx"
        )
        start = time.perf_counter()
        report = convert(
            source,
            out,
            options,
            VerifyOptions(data=TEST, limit=limit, batch_size=500, tolerance=1e-4),
            force=True,
            calibration=DataOptions(
                data=CALIB_LARGE if label.endswith("2048 calib") else CALIB, batch_size=32
            ),
        )
        summary = summarize(onnx.load(out, load_external_data=False), path=out)
        row = {
            "label": label,
            "macs": summary.total_macs,
            "params": summary.parameters,
            "accuracy": report.fidelity.candidate_accuracy,
            "fp32_accuracy": report.fidelity.reference_accuracy,
            "agreement": report.fidelity.top1_agreement,
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        paths.append(out)
    x = np.load(TEST, mmap_mode="r")["input"][:64].copy()
    medians = latency_rounds(paths, {"input": x}, threads=2, rounds=rounds, seconds=0.5)
    base = float(np.median(medians[0]))
    for row, per_round in zip(rows, medians, strict=True):
        row["b64_ms"] = float(np.median(per_round))
        row["speedup"] = base / row["b64_ms"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet56", "resnet20"])
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", help="configurations whose label contains these")
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the last run's other models and configurations (each row says its run; "
        "rows restored from BENCHMARKS.md keep their cells)",
    )
    parser.add_argument(
        "--from-json", action="store_true", help="re-render the last run's JSON, run nothing"
    )
    args = parser.parse_args(argv)
    raw = BENCH_OUT / "prune_cifar.json"
    if args.from_json:
        saved = json.loads(raw.read_text())
        started, load, results = saved["started"], saved["load"], saved["results"]
    else:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load = load_average()
        results = json.loads(raw.read_text())["results"] if args.merge and raw.exists() else {}
        order = list(variants())
        for name in args.models:
            fresh = run_model(name, args.test_limit, args.rounds, args.only)
            rows = {r["label"]: r for r in results.get(name, [])}
            rows.update({r["label"]: {**r, "run": started} for r in fresh})
            results[name] = sorted(rows.values(), key=lambda r: order.index(r["label"]))
        raw.write_text(
            json.dumps({"started": started, "load": load, "results": results}, indent=2) + "\n"
        )
    parts = [
        f"Run {started} with `benchmarks/prune_cifar.py`, load average {load} at start; "
        f"{args.test_limit or '10,000'} test JPEGs, ThiNet sampled on 512 training images, "
        "no fine-tuning. `--prune-macs F` keeps a fraction F of the MACs: every channel group "
        "(the inner channels of each block and the residual streams tied through Adds and the "
        "zero-padded shortcuts) gets its amount from the sensitivity scan on 128 calibration "
        "images, kept channel counts in multiples of 8 (of 16 where the label says so); ThiNet "
        "refits each layer, layer by layer, on the pruned model's inputs; "
        "MACs from `onnxcomp inspect`; latency at batch 64, 2 threads, one session at a time, "
        "median of rounds; 'latency fall / MAC fall' = (1 - latency / fp32 latency) / "
        "(1 - MACs kept) (the issue asks for at least 0.70)."
    ]
    for name, rows in results.items():
        base = rows[0]
        table = markdown_table(
            ["configuration", "MACs kept", "params", "accuracy %", "Δ acc (pts)",
             "top-1 agree %", "b64 speed-up", "latency fall / MAC fall"],
            [
                r["restored_cells"] if "restored_cells" in r else [
                    r["label"],
                    f"{r['macs'] / base['macs']:.2f}",
                    f"{r['params']:,}",
                    f"{100 * r['accuracy']:.2f}",
                    f"{100 * (r['accuracy'] - base['accuracy']):+.2f}",
                    f"{100 * r['agreement']:.2f}",
                    f"{r['speedup']:.2f}x",
                    f"{(1 - 1 / r['speedup']) / (1 - r['macs'] / base['macs']):.2f}"
                    if r["macs"] < 0.99 * base["macs"] else "",
                ]
                for r in rows
            ],
        )  # fmt: skip
        parts.append(f"#### {name}\n\n{table}")
        runs: dict[str, list[str]] = {}
        for r in rows:
            runs.setdefault(r.get("run", started), []).append(r["label"])
        if len(runs) > 1:
            parts.append(
                "Rows from different runs (each speed-up against the fp32 model timed in the "
                "same run): "
                + "; ".join(f"{run}: {', '.join(labels)}" for run, labels in sorted(runs.items()))
            )
    body = "\n\n".join(parts)
    print(body)
    if not args.no_markdown:
        replace_section(ROOT / "BENCHMARKS.md", "prune", body)


if __name__ == "__main__":
    main()
