"""Distillation: a ResNet-20 student (random init) trained against the pretrained ResNet-56
teacher (fp32 ONNX) with cross-entropy only, KD, DKD and KD + attention transfer, at one budget.

Not a test: run it by hand with a stated budget (images, epochs) and read the JSON / the table.
Every method runs the same job as ``onnxcomp distill --student models.resnet_cifar:resnet20``
(`run_job`, the student exported from torch with the same seed, so all methods start from the
same weights), on the same balanced training subset, for the same epochs, batch and learning
rate. No augmentation, so the teacher's outputs are computed once per sample and cached.

The written students are scored in ONNX Runtime on a balanced test subset (every
``--eval-stride``-th image of the class-sorted test file): top-1 accuracy against the labels and
top-1 agreement with the teacher.

    python -m benchmarks.training_distill \
        --train bench_out/cifar10/train --test bench_out/cifar10_test.npz \
        --images 2000 --epochs 3 --threads 1

At a budget this small a from-scratch student is far from converged: the comparison between
methods is relative, not a statement of what each method reaches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import BENCH_OUT, SHARED_DATA, markdown_table, timed_training_job

OUT = BENCH_OUT / "training_distill"
STUDENT = "models.resnet_cifar:resnet20"
METHODS = ("ce", "kd", "dkd", "kd+at")
# Attention transfer: the end of each stage (ResNet-20: 3 blocks a stage, ResNet-56: 9), by the
# tensor names torch.onnx gives both exports.
AT_PAIRS = tuple(
    (f"/layer{k}/layer{k}.2/Relu_1_output_0", f"/layer{k}/layer{k}.8/Relu_1_output_0")
    for k in (1, 2, 3)
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None, help="ResNet-56 fp32 ONNX "
                        "(default: exported from the pretrained weights into --out)")  # fmt: skip
    parser.add_argument("--pretrained", type=Path, default=SHARED_DATA)
    parser.add_argument("--train", type=Path, default=BENCH_OUT / "cifar10" / "train")
    parser.add_argument("--test", type=Path, default=BENCH_OUT / "cifar10_test.npz")
    parser.add_argument("--images", type=int, default=2000, help="training images (balanced)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-stride", type=int, default=5,
                        help="every Nth test image (the file is sorted by class)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument(
        "--dkd-warmup", type=int, default=0, help="epochs of linear ramp of the DKD loss"
    )
    parser.add_argument("--method", action="append", choices=METHODS, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def teacher_file(args: argparse.Namespace) -> Path:
    """The teacher ONNX: ``--teacher``, or the pretrained ResNet-56 exported (BN kept)."""
    if args.teacher is not None:
        return args.teacher
    path = args.out / "resnet56_fp32.onnx"
    if not path.exists():
        from models import zoo

        args.out.mkdir(parents=True, exist_ok=True)
        zoo.export_reference("resnet56", path, keep_batchnorm=True, pretrained_dir=args.pretrained)
    return path


def student_source(seed: int = 0):
    """The ResNet-20 student exported as the CLI's torch student does (BN kept, the teacher's
    names), built after seeding torch (the same init for every method)."""

    def build(spec, folder: Path) -> Path:
        import torch

        from models.resnet_cifar import resnet20
        from onnxcomp.export import export_torch

        torch.manual_seed(seed)
        model = resnet20()
        name = spec.input_names[0]
        return export_torch(
            model, folder / "student.onnx", input_shape=(1, *spec.input_shapes[name][1:]),
            keep_batchnorm=True, input_names=spec.input_names, output_names=spec.output_names,
        )  # fmt: skip

    build.label = STUDENT  # type: ignore[attr-defined]
    return build


def distillation(method: str, args: argparse.Namespace):
    from onnxcomp.training.losses import DistillationConfig

    if method == "ce":
        return DistillationConfig("ce")
    if method == "kd":
        return DistillationConfig("kd", temperature=args.temperature, alpha=args.alpha)
    if method == "dkd":
        return DistillationConfig("dkd", temperature=args.temperature, dkd_warmup=args.dkd_warmup)
    return DistillationConfig(
        "kd", temperature=args.temperature, alpha=args.alpha, features=AT_PAIRS, feature_loss="at"
    )


def load_test(path: Path, stride: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        images, labels = data["input"][::stride], data["labels"][::stride]
    return np.ascontiguousarray(images), labels


def predictions(path: Path, images: np.ndarray, threads: int, batch: int = 250) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [
            session.run(None, {name: images[i : i + batch]})[0].argmax(1)
            for i in range(0, len(images), batch)
        ]
    )


def run_one(
    method: str, args: argparse.Namespace, teacher: Path, test: tuple, teacher_top1: np.ndarray
) -> dict:
    from onnxcomp.training.job import JobOptions
    from onnxcomp.training.trainer import TrainConfig

    output = args.out / f"resnet20_{method.replace('+', '_')}.onnx"
    options = JobOptions(
        output=output,
        distillation=distillation(method, args),
        train=TrainConfig(
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device="cpu",
            augment=False, num_threads=args.threads, seed=0,
        ),
        force=True,
        verify=False,
    )  # fmt: skip
    job = timed_training_job(student_source(), teacher, options, args.images, args.train)
    report = job.report
    images, labels = test
    top1 = predictions(output, images, args.threads)
    return {
        "method": method,
        "config": repr(options.distillation),
        "top1": float((top1 == labels).mean()),
        "agreement": float((top1 == teacher_top1).mean()),
        "train_s": sum(s.seconds for s in report.history) if report.history else None,
        "job_s": job.seconds,
        "history": [vars(s) for s in report.history],
        "notes": report.notes,
        "load_before": job.load_before,
        "load_after": job.load_after,
    }


def table(runs: list[dict]) -> str:
    rows = [
        [
            r["method"],
            f"{100 * r['top1']:.2f} %",
            f"{100 * r['agreement']:.2f} %",
            "-" if r["train_s"] is None else f"{r['train_s']:.0f}",
            f"{r['job_s']:.0f}",
        ]
        for r in runs
    ]
    headers = ["method", "student top-1", "agreement w/ teacher", "train s", "job s"]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = teacher_file(args)
    test = load_test(args.test, args.eval_stride)
    teacher_top1 = predictions(teacher, test[0], args.threads)
    teacher_acc = float((teacher_top1 == test[1]).mean())
    print(f"teacher {teacher}: top-1 {100 * teacher_acc:.2f} % on {len(test[1])} test images")
    runs: list[dict] = []
    failed: list[dict] = []
    for method in args.method or METHODS:
        try:
            runs.append(run_one(method, args, teacher, test, teacher_top1))
        except RuntimeError as error:  # recorded, the other methods still run
            print(f"{method}: failed: {str(error).splitlines()[0]}", flush=True)
            failed.append({"method": method, "error": str(error).splitlines()[0]})
            continue
        r = runs[-1]
        print(
            f"{method}: top-1 {100 * r['top1']:.2f} %, agreement {100 * r['agreement']:.2f} %, "
            f"{r['job_s']:.0f} s, load {r['load_after']}",
            flush=True,
        )
    result = {
        "budget": {
            "images": args.images, "epochs": args.epochs, "batch": args.batch_size,
            "lr": args.lr, "schedule": "cosine", "augment": False, "threads": args.threads,
        },
        "teacher": str(teacher),
        "teacher_top1": teacher_acc,
        "test_images": len(test[1]),
        "runs": runs,
        "failed": failed,
    }  # fmt: skip
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(table(runs))


if __name__ == "__main__":
    main()
