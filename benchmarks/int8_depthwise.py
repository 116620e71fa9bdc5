"""int8 on a depthwise network: where per-tensor weights and MinMax ranges lose, and what
cross-layer equalization and bias correction recover. Results go into BENCHMARKS.md.

Needs the MobileNetV2-style CIFAR model trained by ``benchmarks/train_mobilenetv2.py``
(``bench_out/mobilenetv2_cifar_w0.5.onnx``) and the arrays ``benchmarks/int8_cifar.py``
prepares (``bench_out/cifar10_calib512.npz``, ``bench_out/cifar10_test.npz``).

    .venv/bin/python benchmarks/int8_depthwise.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BENCH_OUT, ROOT, markdown_table, replace_section
from onnxcomp.converter.convert import convert
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
from onnxcomp.converter.verify import VerifyOptions
from onnxcomp.data.batches import DataOptions

MODEL = BENCH_OUT / "mobilenetv2_cifar_w0.5.onnx"
CALIB = BENCH_OUT / "cifar10_calib512.npz"
TEST = BENCH_OUT / "cifar10_test.npz"

# label -> (equalize, QuantizeConfig keyword arguments)
VARIANTS: dict[str, tuple[str | None, dict]] = {
    "per-tensor, minmax": (None, {"per_channel": False, "calibration": "minmax"}),
    "per-tensor, minmax, +BC": (
        None,
        {"per_channel": False, "calibration": "minmax", "bias_correction": True},
    ),
    "per-tensor, minmax, CLE(relu6)": ("relu6", {"per_channel": False, "calibration": "minmax"}),
    "per-tensor, minmax, CLE(relu6) +BC": (
        "relu6",
        {"per_channel": False, "calibration": "minmax", "bias_correction": True},
    ),
    "per-channel, minmax": (None, {"calibration": "minmax"}),
    "per-channel, minmax, +BC": (None, {"calibration": "minmax", "bias_correction": True}),
    "per-channel, default": (None, {}),
    "per-channel, default, +BC": (None, {"bias_correction": True}),
    "per-tensor, default, +BC": (None, {"per_channel": False, "bias_correction": True}),
}


def run(label: str, equalize: str | None, config: dict, limit: int | None) -> dict:
    out = BENCH_OUT / "depthwise" / (label.replace(" ", "_").replace(",", "") + ".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = convert(
        MODEL,
        out,
        PipelineOptions(equalize=equalize, int8=QuantizeConfig(**config)),
        VerifyOptions(data=TEST, limit=limit, batch_size=500),
        force=True,
        calibration=DataOptions(data=CALIB, batch_size=32),
    )
    fidelity = report.fidelity
    return {
        "label": label,
        "agreement": fidelity.top1_agreement,
        "fp32_accuracy": fidelity.reference_accuracy,
        "int8_accuracy": fidelity.candidate_accuracy,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    for path in (MODEL, CALIB, TEST):
        if not path.exists():
            sys.exit(f"{path} is missing: run benchmarks/train_mobilenetv2.py and int8_cifar.py")
    rows = []
    for label, (equalize, config) in VARIANTS.items():
        row = run(label, equalize, config, args.limit)
        print(json.dumps(row), flush=True)
        rows.append(row)
    (BENCH_OUT / "int8_depthwise.json").write_text(json.dumps(rows, indent=2) + "\n")
    fp32 = rows[0]["fp32_accuracy"]
    table = markdown_table(
        ["configuration", "top-1 agreement %", "int8 accuracy %", "vs fp32 (pts)"],
        [
            [
                r["label"],
                f"{100 * r['agreement']:.2f}",
                f"{100 * r['int8_accuracy']:.2f}",
                f"{100 * (r['int8_accuracy'] - fp32):+.2f}",
            ]
            for r in rows
        ],
    )
    body = (
        f"MobileNetV2-style CIFAR network (width 0.5, depthwise 3x3, ReLU6, residual Adds), "
        f"trained here for 3 epochs by `benchmarks/train_mobilenetv2.py`; fp32 accuracy "
        f"{100 * fp32:.2f}% on the {args.limit or '10,000'} test JPEGs; "
        "512 calibration images; U8S8. BC = bias correction, CLE(relu6) = ReLU6 replaced by "
        "ReLU where it joins a pair, then cross-layer equalization (lossy: agreement is "
        "against the original ReLU6 model).\n\n" + table
    )
    print(body)
    if not args.no_markdown:
        replace_section(ROOT / "BENCHMARKS.md", "depthwise", body)


if __name__ == "__main__":
    main()
