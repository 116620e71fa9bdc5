"""A wrong option is refused in one line before the model is read or any data pass runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import conv_bn

from onnxcomp.cli import main


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """A model and calibration data; reading the model or running a data pass fails the test."""
    onnx.save(conv_bn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((8, 4, 5, 5), np.float32))

    def data_pass(*args, **kwargs):
        raise AssertionError("a data pass ran")

    def model_read(*args, **kwargs):
        raise AssertionError("the model was read")

    monkeypatch.setattr("onnxcomp.converter.base.PassContext.collect", data_pass)
    monkeypatch.setattr("onnxcomp.converter.convert.load_model", model_read)
    return tmp_path


def refused(capsys, workdir: Path, *args: str) -> str:
    """Run convert; check it failed in one line, with no traceback and nothing written.

    An argument ``CALIB`` stands for the workdir's calibration data."""
    model = workdir / "m.onnx"
    before = model.read_bytes()
    args = tuple(str(workdir / "calib.npz") if a == "CALIB" else a for a in args)
    code = main(["convert", str(model), "-o", str(workdir / "out.onnx"), *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert model.read_bytes() == before
    assert sorted(p.name for p in workdir.iterdir()) == ["calib.npz", "m.onnx"]
    return lines[0]


@pytest.mark.parametrize("calib", [False, True])
def test_wrong_activation_type(capsys, workdir, calib):
    extra = ["--calib", str(workdir / "calib.npz")] if calib else []
    line = refused(capsys, workdir, "--int8", "--activation-type", "int7", *extra)
    assert "--activation-type" in line and "int7" in line


@pytest.mark.parametrize("calib", [False, True])
def test_wrong_prune_method(capsys, workdir, calib):
    extra = ["--calib", str(workdir / "calib.npz")] if calib else []
    line = refused(capsys, workdir, "--prune", "0.3", "--prune-method", "foo", *extra)
    assert "--prune-method" in line and "foo" in line


@pytest.mark.parametrize("calib", [False, True])
def test_rank_energy_above_one(capsys, workdir, calib):
    extra = ["--calib", str(workdir / "calib.npz")] if calib else []
    line = refused(capsys, workdir, "--lowrank", "--rank-energy", "2", *extra)
    assert "--rank-energy" in line


def test_thinet_without_calibration_data(capsys, workdir):
    line = refused(capsys, workdir, "--prune", "0.3", "--prune-method", "thinet")
    assert "--prune-method thinet" in line and "--calib" in line


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--int8", "--target", "riscv"], "--target"),
        (["--int8", "--calibration", "magic"], "--calibration"),
        (["--int8", "--weight-rounding", "up"], "--weight-rounding"),
        (["--equalize", "relu8"], "--equalize"),
        (["--threads", "0"], "--threads"),
        (["--prune", "0.3", "--prune-layer", "A=2"], "--prune-layer"),
        (["--mean", "a,b,c"], "--mean"),
    ],
)
def test_other_wrong_values_with_calibration_data(capsys, workdir, args, option):
    line = refused(capsys, workdir, *args, "--calib", str(workdir / "calib.npz"))
    assert option in line


def test_debug_shows_the_traceback_of_a_refused_choice(workdir):
    with pytest.raises(Exception, match="--activation-type"):
        main(["--debug", "convert", str(workdir / "m.onnx"), "--int8", "--activation-type", "x"])
