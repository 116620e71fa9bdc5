"""End-to-end CLI tests: the main job and every bad-input path (one line, non-zero exit)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import RNG, conv_bn, make_model, ops, tensor
from onnx import helper

from onnxcomp.cli import main


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn(), path)
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    text = " ".join(lines)
    assert text.startswith("error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in text, text


def test_convert_folds_and_verifies(capsys, model_path, tmp_path):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    code, stdout, _ = cli(capsys, "convert", model_path, "-o", out, "--report", report)
    assert code == 0
    assert ops(onnx.load(out)) == ["Conv"]
    assert "folded 1 BatchNormalization" in stdout
    data = json.loads(report.read_text())
    assert data["fidelity"]["relative_error"] < 1e-5
    assert [p["name"] for p in data["passes"]] == ["cleanup", "fold-batchnorm"]


def test_convert_with_npz_data_reports_accuracy(capsys, tmp_path):
    inits = [tensor("w", RNG.normal(size=(4, 3)).astype(np.float32))]
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["N", 4])], ["y"], inits
    )
    model_file = tmp_path / "mlp.onnx"
    onnx.save(model, model_file)
    x = RNG.normal(size=(20, 4)).astype(np.float32)
    labels = (x @ onnx.numpy_helper.to_array(model.graph.initializer[0])).argmax(1)
    np.savez(tmp_path / "data.npz", x=x, labels=labels)
    code, stdout, _ = cli(
        capsys, "convert", model_file, "-o", tmp_path / "o.onnx", "--data", tmp_path / "data.npz"
    )
    assert code == 0
    assert "100.00%" in stdout  # top-1 agreement and accuracy


def test_inspect_json(capsys, model_path):
    code, stdout, _ = cli(capsys, "inspect", model_path, "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["op_histogram"] == {"BatchNormalization": 1, "Conv": 1}
    assert data["total_macs"] == 6 * 5 * 5 * 4 * 9


def test_compare_and_bench(capsys, model_path, tmp_path):
    out = tmp_path / "out.onnx"
    assert cli(capsys, "convert", model_path, "-o", out)[0] == 0
    code, stdout, _ = cli(capsys, "compare", model_path, out, "--json")
    assert code == 0
    assert json.loads(stdout)["relative_error"] < 1e-5
    code, stdout, _ = cli(
        capsys, "bench", model_path, "--compare", out, "--iterations", "5", "--warmup", "1"
    )
    assert code == 0
    assert out.name in stdout


def test_missing_file(capsys, tmp_path):
    code, _, err = cli(capsys, "convert", tmp_path / "nope.onnx")
    assert_one_line_error(code, err, "nope.onnx", "no such file")


def test_not_onnx_and_truncated(capsys, tmp_path, model_path):
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a model\n" * 10)
    code, _, err = cli(capsys, "inspect", text)
    assert_one_line_error(code, err, "text.onnx", "not")
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(model_path.read_bytes()[:200])
    code, _, err = cli(capsys, "convert", truncated)
    assert_one_line_error(code, err, "trunc.onnx")


def test_checker_failure_shows_its_message(capsys, tmp_path):
    model = conv_bn()
    model.graph.node[0].input[1] = "does_not_exist"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    code, _, err = cli(capsys, "convert", bad)
    assert_one_line_error(code, err, "bad.onnx", "onnx.checker", "does_not_exist")


def _external_model(tmp_path: Path, location: str) -> Path:
    model = conv_bn()
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    proto = onnx.load(path, load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)
    return path


def test_external_data_loads_and_converts(capsys, tmp_path):
    path = _external_model(tmp_path, "ext.data")
    code, _, err = cli(capsys, "convert", path, "-o", tmp_path / "out.onnx")
    assert code == 0, err


def test_missing_external_data(capsys, tmp_path):
    path = _external_model(tmp_path, "gone.data")
    code, _, err = cli(capsys, "convert", path)
    assert_one_line_error(code, err, "gone.data", "missing")


def test_external_data_outside_folder_is_refused(capsys, tmp_path):
    sub = tmp_path / "m"
    sub.mkdir()
    path = _external_model(sub, "../secret.data")
    (tmp_path / "secret.data").write_bytes(b"\0" * 10)
    code, _, err = cli(capsys, "inspect", path)
    assert_one_line_error(code, err, "outside")


def test_output_equal_to_input_needs_force(capsys, model_path):
    before = model_path.read_bytes()
    code, _, err = cli(capsys, "convert", model_path, "-o", model_path)
    assert_one_line_error(code, err, "--force")
    assert model_path.read_bytes() == before
    code, _, _ = cli(capsys, "convert", model_path, "-o", model_path, "--force")
    assert code == 0
    assert ops(onnx.load(model_path)) == ["Conv"]


def test_output_folder_not_writable(capsys, model_path, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # running as root: make the permission check say no
        from onnxcomp.core import io

        real_access = os.access
        monkeypatch.setattr(
            io.os,
            "access",
            lambda path, mode: Path(path).resolve() != locked.resolve() and real_access(path, mode),
        )
    code, _, err = cli(capsys, "convert", model_path, "-o", locked / "o.onnx")
    assert_one_line_error(code, err, "not writable")


def test_output_folder_missing(capsys, model_path, tmp_path):
    code, _, err = cli(capsys, "convert", model_path, "-o", tmp_path / "no" / "o.onnx")
    assert_one_line_error(code, err, "does not exist")


def test_data_shape_mismatch_names_flags(capsys, model_path, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 4, 7, 7), np.float32))
    out = tmp_path / "o.onnx"
    code, _, err = cli(capsys, "convert", model_path, "-o", out, "--data", tmp_path / "bad.npy")
    assert_one_line_error(code, err, "do not fit", "--resize")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxcomp-")]


def test_empty_data_folder(capsys, model_path, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(
        capsys, "convert", model_path, "-o", tmp_path / "o.onnx", "--data", tmp_path / "empty"
    )
    assert_one_line_error(code, err, "empty")


def test_unreadable_images_only(capsys, model_path, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not a jpeg")
    code, _, err = cli(capsys, "convert", model_path, "-o", tmp_path / "o.onnx", "--data", folder)
    assert_one_line_error(code, err, "no readable images")


def test_failed_verification_writes_nothing(capsys, model_path, tmp_path, monkeypatch):
    """A lossless pass that changes the outputs is an error: exit non-zero, no file."""
    from onnxcomp.converter.cleanup import fold_batchnorm

    original = fold_batchnorm._InferenceOnly.rewrite

    def broken(self, op, x, inbound_out, batchnorm_out):
        bn = batchnorm_out.producer()
        gamma = bn.inputs[1].const_value.numpy()
        bn.inputs[1].const_value = onnx_ir_tensor(gamma * 1.5)
        return original(self, op, x, inbound_out, batchnorm_out)

    monkeypatch.setattr(fold_batchnorm._InferenceOnly, "rewrite", broken)
    monkeypatch.setattr(
        fold_batchnorm,
        "FOLD_RULES",
        fold_batchnorm.RewriteRuleSet([fold_batchnorm.FoldIntoConv.rule()]),
    )
    out = tmp_path / "o.onnx"
    code, _, err = cli(capsys, "convert", model_path, "-o", out)
    assert_one_line_error(code, err, "relative error", "no output written")
    assert not out.exists()


def onnx_ir_tensor(array):
    import onnx_ir as ir

    return ir.tensor(array)


def test_debug_shows_traceback(model_path, tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main(["--debug", "convert", str(tmp_path / "nope.onnx")])


def test_unknown_provider_is_clear(capsys, model_path, tmp_path):
    code, _, err = cli(
        capsys, "convert", model_path, "-o", tmp_path / "o.onnx", "--provider", "cuda"
    )
    assert_one_line_error(code, err, "CUDA")


def test_convert_lowrank_factorizes_an_exact_low_rank_layer(capsys, tmp_path):
    u = RNG.normal(size=(64, 2)).astype(np.float32)
    v = RNG.normal(size=(2, 64)).astype(np.float32)
    inits = [tensor("w", u @ v)]  # rank 2
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [("x", ["N", 64])], ["y"], inits
    )
    source = tmp_path / "fc.onnx"
    onnx.save(model, source)
    out = tmp_path / "fc.lowrank.onnx"
    code, stdout, _ = cli(
        capsys, "convert", source, "-o", out, "--lowrank", "--rank-energy", "0.999"
    )
    assert code == 0
    assert ops(onnx.load(out)) == ["MatMul", "MatMul"]
    assert "factorized 1 of 1" in stdout
    assert "100.00%" in stdout or "1.000000" in stdout


def test_convert_lowrank_rank_from_output_error_on_data(capsys, tmp_path):
    """A layer of rank 4 whose inputs only span 2 directions: on the data, rank 2 is exact."""
    u = RNG.normal(size=(32, 4)).astype(np.float32)
    v = RNG.normal(size=(4, 32)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [("x", ["N", 32])],
        ["y"],
        [tensor("w", u @ v)],
    )
    source = tmp_path / "fc.onnx"
    onnx.save(model, source)
    basis = np.linalg.qr(RNG.normal(size=(32, 2)))[0]
    data = tmp_path / "x.npz"
    np.savez(data, x=(RNG.normal(size=(64, 2)) @ basis.T).astype(np.float32))
    out = tmp_path / "fc.lowrank.onnx"
    args = ["--lowrank", "--rank-error", "0.01", "--lowrank-refit", "--calib", data]
    code, _, err = cli(capsys, "convert", source, "-o", out, *args, "--data", data)
    assert code == 0, err
    shapes = sorted(tuple(i.dims) for i in onnx.load(out).graph.initializer)
    assert shapes == [(2, 32), (32, 2)]
    code, _, err = cli(
        capsys, "convert", source, "-o", out, "--force", "--lowrank", "--rank-error", "0.01"
    )
    assert_one_line_error(code, err, "--calib")


def test_rank_energy_out_of_range(capsys, model_path, tmp_path):
    code, _, err = cli(
        capsys,
        "convert",
        model_path,
        "-o",
        tmp_path / "o.onnx",
        "--lowrank",
        "--rank-energy",
        "1.5",
    )
    assert_one_line_error(code, err, "--rank-energy")


def conv_relu_conv(path, channels: int):
    """Conv A (3 -> ``channels``), Relu, Conv B (-> 4), 3x3 same padding, saved at ``path``."""
    from graphs import RNG as rng

    inits = [
        tensor("wa", rng.normal(size=(channels, 3, 3, 3)).astype(np.float32)),
        tensor("wb", rng.normal(size=(4, channels, 3, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="A", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="R"),
        helper.make_node("Conv", ["r", "wb"], ["y"], name="B", pads=[1, 1, 1, 1]),
    ]
    onnx.save(make_model(nodes, [("x", ["N", 3, 6, 6])], ["y"], inits), path)
    return path


def test_convert_prune_l1_and_thinet_needs_data(capsys, tmp_path):
    source = conv_relu_conv(tmp_path / "cc.onnx", 8)
    out = tmp_path / "pruned.onnx"
    code, stdout, _ = cli(
        capsys, "convert", source, "-o", out, "--prune", "0.5", "--prune-multiple", "1"
    )
    assert "pruned 1 of 2 channel group" in stdout
    assert code == 0
    weights = {i.name: i.dims for i in onnx.load(out).graph.initializer}
    assert sorted(tuple(d) for d in weights.values()) == [(4, 3, 3, 3), (4, 4, 3, 3)]
    code, _, err = cli(
        capsys, "convert", source, "-o", out, "--prune", "0.5", "--prune-method", "thinet"
    )
    assert_one_line_error(code, err, "--calib")
    for args, text in [
        (["--prune-macs", "0.5"], "--calib"),
        (["--prune", "0.5", "--prune-macs", "0.5"], "either --prune"),
        (["--prune", "0.5", "--prune-layer", "A"], "PATTERN=RATIO"),
        (["--prune", "0.5", "--prune-layer", "A=1.5"], "PATTERN=RATIO"),
        (["--prune", "1.5"], "ratio must be in (0, 1)"),
    ]:
        code, _, err = cli(capsys, "convert", source, "-o", out, *args)
        assert_one_line_error(code, err, text)
    # An override keeps layer A whole, an exclusion likewise.
    for args in (["--prune-layer", "A=0"], ["--prune-exclude", "A*"]):
        code, stdout, _ = cli(
            capsys, "convert", source, "-o", out, "--force", "--prune", "0.5", *args
        )
        assert code == 0
        weights = {i.name: tuple(i.dims) for i in onnx.load(out).graph.initializer}
        assert weights["wa"] == (8, 3, 3, 3)


def test_convert_prune_macs_with_calibration_data(capsys, tmp_path):
    from graphs import RNG as rng

    source = conv_relu_conv(tmp_path / "cc.onnx", 16)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.normal(size=(24, 3, 6, 6)).astype(np.float32))
    out = tmp_path / "pruned.onnx"
    code, stdout, err = cli(
        capsys, "convert", source, "-o", out, "--prune-macs", "0.6", "--calib", data,
        "--prune-method", "thinet",
    )  # fmt: skip
    assert code == 0, err
    weights = {i.name: tuple(i.dims) for i in onnx.load(out).graph.initializer}
    # MACs scale with A's output channels: at most 60 % kept means at most 9 of 16.
    assert weights["wa"][0] <= 9 and weights["wb"] == (4, weights["wa"][0], 3, 3)
    assert "output error alone" in stdout
