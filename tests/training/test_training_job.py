"""The finetune/distill job end to end on tiny CNNs, checked in ONNX Runtime on written files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import run
from onnx import helper
from progress_hooks import StopAfterEpoch

torch = pytest.importorskip("torch")

from int8_models import minmax_ranges, quantize, small_cnn  # noqa: E402

from onnxcomp.errors import OnnxcompError, OptionError  # noqa: E402
from onnxcomp.training.job import (  # noqa: E402
    SCALE_LR,
    DataSpec,
    JobHooks,
    JobOptions,
    StudentSpec,
    run_job,
)
from onnxcomp.training.losses import DistillationConfig  # noqa: E402
from onnxcomp.training.trainer import TrainConfig  # noqa: E402

torch.set_num_threads(1)


def perturbed(model: onnx.ModelProto, noise: float, seed: int = 5) -> onnx.ModelProto:
    """A copy with every weight moved by ``noise`` x its standard deviation."""
    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        a = onnx.numpy_helper.to_array(init)
        moved = a + rng.normal(0, noise, a.shape) * a.std()
        init.CopyFrom(onnx.numpy_helper.from_array(moved.astype(a.dtype), init.name))
    return copy


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("job")
    teacher = small_cnn(seed=0)
    x = np.random.default_rng(1).normal(0, 1, (192, 3, 8, 8)).astype(np.float32)
    labels = run(teacher, {"input": x})[0].argmax(1)
    paths = {
        "teacher": folder / "teacher.onnx",
        "student": folder / "student.onnx",
        "train": folder / "train.npz",
        "labelled": folder / "labelled.npz",
        "val": folder / "val.npz",
        "folder": folder,
    }
    onnx.save(teacher, paths["teacher"])
    onnx.save(perturbed(teacher, 0.4), paths["student"])
    np.savez(paths["train"], input=x[:128])
    np.savez(paths["labelled"], input=x[:128], labels=labels[:128])
    np.savez(paths["val"], input=x[128:])
    return paths


def options(out: Path, epochs: int = 3, **train) -> JobOptions:
    config = dict(epochs=epochs, lr=0.05, batch_size=32, device="cpu", augment=False)
    return JobOptions(output=out, train=TrainConfig(**{**config, **train}))


def spec(files, data: str = "train") -> DataSpec:
    return DataSpec(path=files[data], val=files["val"], batch_size=32)


def kl_to_teacher(files, model_path: Path) -> tuple[float, float]:
    """(mean KL(teacher || model) at T=1, top-1 agreement) on the held-out inputs, in ORT."""
    x = np.load(files["val"])["input"]
    t = run(onnx.load(files["teacher"]), {"input": x})[0].astype(np.float64)
    s = run(onnx.load(model_path), {"input": x})[0].astype(np.float64)

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lt, ls = log_softmax(t), log_softmax(s)
    kl = float((np.exp(lt) * (lt - ls)).sum(1).mean())
    return kl, float((t.argmax(1) == s.argmax(1)).mean())


def test_finetune_with_kd_moves_a_damaged_student_towards_the_teacher(files, tmp_path):
    out = tmp_path / "out.onnx"
    report = run_job(files["student"], files["teacher"], spec(files), options(out))
    kl_before, agree_before = kl_to_teacher(files, files["student"])
    kl_after, agree_after = kl_to_teacher(files, out)
    assert kl_after < 0.5 * kl_before
    assert agree_after >= agree_before
    assert report.before.top1_agreement == pytest.approx(agree_before)
    assert report.after.top1_agreement == pytest.approx(agree_after)
    assert [s.epoch for s in report.history] == [1, 2, 3]
    assert any("knowledge distillation only" in n for n in report.notes)
    names = lambda m: [(n.name, n.op_type) for n in m.graph.node]  # noqa: E731
    assert names(onnx.load(out)) == names(onnx.load(files["student"]))
    assert not list(tmp_path.glob(".onnxcomp-*"))  # the staging folder is gone


def test_qat_of_an_int8_student_keeps_qdq_and_learns_scales(files, tmp_path):
    teacher = onnx.load(files["teacher"])
    calib = np.load(files["train"])["input"][:32]
    qdq = quantize(perturbed(teacher, 0.2), minmax_ranges(teacher, calib))
    student = tmp_path / "int8.onnx"
    onnx.save(qdq, student)
    out = tmp_path / "qat.onnx"
    job = JobOptions(
        output=out,
        train=TrainConfig(epochs=2, lr=0.02, batch_size=32, device="cpu", augment=False),
        scale_lr=1e-3,
    )
    report = run_job(student, files["teacher"], spec(files), job)
    trained = onnx.load(out)
    onnx.checker.check_model(trained)
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in qdq.graph.node]
    before = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in trained.graph.initializer}
    scales = [n for n in before if n.endswith("_scale")]
    changed = [n for n in scales if not np.array_equal(before[n], after[n])]
    assert len(changed) >= len(scales) // 2
    assert all((after[n] > 0).all() and after[n].dtype == before[n].dtype for n in scales)
    assert report.scales_changed and report.scales_changed > 0
    kl_before, _ = kl_to_teacher(files, student)
    kl_after, _ = kl_to_teacher(files, out)  # ORT runs the QDQ output
    assert kl_after < kl_before


def test_resume_after_an_interruption_matches_an_uninterrupted_run(files, tmp_path):
    full = tmp_path / "full.onnx"
    run_job(files["student"], files["teacher"], spec(files), options(full, 2, augment=True))
    resumed = tmp_path / "resumed.onnx"
    ckpt = tmp_path / "ckpt"
    interrupted = options(resumed, 2, augment=True, checkpoint_dir=ckpt)
    with pytest.raises(KeyboardInterrupt):
        run_job(
            files["student"], files["teacher"], spec(files), interrupted,
            JobHooks(train=StopAfterEpoch(1)),
        )  # fmt: skip
    assert not resumed.exists() and (ckpt / "last.pt").is_file()
    again = options(resumed, 2, augment=True, checkpoint_dir=ckpt, resume=True)
    report = run_job(files["student"], files["teacher"], spec(files), again)
    assert [s.epoch for s in report.history] == [1, 2]
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(full).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(resumed).graph.initializer}
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_resume_refuses_a_checkpoint_of_another_model(files, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_job(
        files["student"], files["teacher"], spec(files),
        options(tmp_path / "a.onnx", 1, checkpoint_dir=ckpt),
    )  # fmt: skip
    other = tmp_path / "other.onnx"
    onnx.save(small_cnn(seed=0, group=8), other)  # depthwise conv2: other shapes
    with pytest.raises(OnnxcompError, match="checkpoint of another model"):
        run_job(
            other, files["teacher"], spec(files),
            options(tmp_path / "b.onnx", 1, checkpoint_dir=ckpt, resume=True),
        )  # fmt: skip


def test_distill_a_torch_student_through_its_onnx_export(files, tmp_path):
    from onnxcomp.export import export_torch

    seen: list[StudentSpec] = []

    def build(student_spec: StudentSpec, folder: Path) -> Path:
        seen.append(student_spec)
        torch.manual_seed(0)
        module = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10),
        )  # fmt: skip
        return export_torch(
            module, folder / "s.onnx", input_shape=student_spec.input_shapes["input"],
            keep_batchnorm=True, input_names=student_spec.input_names,
            output_names=student_spec.output_names,
        )  # fmt: skip

    out = tmp_path / "distilled.onnx"
    report = run_job(build, files["teacher"], spec(files, "labelled"), options(out, 3, lr=0.1))
    assert seen[0] == StudentSpec(["input"], ["logits"], {"input": (1, 3, 8, 8)})
    assert "BatchNormalization" in [n.op_type for n in onnx.load(out).graph.node]
    assert report.change.relative_error > 0  # trained
    assert report.after.outputs[0].cosine > report.before.outputs[0].cosine
    assert report.history[0].accuracy is not None  # labelled data: accuracy reported


def _bad(files, tmp_path, model: onnx.ModelProto, **job) -> None:
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    run_job(path, files["teacher"], spec(files, job.pop("data", "train")),
            options(tmp_path / "o.onnx", 1, **job))  # fmt: skip


def test_different_classes_are_refused_in_one_line(files, tmp_path):
    model = small_cnn(seed=0)
    fc = next(i for i in model.graph.initializer if i.name == "wf")
    fc.CopyFrom(onnx.numpy_helper.from_array(np.zeros((5, 8), np.float32), "wf"))
    bias = next(i for i in model.graph.initializer if i.name == "bf")
    bias.CopyFrom(onnx.numpy_helper.from_array(np.zeros(5, np.float32), "bf"))
    del model.graph.output[0].type.tensor_type.shape.dim[1]
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 5
    with pytest.raises(OnnxcompError, match="the teacher predicts 10 classes, the student 5"):
        _bad(files, tmp_path, model)
    assert not (tmp_path / "o.onnx").exists()


def test_an_op_the_importer_cannot_train_is_named(files, tmp_path):
    model = small_cnn(seed=0)
    relu = next(n for n in model.graph.node if n.name == "relu2")
    relu.CopyFrom(helper.make_node("Softsign", ["c2"], ["r2"], name="relu2"))
    with pytest.raises(OnnxcompError, match=r"bad.onnx: .*node 'relu2' \(Softsign\) cannot"):
        _bad(files, tmp_path, model)


def test_cross_entropy_without_labels_is_refused_kd_only_allowed(files, tmp_path):
    job = JobOptions(
        output=tmp_path / "o.onnx",
        distillation=DistillationConfig(method="ce"),
        train=TrainConfig(epochs=1, batch_size=32, device="cpu"),
    )
    with pytest.raises(OptionError, match="--loss ce needs labels"):
        run_job(files["student"], files["teacher"], spec(files), job)


def test_nan_loss_stops_with_the_learning_rate_advice(files, tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(onnx.load(files["student"]), path)
    job = options(tmp_path / "o.onnx", 1, lr=1e6)
    job = JobOptions(output=job.output, train=job.train, bn_reinsert=False)
    with pytest.raises(OnnxcompError, match=r"lower the learning rate: --lr 1e\+06 -> try"):
        run_job(path, files["teacher"], spec(files, "labelled"), job)
    assert not (tmp_path / "o.onnx").exists()


def test_a_diverged_run_with_reinserted_batchnorm_writes_nothing(files, tmp_path):
    """BatchNorm keeps the loss finite while the weights blow up: the check of the folded model
    against the trained module stops it (or the trainer's NaN check does)."""
    with pytest.raises(OnnxcompError, match=r"lower the learning rate"):
        _bad(files, tmp_path, onnx.load(files["student"]), lr=1e6, data="labelled")
    assert not (tmp_path / "o.onnx").exists()


def test_options_are_checked_when_built(tmp_path):
    with pytest.raises(OptionError, match="--epochs 0 trains nothing"):
        JobOptions(output=tmp_path / "o.onnx", train=None)
    with pytest.raises(OptionError, match="--scale-lr"):
        JobOptions(output=tmp_path / "o.onnx", scale_lr=-1.0)
    with pytest.raises(OptionError, match="--recover"):
        JobOptions(output=tmp_path / "o.onnx", recover="layers")
    assert JobOptions(output=tmp_path / "o.onnx").step_lr() == pytest.approx(SCALE_LR)
    assert JobOptions(output=tmp_path / "o.onnx", scale_lr=3.0).step_lr() == 3.0


def test_a_binarized_student_starts_from_the_teacher_and_trains_back(files, tmp_path):
    """finetune of a binarized student: latent weights from the float teacher (named in the
    report), signs and alphas written back, the file runs in ORT and moves towards the teacher."""
    import onnx_ir as ir

    from onnxcomp.converter.binarize import BinarizeConfig, BinarizePass

    model = ir.from_proto(onnx.load(files["teacher"]))
    BinarizePass(BinarizeConfig(mode="weights", first_last=True))(model)
    student = tmp_path / "binary.onnx"
    onnx.save(ir.to_proto(model), student)
    before = kl_to_teacher(files, student)[0]
    out = tmp_path / "binary-kd.onnx"
    report = run_job(student, files["teacher"], spec(files), options(out, 3, lr=0.01))
    assert any("start from the teacher's weights" in note for note in report.notes)
    trained = onnx.load(out)
    signs = [
        i for i in trained.graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.dims[1:]
    ]
    assert signs and all(set(np.unique(onnx.numpy_helper.to_array(i))) <= {-1, 1} for i in signs)
    assert kl_to_teacher(files, out)[0] < before
