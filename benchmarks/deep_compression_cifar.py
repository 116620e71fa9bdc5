"""Deep Compression stages on CIFAR ResNet-20 (real checkpoint), no fine-tuning.

Rows: magnitude pruning (--sparsity, layer and global scope), k-means weight sharing
(--weight-sharing K), both; accuracy on 1,000 CIFAR-10 test images (seeded subset of
bench_out/cifar10_test.npz), the .onnx file size, the size with pruned weights as ONNX
sparse_initializer (ORT's outputs on it checked equal to the dense zeroed model's), and the
size the weights would take as K-value indices (log2 K bits each, plus the codebooks): the
archive's job (onnxcomp/storage/), given here for scale only.

Run: python -m benchmarks.deep_compression_cifar  (ORT only, 2 threads)

``--model resnet56 --archive`` (or resnet20): the rows with the ``onnxcomp pack`` archive
instead: fp32, sparsity 0.5 (layer), K=16, K=32, 0.7 + K=32, int4 weights nearest and GPTQ
(512 calibration images): top-1 on the same 1,000 images, .onnx and .ocpk bytes; ResNet-56
is exported from /work/shared/data/pretrained/resnet56.th once (BatchNorm kept; convert folds
it). ``--threads 1`` for ORT's sessions. First run (1 thread, load average 4.1-4.7), top-1 /
.ocpk bytes (ratio vs the BN-folded fp32 .onnx): ResNet-20 fp32 80.3 % / 1,009,724 (1.1x);
0.5 layer 69.3 % / 538,622 (2.0x); K=16 72.7 % / 128,815 (8.5x); K=32 80.1 % / 149,704
(7.3x); 0.7 + K=32 29.9 % / 94,552 (11.6x); int4 nearest 77.2 % / 115,647 (9.5x), gptq
80.1 % / 116,182 (9.4x). ResNet-56 fp32 83.9 % / 3,195,593 (1.1x); 0.5 layer 76.9 % /
1,692,663 (2.0x); K=16 80.8 % / 379,435 (9.1x); K=32 82.7 % / 443,035 (7.8x); 0.7 + K=32
33.1 % / 283,990 (12.2x); int4 nearest 84.2 % / 343,479 (10.1x), gptq 84.1 % / 345,420 (10.0x).

``--model mobilenetv2 --checkpoint bench_out/dw/mobilenetv2_cifar_w0.5.pt``: the depthwise
MobileNetV2-CIFAR (width 0.5) that benchmarks/train_mobilenetv2.py trained (``--passes``
prints what each pass did and left alone). A 15-minute reference (32,000 images x 1 epoch,
45.8 % on the 10,000 test images; load average 1-5): fp32 44.9 % / 2,576,489 (1.1x); 0.5
layer 9.4 % / 1,389,665 (2.0x); K=16 40.5 % / 378,065 (7.5x); K=32 42.6 % / 429,460 (6.6x);
0.7 + K=32 9.4 % / 269,888 (10.5x); int4 nearest 42.6 % / 413,150 (6.8x), gptq 42.6 % /
414,382 (6.8x). Pruning alone kills it (logits no longer depend on the input); sharing and
int4 per channel lose ~2 points; the first Conv is left alone by every pass, the last Gemm
by int4 (as on the ResNets). ``--finetune --model mobilenetv2 --checkpoint ... --images 2560
--epochs 2 --lr 3e-3``: 0.7 + K=32 stays 9.4 % (8.9 % at lr 0.01), K=32 42.6 -> 42.4 %.

``--finetune``: the compressed students retrained with `onnxcomp finetune`'s job (KD from the
fp32 model; training/constraints.py keeps the zeros and trains each layer's codebook), then
top-1 on ``--test`` seeded test images and the ``onnxcomp pack`` archive size:
  python -m benchmarks.deep_compression_cifar --finetune --images 5000 --epochs 2 --lr 0.01

First run (load average 7.3 on 2 cores): fp32 80.3 %; sparsity 0.5 layer 69.3 % / global
43.1 %; 0.7 layer 29.1 % / global 12.6 % (so --sparsity-scope defaults to layer: BN-folded
layers have very different weight scales, one global threshold empties the small ones);
K=16 72.7 %, K=32 80.1 %; 0.7 layer + K=16 25.9 %, + K=32 29.9 %. Sparse-initializer files
1.11x (0.7 layer), 1.57x (0.7 global), ORT outputs identical to the dense zeroed model.
Without fine-tuning, pruning a 0.27 M-parameter ResNet-20 costs far more than on Han et
al.'s over-parameterised AlexNet/VGG.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx

from benchmarks.binarize_cifar import CALIB, FP32, TRAIN, accuracy, test_subset
from benchmarks.common import load_average, timed_training_job
from onnxcomp.backends.base import SessionConfig
from onnxcomp.converter.convert import convert
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.quantize import Int4Config
from onnxcomp.converter.share import SHARED_MARK, ShareConfig
from onnxcomp.converter.sparsify import SparsityConfig
from onnxcomp.core.proto import store_sparse

OUT = Path(__file__).resolve().parents[1] / "bench_out" / "deep_compression"
WIDTH = 0.5  # MobileNetV2-CIFAR width multiplier (train_mobilenetv2.py's default)
RUNS = {
    "sparsity 0.5 layer": dict(sparsity=SparsityConfig(0.5, "layer")),
    "sparsity 0.5 global": dict(sparsity=SparsityConfig(0.5, "global")),
    "sparsity 0.7 layer": dict(sparsity=SparsityConfig(0.7, "layer")),
    "sparsity 0.7 global": dict(sparsity=SparsityConfig(0.7, "global")),
    "sharing K=16": dict(sharing=ShareConfig(16)),
    "sharing K=32": dict(sharing=ShareConfig(32)),
    "sparsity 0.7 layer + K=16": dict(sparsity=SparsityConfig(0.7), sharing=ShareConfig(16)),
    "sparsity 0.7 layer + K=32": dict(sparsity=SparsityConfig(0.7), sharing=ShareConfig(32)),
}


ARCHIVE_RUNS = {
    "sparsity 0.5 layer": RUNS["sparsity 0.5 layer"],
    "sharing K=16": RUNS["sharing K=16"],
    "sharing K=32": RUNS["sharing K=32"],
    "sparsity 0.7 layer + K=32": RUNS["sparsity 0.7 layer + K=32"],
    "int4 nearest": dict(int4=Int4Config(rounding="nearest")),
    "int4 gptq": dict(int4=Int4Config(rounding="gptq")),
}


def fp32_model(name: str, checkpoint: Path | None = None) -> Path:
    """The fp32 ONNX of ``name``: ResNet-20 from bench_out/int8, others exported (BN kept).

    ResNet-56 is exported from the shared pretrained checkpoint once; ``mobilenetv2`` (the
    depthwise MobileNetV2-CIFAR, width ``WIDTH``) from ``checkpoint``, the state dict that
    benchmarks/train_mobilenetv2.py writes, again whenever the checkpoint is newer.
    """
    if name == "resnet20":
        return FP32
    if name == "mobilenetv2" and checkpoint is None:
        sys.exit("--model mobilenetv2 needs --checkpoint (train_mobilenetv2.py's .pt)")
    path = OUT / f"{name}_fp32.onnx"
    stale = checkpoint is not None and path.exists()
    if not path.exists() or (stale and checkpoint.stat().st_mtime > path.stat().st_mtime):
        import torch

        torch.set_num_threads(1)
        OUT.mkdir(parents=True, exist_ok=True)
        if name == "mobilenetv2":
            from models.mobilenetv2_cifar import mobilenetv2_cifar
            from onnxcomp.export import export_torch

            model = mobilenetv2_cifar(width_mult=WIDTH)
            model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
            export_torch(model.eval(), path, keep_batchnorm=True)
        else:
            from models.zoo import export_reference

            export_reference(
                name, path, keep_batchnorm=True, pretrained_dir=Path("/work/shared/data")
            )
    return path


def folded_size(fp32: Path, out: Path, session: SessionConfig = SessionConfig()) -> int:
    """Bytes of ``fp32`` converted losslessly (BatchNorm folded): the ratios' reference."""
    convert(fp32, out, PipelineOptions(), verify=None, force=True, session=session)
    return out.stat().st_size


def print_records(report) -> None:
    """Each pass's summary and the layers it left alone (with the pass's reason)."""
    for record in report.records:
        if not (record.modified or record.skipped):
            continue
        print(f"    {record.name}: {record.summary}")
        for skip in record.skipped:
            print(f"      left alone {skip.node}: {skip.reason}")


def archive_rows(args: argparse.Namespace) -> None:
    """Top-1, .onnx and .ocpk bytes of each ARCHIVE_RUNS row for ``args.model``."""
    from onnxcomp.data.batches import DataOptions
    from onnxcomp.storage.packed import pack

    OUT.mkdir(parents=True, exist_ok=True)
    fp32 = fp32_model(args.model, args.checkpoint)
    images, labels = test_subset(1000)
    session = SessionConfig(intra_op_threads=args.threads)
    calib = DataOptions(data=CALIB, limit=512, batch_size=32)
    fp32_size = folded_size(fp32, OUT / f"{args.model}_folded.onnx", session)
    print(f"{args.model}: fp32 (BN folded) {fp32_size:,} B; loadavg {load_average()}")
    print("| row | top-1 (1,000) | .onnx | .ocpk | ratio vs fp32 .onnx |")
    print("|---|---|---|---|---|")
    for name, options in [("fp32", {}), *ARCHIVE_RUNS.items()]:
        stem = name.replace(" ", "_").replace("+", "").replace("=", "")
        out = OUT / f"{args.model}_{stem}.onnx"
        data = calib if "int4" in options and options["int4"].rounding == "gptq" else None
        report = convert(
            fp32, out, PipelineOptions(**options), verify=None, force=True, session=session,
            calibration=data,
        )  # fmt: skip
        packed = pack(out, out.with_suffix(".ocpk")).packed_bytes
        acc = accuracy(out, images, labels, threads=args.threads)
        print(
            f"| {name} | {acc:.1%} | {out.stat().st_size:,} | {packed:,} | "
            f"{fp32_size / packed:.1f}x |",
            flush=True,
        )
        if args.passes:
            print_records(report)
    print("loadavg", load_average())


def index_bytes(model: onnx.ModelProto) -> int | None:
    """Bytes of the shared weights as log2(K)-bit indices plus float32 codebooks."""
    marks = {p.key: p.value for p in model.metadata_props}
    shared = json.loads(marks.get(SHARED_MARK, "{}"))
    if not shared:
        return None
    total = 0
    for init in model.graph.initializer:
        if init.name in shared:
            k = shared[init.name]
            total += math.ceil(math.prod(init.dims) * math.log2(k) / 8) + 4 * k
        else:
            total += len(init.raw_data) or 4 * math.prod(init.dims)
    return total


def sparse_file(dense: Path) -> tuple[int, float]:
    """Size of ``dense`` saved with sparse initializers, and ORT's max |difference| on it."""
    import onnxruntime as ort

    proto = onnx.load(dense)
    store_sparse(proto)
    path = dense.with_suffix(".sparse.onnx")
    onnx.save(proto, path)
    x = test_subset(1000)[0][:64]
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"input": x}
    )[0]
    return path.stat().st_size, float(np.abs(run(path) - run(dense)).max())


FINETUNE = {
    "sparsity 0.7 layer + K=32": RUNS["sparsity 0.7 layer + K=32"],
    "sparsity 0.7 layer": RUNS["sparsity 0.7 layer"],
    "sharing K=32": RUNS["sharing K=32"],
}


def finetune(args: argparse.Namespace) -> None:
    """Each chosen compressed student, before and after fine-tuning: top-1 and .ocpk size."""
    import torch

    from onnxcomp.storage.packed import pack
    from onnxcomp.training.job import JobOptions
    from onnxcomp.training.trainer import TrainConfig

    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    images, labels = test_subset(args.test)
    teacher = fp32_model(args.model, args.checkpoint)
    prefix = "" if args.model == "resnet20" else f"{args.model}_"
    fp32_size = folded_size(teacher, OUT / f"{prefix}ft_folded.onnx")
    print(f"{args.model} fp32 {accuracy(teacher, images, labels):.2%}, {fp32_size:,} B folded")
    for name in args.runs:
        stem = OUT / (f"{prefix}ft_" + name.replace(" ", "_").replace("+", "").replace("=", ""))
        student = stem.with_suffix(".onnx")
        convert(teacher, student, PipelineOptions(**FINETUNE[name]), verify=None, force=True)
        tuned = stem.with_name(stem.name + f"_lr{args.lr:g}.onnx")
        options = JobOptions(
            output=tuned,
            train=TrainConfig(
                epochs=args.epochs, lr=args.lr, weight_decay=args.wd, batch_size=64,
                device="cpu", augment=False, num_threads=1, seed=0,
            ),
            force=True,
            verify=False,
        )  # fmt: skip
        job = timed_training_job(student, teacher, options, args.images, TRAIN)
        report = job.report
        for label, path in (("no fine-tuning", student), ("fine-tuned", tuned)):
            packed = pack(path, path.with_suffix(".ocpk")).packed_bytes
            print(
                f"| {name}, {label} | {accuracy(path, images, labels):.2%} | {packed:,} | "
                f"{fp32_size / packed:.1f}x |"
            )
        losses = [round(s.loss, 4) for s in report.history]
        print(
            f"  {args.images} images x {args.epochs} epochs, lr {args.lr:g}, wd {args.wd:g}: "
            f"{job.seconds:.0f} s, loadavg {job.load_before} -> {job.load_after}; losses {losses}; "
            f"notes {report.notes}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune", action="store_true")
    parser.add_argument("--runs", nargs="+", default=list(FINETUNE)[:1], choices=list(FINETUNE))
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--wd", type=float, default=5e-4)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument(
        "--model", default="resnet20", choices=["resnet20", "resnet56", "mobilenetv2"]
    )
    parser.add_argument("--checkpoint", type=Path, help="mobilenetv2: the trained state dict")
    parser.add_argument("--passes", action="store_true", help="print each pass's report")
    parser.add_argument("--archive", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.finetune:
        finetune(args)
        return
    if args.archive:
        archive_rows(args)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    images, labels = test_subset(1000)
    fp32_size = FP32.stat().st_size
    rows = [("fp32", fp32_size, None, None, None, accuracy(FP32, images, labels))]
    for name, options in RUNS.items():
        out = OUT / (name.replace(" ", "_").replace("+", "").replace("=", "") + ".onnx")
        convert(FP32, out, PipelineOptions(**options), verify=None, force=True)
        sparse_size, diff = sparse_file(out)
        rows.append(
            (name, out.stat().st_size, sparse_size, diff, index_bytes(onnx.load(out)),
             accuracy(out, images, labels))
        )  # fmt: skip
    print("| model | .onnx | ratio | sparse_initializer .onnx | ratio | ORT max diff | "
          "K-index bytes | ratio | top-1 (1,000) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, size, sparse, diff, idx, acc in rows:
        cells = [name, f"{size:,}", f"{fp32_size / size:.2f}x"]
        cells += (
            [f"{sparse:,}", f"{fp32_size / sparse:.2f}x", f"{diff:.1e}"] if sparse else ["-"] * 3
        )
        cells += [f"{idx:,}", f"{fp32_size / idx:.2f}x"] if idx else ["-", "-"]
        cells.append(f"{acc:.1%}")
        print("| " + " | ".join(cells) + " |")
    print("loadavg", load_average(), file=sys.stderr)


if __name__ == "__main__":
    main()
