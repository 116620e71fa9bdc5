"""`make demo`: the main job end to end on an embedded example that needs no download.

A small CNN with BatchNorm is trained on scikit-learn's 8x8 digits (real handwritten digits
that ship with scikit-learn), exported to ONNX with its BatchNorms kept, and the held-out
digits are written as an image folder (ImageFolder layout, labels from folder names). Then the
onnxcomp commands a deployment engineer would run are run on it, printed as they go.
"""

from __future__ import annotations

import shlex
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.rule import Rule

from models.digits import load_digits_arrays, train_on_arrays
from onnxcomp.cli import main as onnxcomp
from onnxcomp.export import export_torch

console = Console()


def write_image_folder(x: np.ndarray, y: np.ndarray, root: Path) -> Path:
    """Digits (N, 1, 8, 8) in [0, 1] as 8-bit grayscale PNGs in root/<label>/NNNN.png."""
    for index, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png")
    return root


def run(*args: str | Path) -> None:
    command = ["onnxcomp", *(str(a) for a in args)]
    console.print(Rule(style="dim"))
    console.print(f"[bold]$ {shlex.join(command)}[/]")
    code = onnxcomp(command[1:])
    if code != 0:
        console.print(f"[red]command failed with exit code {code}[/]")
        sys.exit(code)


def main(out: Path = Path("demo_out")) -> None:
    out.mkdir(exist_ok=True)
    console.print("[bold]onnxcomp demo[/]: a digits CNN (scikit-learn's 8x8 digits), trained here")
    x_train, y_train, x_test, y_test = load_digits_arrays(seed=0)
    model = train_on_arrays(x_train, y_train, epochs=15, seed=0)
    model_path = export_torch(
        model, out / "digits_cnn.onnx", input_shape=(1, 1, 8, 8), keep_batchnorm=True
    )
    images = write_image_folder(x_test, y_test, out / "digits_test")
    calib = write_image_folder(x_train, y_train, out / "digits_train")
    console.print(
        f"exported {model_path} (BatchNorm kept, as a training export has it) and wrote "
        f"{len(y_train)} training digits to {calib}/ and {len(y_test)} held-out digits to "
        f"{images}/ (<label>/*.png)"
    )
    folded = out / "digits_cnn.folded.onnx"
    run("inspect", model_path, "--top", "5")
    run(
        "convert",
        model_path,
        "-o",
        folded,
        "--force",
        "--data",
        images,
        "--grayscale",
        "--report",
        out / "convert_report.json",
    )
    int8 = out / "digits_cnn.int8.onnx"
    run(
        "convert", model_path, "-o", int8, "--force", "--int8", "--calib", calib,
        "--calib-size", "512", "--data", images, "--grayscale",
        "--report", out / "int8_report.json",
    )  # fmt: skip
    run("inspect", int8, "--top", "5")
    run("debug", folded, int8, "--data", images, "--grayscale", "--top", "5")
    run("bench", folded, "--compare", int8, "--batch", "64", "--threads", "2", "--time", "2")
    cifar_resnet(out)
    console.print(Rule(style="dim"))
    console.print(f"done: outputs in {out}/")


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def split_cifar_test(archive: Path, root: Path, calib: int = 50, evaluate: int = 100) -> None:
    """Per class, the first ``calib`` test JPEGs to root/calib, the next ``evaluate`` to
    root/eval (ImageFolder layout), streamed from the archive."""
    taken: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            label = Path(member.name).parent.name
            index = taken.get(label, 0)
            if index >= calib + evaluate:
                continue
            taken[label] = index + 1
            target = root / ("calib" if index < calib else "eval") / label / Path(member.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())


def cifar_resnet(out: Path) -> None:
    """The main job on a real network: the pretrained CIFAR ResNet-20, when the shared data
    (checkpoints and CIFAR-10 JPEGs) is present."""
    console.print(Rule(style="dim"))
    if not (SHARED_DATA / "pretrained" / "resnet20.th").is_file():
        console.print(f"[dim]skipping the CIFAR ResNet-20 part: {SHARED_DATA} is not here[/]")
        return
    from models.zoo import export_reference

    root = out / "cifar10"
    if not (root / "eval").is_dir():
        split_cifar_test(SHARED_DATA / "cifar10" / "test_jpg.tar.gz", root)
    model = export_reference(
        "resnet20", out / "resnet20.onnx", keep_batchnorm=True, pretrained_dir=SHARED_DATA
    )
    console.print(
        f"pretrained CIFAR ResNet-20 exported to {model}; 500 CIFAR-10 test JPEGs to calibrate "
        f"on ({root}/calib), 1,000 others to verify on ({root}/eval)"
    )
    int8 = out / "resnet20.int8.onnx"
    run(
        "convert", model, "-o", int8, "--force", "--int8", "--calib", root / "calib",
        "--preset", "cifar10", "--data", root / "eval",
    )  # fmt: skip
    run("bench", model, "--compare", int8, "--batch", "64", "--threads", "2", "--time", "3")


if __name__ == "__main__":
    main()
