"""Re-inserted BatchNorm (training/reparam.py) on small hand-built graphs: eval-mode identity,
fold-back checked in ONNX Runtime, structure, zeros, dead channels, skip rules; and its wiring
in the finetune job and CLI (flag, lr defaults, --dkd-warmup, the teacher read once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import bn_node, bn_params, make_model, run, tensor
from onnx import helper

torch = pytest.importorskip("torch")

from int8_models import minmax_ranges, quantize, small_cnn  # noqa: E402

from onnxcomp.errors import OnnxcompError, OptionError  # noqa: E402
from onnxcomp.training import job as job_module  # noqa: E402
from onnxcomp.training import teacher as teacher_module  # noqa: E402
from onnxcomp.training.importer import import_onnx  # noqa: E402
from onnxcomp.training.job import (  # noqa: E402
    DEFAULT_LR,
    DataSpec,
    JobOptions,
    _train_config,
    run_job,
    student_kind,
)
from onnxcomp.training.reparam import (  # noqa: E402
    fold_batchnorm,
    plan_reinsertion,
    reinsert_batchnorm,
    reinserted,
)
from onnxcomp.training.trainer import TrainConfig  # noqa: E402

torch.set_num_threads(1)
RNG = np.random.default_rng(0)


def folded_cnn() -> onnx.ModelProto:
    """conv1 (scales 1e-2..1e2 per filter, as folding leaves them) -> relu -> depthwise conv2
    -> relu -> conv3 (no bias) -> conv4 -> BN -> GAP -> fc."""
    w1 = RNG.normal(0, 0.4, (8, 3, 3, 3)) * np.logspace(-2, 2, 8).reshape(-1, 1, 1, 1)
    inits = [
        tensor("w1", w1.astype(np.float32)),
        tensor("b1", RNG.normal(0, 0.5, 8).astype(np.float32)),
        tensor("w2", RNG.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32)),
        tensor("b2", RNG.normal(0, 0.1, 8).astype(np.float32)),
        tensor("w3", RNG.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32)),
        tensor("w4", RNG.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32)),
        tensor("b4", RNG.normal(0, 0.1, 8).astype(np.float32)),
        *bn_params("bn", 8),
        tensor("wf", RNG.normal(0, 1.0, (10, 8)).astype(np.float32)),
        tensor("bf", RNG.normal(0, 0.1, 10).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4, group=8),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"),
        helper.make_node("Conv", ["c3", "w4", "b4"], ["c4"], name="conv4"),
        bn_node("bn", "c4", "n4"),
        helper.make_node("GlobalAveragePool", ["n4"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    return make_model(nodes, [("input", ["N", 3, 8, 8])], ["logits"], inits, opset=17)


X = RNG.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)


def batches(x=X, size=16):
    return [{"input": x[i : i + size]} for i in range(0, len(x), size)]


def eval_out(module, x=X) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x))[0].numpy()


def sgd_steps(module, steps=5, lr=0.05, weight_decay=5e-4) -> None:
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    target = torch.from_numpy(RNG.normal(0, 1, (16, 10)).astype(np.float32))
    for i in range(steps):
        out = module(torch.from_numpy(X[i * 8 : i * 8 + 16]))[0]
        loss = ((out - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_eval_mode_is_the_plain_import_and_skips_are_named():
    model = folded_cnn()
    plain = import_onnx(ir.from_proto(model))
    module = import_onnx(ir.from_proto(model))
    labels = reinsert_batchnorm(module, batches())
    assert labels == ["Conv 'conv1'", "Conv 'conv2'"]  # depthwise included
    skipped = plan_reinsertion(module).skipped
    assert skipped["Conv 'conv3'"] == "no bias initializer"
    assert "already read by a BatchNormalization" in skipped["Conv 'conv4'"]
    ref = eval_out(plain)
    np.testing.assert_allclose(eval_out(module), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert reinserted(module) == labels
    w1 = module.onnx_parameters()["w1"].detach().flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(w1, 1.0, rtol=1e-5)  # every filter normalised
    with pytest.raises(OnnxcompError, match="already re-inserted"):
        reinsert_batchnorm(module, batches())


def test_fold_back_after_sgd_equals_the_trained_module_in_onnxruntime(tmp_path):
    model = folded_cnn()
    module = import_onnx(ir.from_proto(model))
    reinsert_batchnorm(module, batches())
    sgd_steps(module)
    trained = eval_out(module)
    assert fold_batchnorm(module) == ["Conv 'conv1'", "Conv 'conv2'"]
    assert reinserted(module) == [] and fold_batchnorm(module) == []
    path = tmp_path / "folded.onnx"
    ir.save(module.export_onnx(), path)
    written = onnx.load(path)
    got = run(written, {"input": X})[0]  # the independent reference: ORT on the file
    np.testing.assert_allclose(got, trained, rtol=1e-4, atol=1e-5 * np.abs(trained).max())
    assert not np.allclose(got, run(model, {"input": X})[0], atol=1e-3)  # it did train
    shape = lambda m: [(n.name, n.op_type, list(n.input), list(n.output)) for n in m.graph.node]  # noqa: E731
    inits = lambda m: [(i.name, tuple(i.dims), i.data_type) for i in m.graph.initializer]  # noqa: E731
    assert shape(written) == shape(model)
    assert inits(written) == inits(model)


def test_zeros_parameters_and_their_hooks_survive():
    model = folded_cnn()
    module = import_onnx(ir.from_proto(model))
    w1 = module.onnx_parameters()["w1"]
    with torch.no_grad():
        w1[:, 0] = 0.0  # a sparsity mask, kept by a gradient hook as a constraint would
    mask = (w1 != 0).float()
    calls = []
    w1.register_hook(lambda g: calls.append(1) or g * mask)
    reinsert_batchnorm(module, batches())
    assert module.onnx_parameters()["w1"] is w1
    sgd_steps(module, steps=3)
    fold_batchnorm(module)
    assert module.onnx_parameters()["w1"] is w1 and len(calls) == 3
    exported = ir.to_proto(module.export_onnx())
    written = {i.name: onnx.numpy_helper.to_array(i) for i in exported.graph.initializer}
    assert np.all(written["w1"][:, 0] == 0.0)
    assert np.count_nonzero(written["w1"][:, 1:]) == written["w1"][:, 1:].size


def test_a_dead_channel_gives_no_nan():
    model = folded_cnn()
    module = import_onnx(ir.from_proto(model))
    params = module.onnx_parameters()
    with torch.no_grad():
        params["w1"][2] = 0.0  # dead filter: constant output (its bias), variance 0
        params["w1"][3] = 1e-30  # norm below MIN_NORM
    ref = eval_out(module)
    reinsert_batchnorm(module, batches())
    np.testing.assert_allclose(eval_out(module), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    sgd_steps(module, steps=2)
    fold_batchnorm(module)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert np.isfinite(eval_out(module)).all()
    assert float(params["w1"][2:4].detach().abs().max()) < 1.0  # trained, not blown up


def test_qdq_parametrized_and_shared_weights_are_left_alone():
    teacher = small_cnn(seed=0)
    qdq = quantize(teacher, minmax_ranges(teacher, X[:, :, :, :]))
    module = import_onnx(ir.from_proto(qdq))
    steps = list(module._steps)
    assert reinsert_batchnorm(module, batches()) == []
    assert module._steps == steps and student_kind(module) == "int8"
    skipped = plan_reinsertion(module).skipped
    assert all("is not a float initializer" in why for why in skipped.values()), skipped

    module = import_onnx(ir.from_proto(small_cnn(seed=0)))
    scale = module._keys["w1"]

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(module.params, scale, Double())
    plan = plan_reinsertion(module)
    assert "parametrization" in plan.skipped["Conv 'conv1'"]
    assert len(plan.steps) == 1 and student_kind(module) == "float"

    shared = small_cnn(seed=0)
    shared.graph.node[2].input[2] = "b1"  # conv2 reads conv1's bias
    plan = plan_reinsertion(import_onnx(ir.from_proto(shared)))
    assert plan.steps == () and "shared" in plan.skipped["Conv 'conv1'"]


def test_default_learning_rate_by_student_kind(tmp_path):
    float_module = import_onnx(ir.from_proto(small_cnn(seed=0)))
    job = JobOptions(output=tmp_path / "o.onnx", train=TrainConfig(lr=0.5), lr_by_kind=True)
    config, notes = _train_config(job, float_module)
    assert config.lr == DEFAULT_LR["float"] and "float" in notes[0]
    qdq = quantize(small_cnn(seed=0), minmax_ranges(small_cnn(seed=0), X))
    config, _ = _train_config(job, import_onnx(ir.from_proto(qdq)))
    assert config.lr == DEFAULT_LR["int8"] == 5e-5
    given = JobOptions(output=tmp_path / "o.onnx", train=TrainConfig(lr=0.5))
    assert _train_config(given, float_module) == (given.train, [])
    from onnxcomp.converter.binarize import BinarizeConfig, BinarizePass

    binary = ir.from_proto(small_cnn(seed=0))
    BinarizePass(BinarizeConfig(mode="weights", first_last=True))(binary)
    binary_module = import_onnx(binary)
    config, notes = _train_config(job, binary_module)
    assert config.lr == DEFAULT_LR["binary"] and "binary" in notes[0]
    assert reinsert_batchnorm(binary_module, batches()) == []  # weights behind DequantizeLinear


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reparam_job")
    teacher, student = folder / "teacher.onnx", folder / "student.onnx"
    onnx.save(small_cnn(seed=0), teacher)
    onnx.save(small_cnn(seed=3), student)
    np.savez(folder / "train.npz", input=X)
    return {"teacher": teacher, "student": student, "train": folder / "train.npz"}


def _job(files, out, **extra):
    config = TrainConfig(epochs=1, lr=0.05, batch_size=16, device="cpu", augment=False)
    options = JobOptions(output=out, train=config, verify=False, **extra)
    return run_job(files["student"], files["teacher"], DataSpec(files["train"]), options)


def test_the_job_reinserts_folds_back_and_reads_the_teacher_once(files, tmp_path, monkeypatch):
    loads = []
    real = job_module.load_model

    def counting(path, *args, **kwargs):
        loads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(job_module, "load_model", counting)
    monkeypatch.setattr(teacher_module, "load_model", counting)
    out = tmp_path / "on.onnx"
    report = _job(files, out)
    assert loads.count(str(files["teacher"])) == 1
    note = [n for n in report.notes if "re-inserted BatchNorm" in n]
    assert note and note[0].startswith("2 conv(s) trained with re-inserted BatchNorm, folded back")
    names = lambda m: [(n.name, n.op_type) for n in m.graph.node]  # noqa: E731
    assert names(onnx.load(out)) == names(onnx.load(files["student"]))
    off = _job(files, tmp_path / "off.onnx", bn_reinsert=False)
    assert not [n for n in off.notes if "re-inserted BatchNorm" in n]
    a = run(onnx.load(out), {"input": X})[0]
    b = run(onnx.load(tmp_path / "off.onnx"), {"input": X})[0]
    assert not np.allclose(a, b, atol=1e-4)  # the flag changes the training


def test_cli_flags_bn_reinsert_dkd_warmup_and_lr_default(files, tmp_path):
    from onnxcomp.cli.options import SessionFlags
    from onnxcomp.cli.train_options import Loss, TrainFlags, job_options

    def options(default_lr=None, **flags):
        base = dict(teacher=files["teacher"], data=files["train"], output=tmp_path / "o.onnx")
        return job_options(TrainFlags(**base, **flags), SessionFlags(), default_lr)

    assert options().bn_reinsert and options().lr_by_kind
    assert not options(bn_reinsert=False).bn_reinsert
    assert not options(lr=0.3).lr_by_kind and options(lr=0.3).train.lr == 0.3
    assert not options(0.1).lr_by_kind and options(0.1).train.lr == 0.1  # distill
    dkd = options(loss=Loss.dkd, dkd_warmup=3)  # type: ignore[attr-defined]
    assert dkd.distillation.dkd_warmup == 3
    assert dkd.distillation.objective("logits").losses[0].warmup == 3
    with pytest.raises(OptionError, match="--dkd-warmup applies to --loss dkd"):
        options(dkd_warmup=2)


def _ddp_job(rank: int, port: int, files: dict, out: str) -> None:
    import json
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    report = _job(files, Path(out) / "ddp.onnx")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report.notes))


def test_the_job_with_reinserted_batchnorm_under_two_gloo_processes(files, tmp_path):
    """Every process re-inserts the same BatchNorms (DDP needs the same parameters); rank 0
    alone folds back, checks and writes."""
    import json
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (port, files, str(tmp_path))
    torch.multiprocessing.start_processes(_ddp_job, args, nprocs=2, start_method="fork")
    notes = json.loads((tmp_path / "rank0.json").read_text())
    assert any(n.startswith("2 conv(s) trained with re-inserted BatchNorm") for n in notes)
    assert json.loads((tmp_path / "rank1.json").read_text()) == []
    written = onnx.load(tmp_path / "ddp.onnx")
    assert [n.op_type for n in written.graph.node] == [
        n.op_type for n in onnx.load(files["student"]).graph.node
    ]
    assert np.isfinite(run(written, {"input": X})[0]).all()
