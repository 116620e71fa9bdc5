"""`onnxcomp finetune` and `onnxcomp distill`: the commands end to end and every bad input
(one line, exit 2)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import run
from onnx import helper

torch = pytest.importorskip("torch")

from int8_models import small_cnn  # noqa: E402

from onnxcomp.cli import main  # noqa: E402

torch.set_num_threads(1)


def tiny_student():
    """A torch student for `--student test_cli_finetune:tiny_student`."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_train")
    teacher = small_cnn(seed=0)
    student = small_cnn(seed=3)  # other weights, same graph
    x = np.random.default_rng(1).normal(0, 1, (96, 3, 8, 8)).astype(np.float32)
    labels = run(teacher, {"input": x})[0].argmax(1)
    paths = {n: folder / f"{n}.onnx" for n in ("teacher", "student")}
    onnx.save(teacher, paths["teacher"])
    onnx.save(student, paths["student"])
    paths["train"] = folder / "train.npz"
    paths["labelled"] = folder / "labelled.npz"
    paths["val"] = folder / "val.npz"
    np.savez(paths["train"], input=x[:64])
    np.savez(paths["labelled"], input=x[:64], labels=labels[:64])
    np.savez(paths["val"], input=x[64:])
    return paths


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, err
    text = " ".join(lines[lines.index(error_lines[0]) :])
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in text, text


def common(files, out: Path, data: str = "train") -> list:
    return [
        "--teacher", files["teacher"], "--data", files[data], "--val", files["val"],
        "-o", out, "--batch-size", "32", "--device", "cpu", "--no-augment",
    ]  # fmt: skip


def test_finetune_writes_a_verified_model_and_a_report(capsys, files, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    args = ["finetune", files["student"], *common(files, out), "--epochs", "2", "--lr", "0.05"]
    code, stdout, err = cli(capsys, *args, "--report", report)
    assert code == 0, err
    assert "top-1 agreement with the teacher" in stdout
    assert "knowledge distillation only" in stdout  # unlabelled data: said so
    data = json.loads(report.read_text())
    assert [h["epoch"] for h in data["history"]] == [1, 2]
    x = np.load(files["val"])["input"]
    teacher = run(onnx.load(files["teacher"]), {"input": x})[0]
    written = run(onnx.load(out), {"input": x})[0]
    agree = float((teacher.argmax(1) == written.argmax(1)).mean())
    assert data["teacher_vs_output"]["outputs"][0]["top1_agreement"] == pytest.approx(agree)


def test_distill_a_torch_student_from_code(capsys, files, tmp_path):
    out = tmp_path / "distilled.onnx"
    code, stdout, err = cli(
        capsys, "distill", "--student", "test_cli_finetune:tiny_student",
        *common(files, out, "labelled"), "--epochs", "1", "--loss", "dkd",
    )  # fmt: skip
    assert code == 0, err
    model = onnx.load(out)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert "train acc" in stdout


def test_different_output_classes(capsys, files, tmp_path):
    model = small_cnn(seed=0)
    for init in model.graph.initializer:
        if init.name in ("wf", "bf"):
            array = onnx.numpy_helper.to_array(init)[:5]
            init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    path = tmp_path / "five.onnx"
    onnx.save(model, path)
    code, _, err = cli(capsys, "finetune", path, *common(files, tmp_path / "o.onnx"))
    assert_one_line_error(code, err, "the teacher predicts 10 classes, the student 5")


def test_an_op_the_importer_cannot_train(capsys, files, tmp_path):
    model = small_cnn(seed=0)
    node = next(n for n in model.graph.node if n.name == "relu1")
    node.CopyFrom(helper.make_node("Softsign", ["c1"], ["r1"], name="relu1"))
    path = tmp_path / "softsign.onnx"
    onnx.save(model, path)
    code, _, err = cli(capsys, "finetune", path, *common(files, tmp_path / "o.onnx"))
    assert_one_line_error(code, err, "node 'relu1' (Softsign) cannot be trained")


def test_cross_entropy_needs_labels(capsys, files, tmp_path):
    args = ["finetune", files["student"], *common(files, tmp_path / "o.onnx"), "--loss", "ce"]
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, "--loss ce needs labels", "--loss kd")


def test_torch_missing_names_the_extra(capsys, monkeypatch, files, tmp_path):
    for name in [m for m in sys.modules if m.startswith("onnxcomp.training")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    code, _, err = cli(capsys, "finetune", files["student"], *common(files, tmp_path / "o.onnx"))
    assert_one_line_error(code, err, "needs torch", "pip install 'onnxcomp[torch]'")


def test_resume_with_a_checkpoint_of_another_model(capsys, files, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = ["finetune", files["student"], *common(files, tmp_path / "a.onnx")]
    code, _, err = cli(capsys, *first, "--epochs", "1", "--checkpoint-dir", ckpt)
    assert code == 0, err
    other = tmp_path / "depthwise.onnx"
    onnx.save(small_cnn(seed=0, group=8), other)
    args = ["finetune", other, *common(files, tmp_path / "b.onnx"), "--epochs", "2"]
    code, _, err = cli(capsys, *args, "--checkpoint-dir", ckpt, "--resume")
    assert_one_line_error(code, err, "checkpoint of another model", "--checkpoint-dir")


def test_nan_loss_stops_with_learning_rate_advice(capsys, files, tmp_path):
    args = ["finetune", files["student"], *common(files, tmp_path / "o.onnx", "labelled")]
    code, _, err = cli(capsys, *args, "--lr", "1e6", "--epochs", "2", "--no-bn-reinsert")
    assert_one_line_error(code, err, "training stopped", "lower the learning rate", "--lr 1e+06")
    assert not (tmp_path / "o.onnx").exists()
    # re-inserted BatchNorm keeps the loss finite while the weights blow up: still one line
    code, _, err = cli(capsys, *args, "--lr", "1e6", "--epochs", "2")
    assert_one_line_error(code, err, "lower the learning rate", "--lr 1e+06")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--epochs", "0"], "--epochs 0 trains nothing"),
        (["--loss", "at"], "--loss at needs --feature"),
        (["--feature", "r1"], "expected student_tensor:teacher_tensor"),
        (["--loss", "nope"], "nope"),
        (["--scale-lr", "0"], "--scale-lr"),
        (["--dkd-warmup", "2"], "--dkd-warmup applies to --loss dkd"),
    ],
)
def test_bad_options_fail_before_any_work(capsys, files, tmp_path, extra, fragment):
    args = ["finetune", files["student"], *common(files, tmp_path / "o.onnx"), *extra]
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, fragment)


def test_recover_blocks(capsys, files, tmp_path):
    out = tmp_path / "rec.onnx"
    args = ["finetune", files["student"], *common(files, out), "--epochs", "0"]
    code, _, err = cli(capsys, *args, "--recover", "blocks")
    if importlib.util.find_spec("onnxcomp.training.recover") is None:
        assert_one_line_error(code, err, "--recover blocks", "not in this build")
    else:
        assert code == 0, err
        assert out.is_file()


def test_help_lists_the_commands(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "finetune" in out and "distill" in out
