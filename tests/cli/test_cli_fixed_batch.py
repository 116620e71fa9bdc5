"""The command line on models whose batch is fixed (1, 4): convert --int8, compare, debug and
bench run; images of the wrong size are one line naming --resize/--crop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from int8_models import small_cnn
from PIL import Image

from onnxcomp.cli import main

SAMPLES = np.random.default_rng(8).normal(size=(10, 3, 8, 8)).astype(np.float32)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"data": tmp_path / "data.npz"}
    np.savez(paths["data"], input=SAMPLES)
    for batch in (1, 4):
        paths[f"fixed{batch}"] = tmp_path / f"fixed{batch}.onnx"
        onnx.save(small_cnn(batch=batch), paths[f"fixed{batch}"])
    return paths


@pytest.mark.parametrize("batch", [1, 4])
def test_convert_int8_compare_debug_bench(capsys, files, tmp_path, batch):
    model, data, out = files[f"fixed{batch}"], files["data"], tmp_path / "int8.onnx"
    code, stdout, err = cli(capsys, "convert", model, "-o", out, "--int8", "--calib", data)
    assert code == 0, err
    text = " ".join(stdout.split())
    assert f"batch fixed to {batch} by the model: calibration and verification run {batch}" in text
    assert "10 samples" in text
    code, stdout, err = cli(capsys, "compare", model, out, "--data", data, "--json")
    assert code == 0, err
    assert json.loads(stdout)["samples"] == 10
    code, stdout, err = cli(capsys, "debug", model, out, "--data", data, "--json")
    assert code == 0, err
    assert json.loads(stdout)["samples"] == 10
    code, stdout, err = cli(
        capsys, "bench", model, "--compare", out, "--batch", "8", "--iterations", "2"
    )
    assert code == 0, err
    assert f"timed at batch {batch}, not 8" in " ".join(stdout.split())


def test_cli_path_fixed1(capsys, files, tmp_path, monkeypatch):
    """``onnxcomp convert fixed1.onnx --int8 --calib data.npz`` (default output name)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "convert", "fixed1.onnx", "--int8", "--calib", "data.npz")
    assert code == 0, err
    assert (tmp_path / "fixed1.onnxcomp.onnx").exists()


@pytest.mark.parametrize("batch", [1, 4])
def test_images_of_the_wrong_size_are_one_line(capsys, files, tmp_path, batch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (i, 2 * i, 3 * i)).save(folder / f"{i}.png")
    out = tmp_path / "int8.onnx"
    code, _, err = cli(
        capsys, "convert", files[f"fixed{batch}"], "-o", out, "--int8", "--calib", folder
    )
    lines = [line for line in err.strip().splitlines() if line.strip()]
    text = " ".join(line.strip() for line in lines)
    assert code == 2 and text.startswith("error:"), err
    assert "Traceback" not in err and "internal error" not in err
    assert str(folder) in "".join(line.strip() for line in lines) or "imgs" in text
    assert "(3, 16, 16)" in text and "--resize/--crop" in text
    assert not out.exists()
    # The fix it names works.
    code, _, err = cli(
        capsys,
        "convert",
        files[f"fixed{batch}"],
        "-o",
        out,
        "--int8",
        "--calib",
        folder,
        "--resize",
        "8",
        "--crop",
        "8",
    )
    assert code == 0, err
