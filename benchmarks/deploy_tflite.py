"""TFLite export of CIFAR ResNet-20 (and MobileNetV2-CIFAR): fidelity, accuracy, size, latency.

Run from the repository root (not a test; needs ai-edge-litert, torch, ../shared/data)::

    .venv/bin/python benchmarks/deploy_tflite.py [--models resnet20 mobilenetv2] [--eval 2000]

Per model: export to ONNX, onnxcomp int8 (default calibrator, 512 test images after the
evaluated ones, its calibration table kept), fp32 and int8 ``.tflite`` written by
``onnxcomp.deploy.tflite`` (the int8 one gets the table's ranges for the float logits).
Measured on the first ``--eval`` CIFAR-10 test images: fp32 .tflite max relative error vs ORT,
top-1 agreement int8 .tflite vs the int8 ONNX, accuracies, file sizes; latency at batch 1 of
the TFLite interpreter (2 threads) vs ORT (2 threads), rounds alternating, medians, with the
load average. Raw numbers go to ``bench_out/deploy_tflite.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BENCH_OUT, SHARED_DATA, load_average

THREADS = 2
OUT = BENCH_OUT / "deploy_tflite"
CIFAR = Path("/work/main/bench_out/cifar10_test.npz")


def build_onnx(name: str, path: Path) -> None:
    import torch

    from onnxcomp.export import export_torch

    torch.set_num_threads(1)
    if name == "resnet20":
        from models.resnet_cifar import load_pretrained

        module = load_pretrained(20, SHARED_DATA)
    else:
        from models.zoo import build

        module = build("mobilenetv2_cifar", SHARED_DATA)
    export_torch(module, path)


def quantize(fp32: Path, int8: Path, calib: np.ndarray, table: Path) -> None:
    from onnxcomp.converter.convert import convert
    from onnxcomp.converter.pipeline import PipelineOptions
    from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
    from onnxcomp.data.batches import DataOptions

    calib_path = OUT / "calib.npy"
    np.save(calib_path, calib)
    options = PipelineOptions(int8=QuantizeConfig(calib_cache=table))
    convert(
        fp32, int8, options, verify=None, calibration=DataOptions(data=calib_path, batch_size=32)
    )


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    from onnxcomp.backends.base import SessionConfig
    from onnxcomp.backends.ort import ORT

    session = ORT.create_session(path, SessionConfig(intra_op_threads=THREADS))
    return np.concatenate(
        [session.run({"input": x[i : i + 250]})[0] for i in range(0, len(x), 250)]
    )


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    from onnxcomp.backends.base import SessionConfig
    from onnxcomp.backends.tflite import TFLITE

    session = TFLITE.create_session(path, SessionConfig(intra_op_threads=THREADS))
    nhwc = x.transpose(0, 2, 3, 1)
    return np.concatenate(
        [session.run({"input": nhwc[i : i + 250]})[0] for i in range(0, len(x), 250)]
    )


def latency(paths: dict[str, Path], x: np.ndarray, rounds: int = 5, seconds: float = 1.5) -> dict:
    from onnxcomp.backends.base import SessionConfig, time_ms
    from onnxcomp.backends.registry import backend_for_path

    samples: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        keys = list(paths)[r % len(paths) :] + list(paths)[: r % len(paths)]
        for key in keys:
            path = paths[key]
            session = backend_for_path(path).create_session(
                path, SessionConfig(intra_op_threads=THREADS)
            )
            feed = x[:1].transpose(0, 2, 3, 1) if path.suffix == ".tflite" else x[:1]
            call = session.runner({session.input_names[0]: np.ascontiguousarray(feed)})
            for _ in range(5):
                call()
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end or len(times) < 10:
                times.append(time_ms(call))
            samples[key].append(float(np.median(times)))
            del session, call
    return {k: float(np.median(v)) for k, v in samples.items()}


def measure(name: str, images: np.ndarray, labels: np.ndarray, calib: np.ndarray) -> dict:
    import onnx_ir as ir

    from onnxcomp.converter.quantize.table import CalibrationTable
    from onnxcomp.deploy.tflite import write_tflite

    fp32, int8, table = OUT / f"{name}.onnx", OUT / f"{name}_int8.onnx", OUT / f"{name}.calib.json"
    build_onnx(name, fp32)
    quantize(fp32, int8, calib, table)
    ranges = {k: (r.low, r.high) for k, r in CalibrationTable.load(table).ranges.items()}
    fp32_tfl, int8_tfl = OUT / f"{name}.tflite", OUT / f"{name}_int8.tflite"
    notes = write_tflite(ir.load(str(fp32)), fp32_tfl)
    notes += write_tflite(ir.load(str(int8)), int8_tfl, ranges=ranges)
    ref, q_onnx = run_ort(fp32, images), run_ort(int8, images)
    tfl, q_tfl = run_tflite(fp32_tfl, images), run_tflite(int8_tfl, images)
    outputs = {"fp32_onnx": ref, "fp32_tflite": tfl, "int8_onnx": q_onnx, "int8_tflite": q_tfl}
    acc = {k: float((v.argmax(1) == labels).mean()) for k, v in outputs.items()}
    paths = {"fp32_onnx": fp32, "fp32_tflite": fp32_tfl, "int8_onnx": int8, "int8_tflite": int8_tfl}
    load_before = load_average()
    lat = latency(paths, images)
    return {
        "model": name,
        "images": len(images),
        "fp32_tflite_max_rel_error_vs_ort": float(np.abs(tfl - ref).max() / np.abs(ref).max()),
        "int8_tflite_top1_agreement_vs_int8_onnx": float(
            (q_tfl.argmax(1) == q_onnx.argmax(1)).mean()
        ),
        "int8_tflite_max_abs_diff_vs_int8_onnx": float(np.abs(q_tfl - q_onnx).max()),
        "accuracy": acc,
        "bytes": {k: os.path.getsize(p) for k, p in paths.items()},
        "latency_ms_batch1_2threads": lat,
        "loadavg": [load_before, load_average()],
        "notes": notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--eval", type=int, default=2000)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    data = np.load(CIFAR)
    images, labels = data["input"].astype(np.float32), data["labels"]
    evaluated = images[: args.eval]
    calib = images[args.eval : args.eval + 512]
    results = [measure(m, evaluated, labels[: args.eval], calib) for m in args.models]
    (BENCH_OUT / "deploy_tflite.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
