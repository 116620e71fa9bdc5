"""``onnxcomp deploy`` end to end: exit codes, one-line errors, what it writes; and the
``--provider cuda|tensorrt`` paths of ``bench`` and ``compare`` (skipped where the provider
exists, run there instead)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from int8_models import small_cnn
from test_cli import assert_one_line_error, cli

from onnxcomp.cli.options import DeployTarget, IoDtype, Platform
from onnxcomp.deploy import TARGETS
from onnxcomp.deploy.artifact import IO_DTYPES, PLATFORMS


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


def test_choices_match_the_library():
    assert [t.value for t in DeployTarget] == list(TARGETS)
    assert tuple(p.value for p in Platform) == PLATFORMS
    assert tuple(d.value for d in IoDtype) == IO_DTYPES


def test_deploy_writes_the_folder_and_reports(capsys, model, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = cli(capsys, "deploy", model, "-o", out, "--platform", "amd64")
    assert code == 0
    assert "cnn.ort" in stdout and "rel err" in stdout and "NCHWc" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["platform"] == "amd64"
    assert (out / "cnn.ort").is_file()


def test_deploy_json_with_npz_data(capsys, model, tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", input=x)
    out = tmp_path / "out"
    code, stdout, _ = cli(
        capsys, "deploy", model, "-o", out, "--data", tmp_path / "data.npz", "--json"
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["fidelity"]["samples"] == 6
    assert report["fidelity"]["relative_error"] < 1e-5
    samples = np.load(out / "samples.npz")
    assert samples["input_0"].shape == (4, 3, 8, 8)  # 4 of the data's samples (seeded pick)
    for row in samples["input_0"]:
        assert any(np.array_equal(row, candidate) for candidate in x)


def test_non_empty_output_exit_2_then_force(capsys, model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = cli(capsys, "deploy", model, "-o", out)
    assert_one_line_error(code, err, "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    code, _, _ = cli(capsys, "deploy", model, "-o", out, "--force")
    assert code == 0 and not (out / "old.txt").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--target", "coreml"], ["coreml", "ort", "tflite"]),
        (["--platform", "x86"], ["x86", "arm", "amd64"]),
        (["--io-dtype", "int8"], ["--io-dtype int8", "float32 only"]),
        (["--labels", "nope.txt"], ["--labels"]),
    ],
)
def test_bad_options_exit_2_in_one_line(capsys, model, tmp_path, args, fragments):
    code, _, err = cli(capsys, "deploy", model, "-o", tmp_path / "out", *args)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_model_exit_2(capsys, tmp_path):
    code, _, err = cli(capsys, "deploy", tmp_path / "nope.onnx", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "nope.onnx")
    assert not (tmp_path / "out").exists()


# --- GPU execution providers for bench and compare ------------------------------------------

GPU = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
@pytest.mark.parametrize("command", ["bench", "compare"])
def test_missing_gpu_provider_is_one_line(capsys, model, provider, command):
    if GPU[provider] in onnxruntime.get_available_providers():
        pytest.skip(f"{GPU[provider]} is installed here")
    extra = ["--time", "0.01", "--warmup", "0"] if command == "bench" else [model]
    code, _, err = cli(capsys, command, model, *extra, "--provider", provider)
    assert_one_line_error(code, err, GPU[provider], "onnxruntime-gpu", "--allow-cpu-fallback")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_bench_and_compare_on_gpu(capsys, model, provider):
    if GPU[provider] not in onnxruntime.get_available_providers():
        pytest.skip(f"{GPU[provider]} not installed (onnxruntime-gpu)")
    code, stdout, err = cli(capsys, "bench", model, "--time", "0.1", "--provider", provider)
    assert code == 0, err
    code, stdout, err = cli(capsys, "compare", model, model, "--provider", provider, "--json")
    assert code == 0, err
    assert json.loads(stdout)["relative_error"] < 1e-3


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_cpu_fallback_runs_bench(capsys, model, provider):
    if GPU[provider] in onnxruntime.get_available_providers():
        pytest.skip(f"{GPU[provider]} is installed here")
    code, _, err = cli(
        capsys, "bench", model, "--time", "0.01", "--warmup", "0", "--provider", provider,
        "--allow-cpu-fallback",
    )  # fmt: skip
    assert code == 0, err
