"""int8 on pretrained CIFAR ResNet-20/56: onnxcomp's calibrators next to onnxruntime.quantization.

Run from the repository root::

    .venv/bin/python benchmarks/int8_cifar.py            # full run, writes BENCHMARKS.md
    .venv/bin/python benchmarks/int8_cifar.py --quick    # ResNet-20, 2,000 test images

Every calibration+conversion runs in its own fresh subprocess, which reports its wall time and
peak RSS (``VmHWM``, see ``common.peak_rss_bytes``). Latency: one live ONNX Runtime session at a
time (2 intra-op threads, ORT_ENABLE_ALL), fp32 and int8 models in rotating order over several
rounds, medians.
Raw numbers go to ``bench_out/int8_cifar.json``; the markdown section goes into BENCHMARKS.md
between ``<!-- int8:begin -->`` and ``<!-- int8:end -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    BENCH_OUT,
    ROOT,
    SHARED_DATA,
    OrtStatic,
    cpu_description,
    extract_cifar,
    latency_in_worker,
    latency_job,
    load_average,
    markdown_table,
    mib,
    package_versions,
    prepare_arrays,
    quantize_job,
    replace_section,
    subset_arrays,
    worker_main,
    worker_result,
)

SCRIPT = Path(__file__).resolve()
OUT = BENCH_OUT / "int8"
MODELS = ("resnet20", "resnet56")
OPSET = 17
THREADS = 2
CALIB_BATCH = 32  # the batch size onnxcomp's CLI calibrates with; used for both tools
EVAL_BATCH = 500
SECTION = "int8"


@dataclass(frozen=True)
class Config:
    """One way of producing an int8 model."""

    key: str
    tool: str  # "onnxcomp" | "ort"
    method: str  # onnxcomp calibrator name, or ORT CalibrationMethod name
    activation: str  # "uint8" (U8S8) | "int8" (S8S8)
    weight_rounding: str = "nearest"  # onnxcomp only: "nearest" | "gptq" | "adaround"
    # onnxcomp only: 7-bit weights (True), 8-bit (False), or the target's choice (None: x86
    # decides from the CPU the benchmark runs on, 7-bit without VNNI, as `convert` does)
    reduce_range: bool | None = None

    @property
    def label(self) -> str:
        kind = "U8S8" if self.activation == "uint8" else "S8S8"
        tool = "onnxcomp" if self.tool == "onnxcomp" else "ORT"
        rounding = {"gptq": " +GPTQ", "adaround": " +AdaRound"}.get(self.weight_rounding, "")
        reduced = {True: " reduce-range", False: " 8-bit", None: ""}[self.reduce_range]
        return f"{tool} {self.method}{rounding} {kind}{reduced}"


CONFIGS: dict[str, Config] = {
    c.key: c
    for c in [
        *(Config(f"oc-{m}", "onnxcomp", m, "uint8") for m in ("minmax", "percentile")),
        *(Config(f"oc-{m}", "onnxcomp", m, "uint8") for m in ("entropy", "mse", "dfp")),
        Config("oc-mse-gptq", "onnxcomp", "mse", "uint8", "gptq"),
        Config("oc-mse-adaround", "onnxcomp", "mse", "uint8", "adaround"),
        # 7-bit weights: what a CPU without VNNI needs (its u8 x s8 kernels saturate at 8 bits)
        *(
            Config(f"oc-mse{r}-rr", "onnxcomp", "mse", "uint8", rounding, True)
            for r, rounding in (("", "nearest"), ("-gptq", "gptq"), ("-adaround", "adaround"))
        ),
        *(
            Config(f"ort-{m.lower()}-{a}", "ort", m, act)
            for m in ("MinMax", "Entropy", "Percentile")
            for a, act in (("s8s8", "int8"), ("u8s8", "uint8"))
        ),
    ]
}
DEFAULT_CONFIG = "oc-mse"  # onnxcomp's default calibrator (QuantizeConfig)
HISTOGRAM_CONFIGS = ("oc-mse", "oc-percentile", "oc-entropy")
SCALING_CONFIGS = ("oc-entropy", "oc-mse", "ort-minmax-s8s8", "ort-entropy-s8s8")


# --------------------------------------------------------------------------- workers


def quantize_in_process(args: dict) -> dict:
    """Calibrate and convert one model (runs inside a fresh worker process)."""
    config = Config(**args["config"])
    if config.tool == "onnxcomp":
        from onnxcomp.converter.pipeline import PipelineOptions
        from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig

        how = PipelineOptions(
            int8=QuantizeConfig(
                calibration=config.method,
                activation_type=config.activation,
                weight_rounding=config.weight_rounding,
                reduce_range=config.reduce_range,
            )
        )
    else:
        how = OrtStatic(config.method, config.activation)
    paths = (Path(args[k]) for k in ("model", "output", "calib"))
    return quantize_job(*paths, CALIB_BATCH, how)


def worker(raw: str) -> None:
    """Entry point of a worker process: run the job named in the JSON, print the result."""
    jobs = {"quantize": quantize_in_process, "latency": lambda a: latency_job(a, THREADS)}
    worker_main(raw, jobs)


# --------------------------------------------------------------------------- preparation


def prepare_data(calib_sizes: list[int]) -> dict[str, Path]:
    """Extract the JPEGs once and save preprocessed arrays: calibration sets and the test set."""
    cifar = SHARED_DATA / "cifar10"
    if not cifar.is_dir():
        sys.exit(f"shared data not found at {cifar}; this benchmark needs the CIFAR-10 JPEGs")
    train = extract_cifar(cifar / "train_jpg.tar.gz", BENCH_OUT / "cifar10")
    test = extract_cifar(cifar / "test_jpg.tar.gz", BENCH_OUT / "cifar10")
    largest = max(calib_sizes)
    full = prepare_arrays(train, BENCH_OUT / f"cifar10_calib{largest}.npz", largest, seed=0)
    paths = {"test": prepare_arrays(test, BENCH_OUT / "cifar10_test.npz", None)}
    for size in calib_sizes:
        paths[f"calib{size}"] = subset_arrays(full, BENCH_OUT / f"cifar10_calib{size}.npz", size)
    return paths


def prepare_models(names: list[str]) -> dict[str, dict[str, Path]]:
    """Export each model with BatchNorm kept (opset 17) and fold it with onnxcomp (lossless)."""
    from models import zoo
    from onnxcomp.converter.convert import convert
    from onnxcomp.converter.pipeline import PipelineOptions

    OUT.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in names:
        exported = OUT / f"{name}_bn.onnx"
        folded = OUT / f"{name}_fp32.onnx"
        zoo.export_reference(name, exported, keep_batchnorm=True, pretrained_dir=SHARED_DATA)
        folded.unlink(missing_ok=True)
        convert(exported, folded, PipelineOptions())
        files[name] = {"exported": exported, "fp32": folded}
    return files


# --------------------------------------------------------------------------- measurements


def quantize(model: Path, config: Config, calib: Path, output: Path) -> dict:
    """Run one calibration+conversion in a fresh subprocess; its numbers or an error."""
    args = {
        "job": "quantize",
        "config": asdict(config),
        "model": str(model),
        "output": str(output),
        "calib": str(calib),
    }
    return worker_result(SCRIPT, args)


def predictions(path: Path, images: np.ndarray, threads: int = THREADS) -> np.ndarray:
    """Top-1 class of every image (one session, batches of EVAL_BATCH)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    top1 = [
        session.run(None, {"input": images[i : i + EVAL_BATCH]})[0].argmax(1)
        for i in range(0, len(images), EVAL_BATCH)
    ]
    return np.concatenate(top1)


def load_test(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Test images and labels; with ``limit``, a seeded random subset (the file is by class)."""
    with np.load(path) as data:
        images, labels = data["input"], data["labels"]
    if limit is not None and limit < len(images):
        keep = np.sort(np.random.default_rng(0).choice(len(images), limit, replace=False))
        images, labels = images[keep], labels[keep]
    return np.ascontiguousarray(images), labels


def latency(models: list[Path], test: Path, batch: int, rounds: int, seconds: float) -> dict:
    """Median latency (ms) of each model, measured in a fresh subprocess."""
    return latency_in_worker(SCRIPT, models, test, batch, rounds, seconds)


def predicted_rss(points: dict[int, dict], size: int) -> float | None:
    """Peak RSS at ``size`` images extrapolated linearly from the two largest measured sizes."""
    measured = sorted((n, p["peak_rss"]) for n, p in points.items() if "peak_rss" in p)
    if len(measured) < 2:
        return None
    (n0, r0), (n1, r1) = measured[-2:]
    return r1 + (r1 - r0) / (n1 - n0) * (size - n1)


def scaling(model: Path, sizes: list[int], data: dict[str, Path], keys: list[str]) -> dict:
    """Time and peak RSS of calibration+conversion against the number of calibration images."""
    import psutil

    results: dict[str, dict[int, dict]] = {}
    for key in keys:
        config, points = CONFIGS[key], {}
        for size in sizes:
            guess = predicted_rss(points, size) if config.tool == "ort" else None
            available = psutil.virtual_memory().available
            if guess is not None and guess * 1.25 + 2 * 2**30 > available:
                points[size] = {
                    "skipped": f"predicted {mib(guess)} MiB, {mib(available)} MiB available"
                }
                print(f"  scaling {key} {size}: skipped ({points[size]['skipped']})", flush=True)
                continue
            output = OUT / f"scaling_{key}_{size}.onnx"
            points[size] = quantize(model, config, data[f"calib{size}"], output)
            output.unlink(missing_ok=True)
            print(f"  scaling {key} {size}: {brief(points[size])}", flush=True)
        results[key] = points
    return results


def brief(result: dict) -> str:
    """One line for progress output."""
    if "error" in result:
        return f"FAILED: {result['error']}"
    return f"{result['seconds']:.1f} s, peak RSS {mib(result['peak_rss'])} MiB"


# --------------------------------------------------------------------------- report


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def model_table(name: str, record: dict) -> str:
    """One row per configuration: fidelity, cost, size, speed."""
    fp32 = record["fp32"]
    lat = record["latency"]
    headers = [
        "configuration",
        "accuracy %",
        "Δ acc (pts)",
        "top-1 agree %",
        "calib+convert s",
        "peak RSS MiB",
        "size KiB",
        "size / fp32 folded",
        "size / fp32 BN-kept",
        "b1 ms",
        "b1 speed-up",
        "b64 ms",
        "b64 speed-up",
    ]

    def speed(path: str, batch: str) -> tuple[str, str]:
        table = lat.get(batch, {})
        if path not in table or fp32["path"] not in table:
            return "-", "-"
        ms = table[path]["median_ms"]
        return f"{ms:.2f}", f"{table[fp32['path']]['median_ms'] / ms:.2f}x"

    rows = [
        [
            "fp32 (BN folded)",
            pct(fp32["accuracy"]),
            "",
            "",
            "",
            "",
            f"{fp32['bytes'] / 1024:,.0f}",
            "1.00",
            f"{fp32['bytes'] / fp32['exported_bytes']:.2f}",
            *(x for b in ("1", "64") for x in (speed(fp32["path"], b)[0], "1.00x")),
        ]
    ]
    for key, result in record["configs"].items():
        label = CONFIGS[key].label
        if "error" in result:
            rows.append([label, f"failed: {result['error']}", *[""] * (len(headers) - 2)])
            continue
        b1, b64 = speed(result["path"], "1"), speed(result["path"], "64")
        rows.append(
            [
                label,
                pct(result["accuracy"]),
                f"{100 * (result['accuracy'] - fp32['accuracy']):+.2f}",
                pct(result["agreement"]),
                f"{result['seconds']:.1f}",
                mib(result["peak_rss"]),
                f"{result['bytes'] / 1024:,.0f}",
                f"{result['bytes'] / fp32['bytes']:.2f}",
                f"{result['bytes'] / fp32['exported_bytes']:.2f}",
                b1[0],
                b1[1],
                b64[0],
                b64[1],
            ]
        )
    return f"#### {name}\n\n" + markdown_table(headers, rows)


def scaling_table(results: dict) -> str:
    """Seconds and peak RSS against the number of calibration images."""
    headers = [
        "configuration",
        "images",
        "calib+convert s",
        "peak RSS MiB",
        "RSS vs smallest",
        "RSS after imports MiB",
    ]
    rows = []
    for key, points in results.items():
        first = next((p["peak_rss"] for p in points.values() if "peak_rss" in p), None)
        for size, p in points.items():
            if "peak_rss" not in p:
                reason = p.get("error") or p.get("skipped")
                rows.append([CONFIGS[key].label, size, f"not run: {reason}", "", "", ""])
                continue
            ratio = f"{p['peak_rss'] / first:.2f}" if first else "-"
            rows.append(
                [
                    CONFIGS[key].label,
                    size,
                    f"{p['seconds']:.1f}",
                    mib(p["peak_rss"]),
                    ratio,
                    mib(p["import_rss"]),
                ]
            )
    return markdown_table(headers, rows)


def check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def target_rows(report: dict) -> list[list[str]]:
    """Issue #3's targets with the measured value and whether each is met."""
    rows: list[list[str]] = []
    models = report["models"]
    for name, record in models.items():
        fp32 = record["fp32"]
        for key in (DEFAULT_CONFIG, *[k for k in HISTOGRAM_CONFIGS if k != DEFAULT_CONFIG]):
            result = record["configs"].get(key)
            if not result or "error" in result:
                continue
            delta = 100 * (result["accuracy"] - fp32["accuracy"])
            rows.append(
                [
                    f"{name}, {CONFIGS[key].label}: top-1 agreement >= 99.0 %",
                    f"{pct(result['agreement'])} %",
                    check(result["agreement"] >= 0.99),
                ]
            )
            rows.append(
                [
                    f"{name}, {CONFIGS[key].label}: accuracy within 0.2 pts of fp32",
                    f"{delta:+.2f} pts",
                    check(abs(delta) <= 0.2 or delta > 0),
                ]
            )
        ort_minmax = [
            r for k, r in record["configs"].items() if k.startswith("ort-minmax") and "seconds" in r
        ]
        if ort_minmax:
            ref_s = min(r["seconds"] for r in ort_minmax)
            ref_rss = min(r["peak_rss"] for r in ort_minmax)
            for key in HISTOGRAM_CONFIGS:
                result = record["configs"].get(key)
                if not result or "error" in result:
                    continue
                rows.append(
                    [
                        f"{name}, {CONFIGS[key].label}: time and peak RSS <= ORT MinMax "
                        f"({ref_s:.1f} s, {mib(ref_rss)} MiB)",
                        f"{result['seconds']:.1f} s, {mib(result['peak_rss'])} MiB",
                        check(result["seconds"] <= ref_s and result["peak_rss"] <= ref_rss),
                    ]
                )
    for key, points in report.get("scaling", {}).get("results", {}).items():
        if CONFIGS[key].tool != "onnxcomp":
            continue
        rss = {n: p["peak_rss"] for n, p in points.items() if "peak_rss" in p}
        if len(rss) >= 2:
            lo, hi = min(rss), max(rss)
            growth = rss[hi] / rss[lo] - 1
            rows.append(
                [
                    f"{report['scaling']['model']}, {CONFIGS[key].label}: peak RSS flat "
                    f"(within 10 %) from {lo} to {hi} images",
                    f"{100 * growth:+.1f} %",
                    check(growth <= 0.10),
                ]
            )
    for name, record in models.items():
        lat, fp32 = record["latency"], record["fp32"]
        default = record["configs"].get(DEFAULT_CONFIG, {})
        if "path" not in default:
            continue
        for batch, goal in (("64", 2.5), ("1", 2.0)):
            table = lat.get(batch, {})
            if default["path"] not in table or fp32["path"] not in table:
                continue
            ours = table[default["path"]]["median_ms"]
            ratio = table[fp32["path"]]["median_ms"] / ours
            if name == "resnet56":
                rows.append(
                    [
                        f"{name}, batch {batch}: int8 ({CONFIGS[DEFAULT_CONFIG].label}) >= "
                        f"{goal}x faster than fp32",
                        f"{ratio:.2f}x",
                        check(ratio >= goal),
                    ]
                )
            ort = [
                (table[r["path"]]["median_ms"], CONFIGS[k].label)
                for k, r in record["configs"].items()
                if CONFIGS[k].tool == "ort" and r.get("path") in table
            ]
            if ort:
                best_ms, best = min(ort)
                rows.append(
                    [
                        f"{name}, batch {batch}: faster than ORT's fastest ({best}, "
                        f"{best_ms:.2f} ms)",
                        f"{ours:.2f} ms",
                        check(ours < best_ms),
                    ]
                )
        rows.append(
            [
                f"{name}: int8 file <= 30 % of the BN-folded fp32 file",
                f"{100 * default['bytes'] / fp32['bytes']:.1f} % "
                f"({100 * default['bytes'] / fp32['exported_bytes']:.1f} % of the BN-kept export)",
                check(default["bytes"] <= 0.30 * fp32["bytes"]),
            ]
        )
    return rows


def render(report: dict) -> str:
    """The markdown section for BENCHMARKS.md."""
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    parts = [
        "## int8: onnxcomp vs onnxruntime.quantization on CIFAR ResNet-20/56 (issue #3)",
        "",
        f"Run {env['date']} with `{env['command']}` ({report['wall_s'] / 60:.1f} min); "
        f"{env['cpu']['cpu']}, {env['cpu']['cores']} logical cores "
        f"({', '.join(env['cpu']['int8_features']) or 'no VNNI'}), "
        f"{env['cpu']['memory_gib']} GiB; Python {env['cpu']['python']}, {versions}. "
        f"Load average (1/5/15 min) at start {env['load_start']}, before latency "
        f"{env.get('load_latency', '-')}, at end {env.get('load_end', '-')}.",
        "",
        f"Calibration: {report['calib_size']} training images (seeded, balanced over classes); "
        f"evaluation: {report['test_images']:,} test images. onnxcomp converts the BN-kept export "
        "(its time includes cleanup and BatchNorm folding); ORT quantizes the BN-folded fp32 "
        "model (`quantize_static`, QDQ, per-channel int8 weights). Sizes are relative to the "
        "BN-folded fp32 file; the BN-kept export is the last size column. Speed-ups are fp32 "
        f"median latency / int8 median latency, {THREADS} intra-op threads, ORT_ENABLE_ALL, "
        f"{report['latency_rounds']} rounds.",
        "",
    ]
    for name, record in report["models"].items():
        parts += [model_table(name, record), ""]
    if report.get("scaling"):
        parts += [
            f"#### Calibration cost against the number of images ({report['scaling']['model']})",
            "",
            "Each point is a fresh process; peak RSS includes the interpreter and libraries "
            "(the baseline after imports is in the JSON as `import_rss`).",
            "",
            scaling_table(report["scaling"]["results"]),
            "",
        ]
    parts += [
        "#### Issue #3 targets",
        "",
        markdown_table(["target", "measured", "status"], target_rows(report)),
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20, 2,000 test images")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="models to run")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="configurations")
    parser.add_argument("--test-limit", type=int, help="test images (seeded random subset)")
    parser.add_argument("--calib-size", type=int, default=512, help="calibration images")
    parser.add_argument("--rounds", type=int, help="latency rounds (default 5, quick 2)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the memory sweep")
    parser.add_argument("--no-markdown", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models = args.models or ["resnet20"]
        args.test_limit = args.test_limit or 2000
        args.rounds = args.rounds or 2
        args.no_markdown = True
    args.models = args.models or list(MODELS)
    args.configs = args.configs or list(CONFIGS)
    args.rounds = args.rounds or 5
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    started = time.perf_counter()
    report: dict = {
        "environment": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["benchmarks/int8_cifar.py", *(argv or sys.argv[1:])]),
            "cpu": cpu_description(),
            "versions": package_versions(["onnxruntime", "onnx", "onnx-ir", "numpy", "torch"]),
            "load_start": load_average(),
        },
        "calib_size": args.calib_size,
        "latency_rounds": args.rounds,
        "models": {},
    }
    scale_sizes = [128, 512] if args.quick else [128, 512, 2048]
    sizes = sorted({args.calib_size, *([] if args.no_scaling else scale_sizes)})
    print("preparing data and models ...", flush=True)
    data = prepare_data(sizes)
    files = prepare_models(args.models)
    images, labels = load_test(data["test"], args.test_limit)
    report["test_images"] = len(labels)

    for name in args.models:
        fp32 = files[name]["fp32"]
        ref = predictions(fp32, images)
        record = {
            "fp32": {
                "path": str(fp32),
                "bytes": fp32.stat().st_size,
                "exported_bytes": files[name]["exported"].stat().st_size,
                "accuracy": float((ref == labels).mean()),
            },
            "configs": {},
        }
        print(f"{name}: fp32 accuracy {pct(record['fp32']['accuracy'])} %", flush=True)
        for key in args.configs:
            config = CONFIGS[key]
            source = files[name]["exported"] if config.tool == "onnxcomp" else fp32
            output = OUT / f"{name}_{key}.onnx"
            result = quantize(source, config, data[f"calib{args.calib_size}"], output)
            if "error" not in result:
                top1 = predictions(output, images)
                result.update(
                    path=str(output),
                    accuracy=float((top1 == labels).mean()),
                    agreement=float((top1 == ref).mean()),
                )
                print(
                    f"  {config.label}: {brief(result)}, accuracy {pct(result['accuracy'])} %, "
                    f"agreement {pct(result['agreement'])} %",
                    flush=True,
                )
            else:
                print(f"  {config.label}: {brief(result)}", flush=True)
            record["configs"][key] = result
        report["models"][name] = record

    if not args.no_scaling:
        model = "resnet56" if "resnet56" in args.models else args.models[0]
        print(f"calibration scaling on {model} ...", flush=True)
        keys = [k for k in SCALING_CONFIGS if k in CONFIGS]
        # onnxcomp reads the BN-kept export; ORT the folded model (as in the main table).
        results = {}
        for key in keys:
            source = files[model]["exported" if CONFIGS[key].tool == "onnxcomp" else "fp32"]
            results.update(scaling(source, scale_sizes, data, [key]))
        report["scaling"] = {"model": model, "results": results}

    report["environment"]["load_latency"] = load_average()
    for name, record in report["models"].items():
        paths = [Path(record["fp32"]["path"])] + [
            Path(r["path"]) for r in record["configs"].values() if "path" in r
        ]
        record["latency"] = {}
        for batch in (1, 64):
            print(f"{name}: latency at batch {batch} ({len(paths)} models) ...", flush=True)
            seconds = 0.4 if args.quick else 0.5
            record["latency"][str(batch)] = latency(
                paths, data["test"], batch, args.rounds, seconds
            )

    report["environment"]["load_end"] = load_average()
    report["wall_s"] = time.perf_counter() - started
    name = "int8_cifar_quick.json" if args.quick else "int8_cifar.json"
    (BENCH_OUT / name).write_text(json.dumps(report, indent=2))
    text = render(report)
    print("\n" + text)
    if not args.no_markdown:
        replace_section(ROOT / "BENCHMARKS.md", SECTION, text)
        print(f"\nwrote {ROOT / 'BENCHMARKS.md'} and {BENCH_OUT / name}")


if __name__ == "__main__":
    main()
