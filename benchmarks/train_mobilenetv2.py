"""Train the MobileNetV2-CIFAR reference network on the CIFAR-10 JPEGs, on CPU, in minutes.

The network (``models.mobilenetv2_cifar``, width 0.5 by default) is the depthwise model on
which per-tensor int8 weights and plain MinMax ranges break; the int8 benchmarks use it to
show what per-channel weights, cross-layer equalization and bias correction recover.

The JPEG archives are extracted and decoded once into ``<cache>/{train,test}.npz`` (uint8,
N x 32 x 32 x 3), outside the tracked files. Inputs are pixel/255 normalised with the ImageNet
mean and std (onnxcomp's ``cifar10`` preprocessing preset). Writes to ``--out``:
``mobilenetv2_cifar_w<width>.pt`` (state dict), ``mobilenetv2_cifar_w<width>.onnx``
(BatchNorm kept, dynamic batch) and ``mobilenetv2_cifar_w<width>.json`` (accuracy, time).

    nice -n 10 .venv/bin/python benchmarks/train_mobilenetv2.py --epochs 3
    nice -n 10 .venv/bin/python benchmarks/train_mobilenetv2.py --int8-table

``--int8-table`` skips training and measures the saved export in int8 (plain MinMax ranges
from ``--calib`` training images): per-channel vs per-tensor weights, with and without
cross-layer equalization (exact, and after replacing ReLU6 by ReLU) and bias correction,
as top-1 accuracy and top-1 agreement with the float model; it writes ``<stem>_int8.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/cifar10")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def decode_archive(archive: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 NHWC) and labels of a ``split/class/xxxx.jpg`` archive, cached as npz."""
    from PIL import Image

    target = cache / f"{archive.name.split('_')[0]}.npz"
    if target.exists():
        data = np.load(target)
        return data["images"], data["labels"]
    images: list[np.ndarray] = []
    names: list[str] = []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            images.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
            names.append(parts[1])
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names], np.int64)
    stacked = np.stack(images)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(target, images=stacked, labels=labels, classes=np.array(classes))
    return stacked, labels


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, pixel/255 with the ImageNet mean and std."""
    x = images.astype(np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(0, 3, 1, 2).copy()


def augment(batch, generator):
    """Random crop (padding 4) and horizontal flip of a float NCHW torch batch."""
    import torch

    n = batch.shape[0]
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()
    out = padded[:, :, dy : dy + 32, dx : dx + 32].clone()
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(torch.from_numpy(x[i : i + batch]))
            correct += int((logits.argmax(1).numpy() == y[i : i + batch]).sum())
    return correct / len(x)


def train(args: argparse.Namespace) -> dict[str, float]:
    """Train, evaluate, save the checkpoint and the ONNX export; returns the summary."""
    import torch

    sys.path.insert(0, str(ROOT))
    from models.mobilenetv2_cifar import mobilenetv2_cifar
    from onnxcomp.export import export_torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train_images, train_labels = decode_archive(DATA / "train_jpg.tar.gz", args.cache)
    test_images, test_labels = decode_archive(DATA / "test_jpg.tar.gz", args.cache)
    if args.limit:
        train_images, train_labels = train_images[: args.limit], train_labels[: args.limit]
        test_images, test_labels = test_images[: args.limit], test_labels[: args.limit]
    if args.subset:  # the archive is sorted by class: a seeded random subset, not the first N
        keep = np.random.default_rng(args.seed).permutation(len(train_images))[: args.subset]
        train_images, train_labels = train_images[keep], train_labels[keep]
    x_train, x_test = normalise(train_images), normalise(test_images)
    print(f"data: {len(x_train)} train, {len(x_test)} test ({time.perf_counter() - start:.0f} s)")

    model = mobilenetv2_cifar(width_mult=args.width)
    steps = args.epochs * (len(x_train) // args.batch)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=4e-5
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.25
    )
    generator = torch.Generator().manual_seed(args.seed)
    train_start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator).numpy()
        total, seen = 0.0, 0
        for i in range(len(x_train) // args.batch):
            idx = order[i * args.batch : (i + 1) * args.batch]
            batch = augment(torch.from_numpy(x_train[idx]), generator)
            loss = torch.nn.functional.cross_entropy(
                model(batch), torch.from_numpy(train_labels[idx]), label_smoothing=0.1
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            if (i + 1) % 100 == 0:
                print(f"  step {i + 1}: loss {total / seen:.3f}", flush=True)
        minutes = (time.perf_counter() - train_start) / 60
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total / seen:.3f} ({minutes:.1f} min)",
            flush=True,
        )
    train_minutes = (time.perf_counter() - train_start) / 60
    test_acc = accuracy(model, x_test, test_labels)
    print(f"test accuracy {test_acc:.4f} after {train_minutes:.1f} min of training")

    stem = f"mobilenetv2_cifar_w{args.width:g}"
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / f"{stem}.pt")
    export_torch(model, args.out / f"{stem}.onnx", keep_batchnorm=True)
    summary = {
        "width_mult": args.width,
        "epochs": args.epochs,
        "batch": args.batch,
        "threads": args.threads,
        "train_images": len(x_train),
        "train_minutes": round(train_minutes, 2),
        "test_accuracy": test_acc,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def predictions(model, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Top-1 classes of an ONNX model (ModelProto) over ``x``."""
    session = _session(model)
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: x[i : i + batch]})[0].argmax(1) for i in range(0, len(x), batch)]
    )


def evaluate_int8(args: argparse.Namespace) -> list[dict[str, object]]:
    """int8 top-1 on the test set: per-channel vs per-tensor weights, plain MinMax ranges,
    with and without cross-layer equalization and bias correction."""
    import onnx
    import onnx_ir as ir

    sys.path.insert(0, str(ROOT))
    from onnxcomp.converter.equalize.equalize_pass import EqualizePass, EqualizeRelu6Pass
    from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
    from onnxcomp.converter.quantize.bias_correction import (
        bias_correction_inputs,
        correct_bias,
        float_weights,
    )
    from onnxcomp.converter.quantize.calibrators import TensorRange
    from onnxcomp.converter.quantize.qdq import QdqSettings, place_qdq, tensors_to_calibrate
    from onnxcomp.stats.collector import collect_statistics

    stem = f"mobilenetv2_cifar_w{args.width:g}"
    train_images, _ = decode_archive(DATA / "train_jpg.tar.gz", args.cache)
    test_images, labels = decode_archive(DATA / "test_jpg.tar.gz", args.cache)
    pick = np.random.default_rng(0).choice(len(train_images), args.calib, replace=False)
    if args.limit:
        test_images, labels = (
            test_images[:: len(test_images) // args.limit],
            labels[:: len(labels) // args.limit],
        )
    calib, x_test = normalise(train_images[pick]), normalise(test_images)
    folded = (
        Pipeline.from_options(PipelineOptions())
        .run(ir.from_proto(onnx.load(args.out / f"{stem}.onnx")))
        .model
    )
    reference = predictions(ir.to_proto(folded), x_test)

    def variant(cls, iterations: int = 50) -> tuple[ir.Model, str]:
        model = ir.from_proto(ir.to_proto(folded))
        return model, cls(max_iterations=iterations)(model).record.summary

    variants = {
        "folded float": (ir.from_proto(ir.to_proto(folded)), ""),
        "CLE (ReLU6 kept)": variant(EqualizePass),
        "ReLU6->ReLU": variant(EqualizeRelu6Pass, 0),
        "ReLU6->ReLU + CLE": variant(EqualizeRelu6Pass),
    }
    rows: list[dict[str, object]] = []
    for label, (model, summary) in variants.items():
        proto = ir.to_proto(model)
        names = tensors_to_calibrate(proto)
        batches = (({"input": calib[i : i + 128]}, None) for i in range(0, len(calib), 128))
        stats = collect_statistics(
            model, names, batches, channel_mean_names=bias_correction_inputs(proto)
        )
        ranges = {
            n: TensorRange(min(h.min, 0.0), max(h.max, 0.0)) for n, h in stats.histograms.items()
        }
        means = {n: m.mean for n, m in stats.channel_means.items()}
        float_pred = predictions(proto, x_test)
        row: dict[str, object] = {
            "model": label,
            "equalize": summary,
            "float acc": float((float_pred == labels).mean()),
        }
        for per_channel in (True, False):
            qdq = place_qdq(proto, ranges, QdqSettings(per_channel=per_channel))
            kind = "per-channel" if per_channel else "per-tensor"
            for corrected in (False, True):
                if corrected:
                    correct_bias(qdq, float_weights(proto), means)
                pred = predictions(qdq, x_test)
                key = f"{kind}{' +BC' if corrected else ''}"
                row[f"{key} acc"] = float((pred == labels).mean())
                row[f"{key} agree"] = float((pred == reference).mean())
        print(json.dumps(row))
        rows.append(row)
    (args.out / f"{stem}_int8.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="use N images (smoke test)")
    parser.add_argument(
        "--subset", type=int, default=0, help="train on N seeded random training images"
    )
    parser.add_argument(
        "--int8-table", action="store_true", help="skip training: int8 table of the saved export"
    )
    parser.add_argument("--calib", type=int, default=512, help="calibration images (int8 table)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench_out" / "cifar10")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.int8_table:
        evaluate_int8(arguments)
    else:
        print(json.dumps(train(arguments), indent=2))
