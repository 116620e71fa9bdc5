"""Gradual magnitude pruning during training (onnxcomp/training/gradual.py), on tiny graphs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper
from progress_hooks import StopAfterEpoch

torch = pytest.importorskip("torch")

from int8_models import minmax_ranges, quantize, small_cnn  # noqa: E402

from onnxcomp.converter.sparsify.sparsify_pass import candidate_layers, prune_masks  # noqa: E402
from onnxcomp.core.graph import label  # noqa: E402
from onnxcomp.core.layers import own_weight_layers  # noqa: E402
from onnxcomp.core.ops import SHARED_MARK, SPARSITY_MARK  # noqa: E402
from onnxcomp.errors import OptionError  # noqa: E402
from onnxcomp.training.gradual import (  # noqa: E402
    GradualConfig,
    attach_gradual_pruning,
    schedule_steps,
    target_sparsity,
)
from onnxcomp.training.importer import import_onnx  # noqa: E402
from onnxcomp.training.job import DataSpec, JobHooks, JobOptions, run_job  # noqa: E402
from onnxcomp.training.reparam import fold_batchnorm, reinsert_batchnorm, weight_scales  # noqa: E402
from onnxcomp.training.trainer import TrainConfig  # noqa: E402

torch.set_num_threads(1)
PRUNED = ("w2", "wf")  # small_cnn: conv1 (w1) is the first layer, left dense


def imported(proto: onnx.ModelProto):
    model = ir.from_proto(proto)
    return model, import_onnx(model)


def test_schedule_is_zhu_and_gupta_cubic():
    final, initial, ramp = 0.8, 0.1, 40
    for t in range(0, 50):
        want = final if t >= ramp else final + (initial - final) * (1 - t / ramp) ** 3
        assert target_sparsity(t, ramp, final, initial) == pytest.approx(want)
    # hand-computed: 0.8 + (0.1 - 0.8) * (1 - 20/40)^3 = 0.7125
    assert target_sparsity(20, ramp, final, initial) == pytest.approx(0.7125)
    assert target_sparsity(0, ramp, final, initial) == pytest.approx(initial)
    assert target_sparsity(ramp, ramp, final, initial) == pytest.approx(final)
    assert target_sparsity(0, ramp, final) == 0.0
    steps = [target_sparsity(t, ramp, final) for t in range(ramp + 1)]
    assert all(a <= b for a, b in itertools.pairwise(steps))  # non-decreasing
    assert schedule_steps(100, GradualConfig(0.5, ramp=0.75, updates=20)) == (75, 4)
    assert schedule_steps(3, GradualConfig(0.5, ramp=0.1)) == (1, 1)


def shared_weight_model() -> onnx.ModelProto:
    """Two Gemms after a first one, the last two reading the same weight."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "a", ""], ["h"], name="first", transB=1),
        helper.make_node("Gemm", ["h", "s", ""], ["u"], name="left", transB=1),
        helper.make_node("Gemm", ["h", "s", ""], ["v"], name="right", transB=1),
        helper.make_node("Add", ["u", "v"], ["w"], name="add"),
        helper.make_node("MatMul", ["w", "m"], ["y"], name="last"),
    ]
    inits = [
        tensor("a", rng.normal(size=(4, 4)).astype(np.float32)),
        tensor("s", rng.normal(size=(4, 4)).astype(np.float32)),
        tensor("m", rng.normal(size=(4, 3)).astype(np.float32)),
    ]
    return make_model(nodes, [("x", ["N", 4])], ["y"], inits)


@pytest.mark.parametrize("first_layer", [False, True])
def test_selection_is_the_convert_pass_rule(first_layer):
    for proto in (small_cnn(), shared_weight_model()):
        graph = ir.from_proto(proto).graph
        ours, left = own_weight_layers(graph, first_layer)
        theirs, their_skipped = candidate_layers(graph, first_layer)
        assert [label(la.node) for la in ours] == [label(la.node) for la in theirs]
        assert [(label(n), why) for n, why in left] == [(s.node, s.reason) for s in their_skipped]
    names = [
        str(la.weight.name) for la in own_weight_layers(ir.from_proto(small_cnn()).graph, False)[0]
    ]
    assert names == list(PRUNED)


def train_steps(module, pruner, steps: int, seed: int = 0, lr: float = 0.05):
    """SGD with momentum on random regression targets, calling on_step; the zero sets of the
    pruned weights after each step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    module.train()
    zeros = []
    for step in range(1, steps + 1):
        x = torch.randn(16, 3, 8, 8, generator=gen)
        target = torch.randn(16, 10, generator=gen)
        opt.zero_grad()
        loss = ((module(x)[0] - target) ** 2).mean()
        loss.backward()
        opt.step()
        pruner.on_step(step, steps)
        zeros.append({n: (p.detach() == 0).numpy().copy() for n, p in zip(
            pruner.names, pruner.weights, strict=True)})  # fmt: skip
    return zeros


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_grow_monotonically_and_reach_the_target(scope):
    model, module = imported(small_cnn(seed=1))
    dense_w1 = module.onnx_parameters()["w1"].detach().clone()
    pruner, notes = attach_gradual_pruning(module, model, GradualConfig(0.6, scope, ramp=0.5))
    assert pruner.names == list(PRUNED) and "gradual pruning to 60.0%" in notes[0]
    history = train_steps(module, pruner, 12)
    for before, after in itertools.pairwise(history):
        for name in PRUNED:
            assert (after[name] >= before[name]).all(), name  # once pruned, always zero
    counts = [sum(int(z[n].sum()) for n in PRUNED) for z in history]
    assert counts[0] < counts[5] and counts[5] == counts[-1]  # ramp over the first 6 steps
    sizes = {n: history[-1][n].size for n in PRUNED}
    fractions = pruner.fractions()
    if scope == "layer":
        for name in PRUNED:
            assert int(history[-1][name].sum()) == round(0.6 * sizes[name]), name
    else:
        assert counts[-1] == round(0.6 * sum(sizes.values()))
        assert len({round(fractions[n], 3) for n in PRUNED}) == 2  # layers differ
    w1 = module.onnx_parameters()["w1"].detach()
    assert not torch.equal(w1, dense_w1) and bool((w1 != 0).all())  # trained, first layer dense


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_one_update_from_dense_is_convert_one_shot_pruning(scope):
    model, module = imported(small_cnn(seed=2))
    pruner, _ = attach_gradual_pruning(module, model, GradualConfig(0.7, scope))
    weights = [p.detach().numpy().copy() for p in pruner.weights]
    pruner.update(10, 10)  # the end of the ramp: the final target at once
    want = prune_masks(weights, 0.7, scope)  # the convert pass's numpy masks
    for i, mask in enumerate(want):
        np.testing.assert_array_equal(pruner.mask(i).numpy() == 0, mask)


def test_ranking_reads_the_written_weight_through_reinserted_scales():
    model, module = imported(small_cnn(seed=3))
    w2 = module.onnx_parameters()["w2"]
    factor = torch.ones(8)
    factor[3] = 1e3  # output channel 3 is written 1000x larger: it must survive
    pruner, _ = attach_gradual_pruning(
        module, model, GradualConfig(0.8), scales=lambda: {"w2": factor}
    )
    pruner.update(1, 1)
    assert bool((pruner.mask(0)[3] == 1).all()) and bool((w2.detach()[3] != 0).all())
    assert bool((w2.detach() == 0).sum() == (pruner.mask(0) == 0).sum())
    assert int((pruner.mask(0) == 0).sum()) == round(0.8 * w2.numel())


def test_written_model_with_reinserted_batchnorm_equals_the_module(tmp_path):
    model, module = imported(small_cnn(seed=4))
    pruner, _ = attach_gradual_pruning(
        module, model, GradualConfig(0.5), scales=lambda: weight_scales(module)
    )
    x = np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype(np.float32)
    assert reinsert_batchnorm(module, [{"input": x}])
    train_steps(module, pruner, 6, lr=0.01)
    module.eval()
    with torch.no_grad():
        want = module(torch.from_numpy(x))[0].numpy()
    fold_batchnorm(module)
    out = module.export_onnx()
    path = tmp_path / "pruned.onnx"
    ir.save(out, path)
    got = run(onnx.load(path), {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    for name in PRUNED:
        assert np.mean(inits[name] == 0) == pytest.approx(0.5, abs=1e-3), name


# --------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gradual")
    teacher = small_cnn(seed=0)
    x = np.random.default_rng(1).normal(0, 1, (160, 3, 8, 8)).astype(np.float32)
    paths = {"teacher": folder / "teacher.onnx", "train": folder / "train.npz"}
    paths["val"] = folder / "val.npz"
    onnx.save(teacher, paths["teacher"])
    np.savez(paths["train"], input=x[:128])
    np.savez(paths["val"], input=x[128:])
    return paths


def options(out: Path, sparsity: GradualConfig | None, epochs: int = 2, **train) -> JobOptions:
    config = dict(epochs=epochs, lr=0.01, batch_size=32, device="cpu", augment=True)
    return JobOptions(output=out, train=TrainConfig(**{**config, **train}), sparsity=sparsity)


def spec(files) -> DataSpec:
    return DataSpec(path=files["train"], val=files["val"], batch_size=32)


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_finetune_writes_a_marked_model_at_the_target_sparsity(files, tmp_path):
    out = tmp_path / "out.onnx"
    gradual = GradualConfig(0.75, "global", ramp=0.5)
    report = run_job(files["teacher"], files["teacher"], spec(files), options(out, gradual))
    inits = initializers(out)
    zeros = sum(int((inits[n] == 0).sum()) for n in PRUNED)
    assert zeros == round(0.75 * sum(inits[n].size for n in PRUNED))
    assert (inits["w1"] != 0).all()
    mark = json.loads(onnx.load(out).metadata_props[0].value)
    assert mark == report.sparsity and set(mark) == set(PRUNED)
    assert mark["w2"] == pytest.approx(np.mean(inits["w2"] == 0), abs=1e-6)
    assert any(n.startswith("final sparsity 75.0% overall") for n in report.notes)
    assert any("re-inserted BatchNorm" in n for n in report.notes)  # the fold check ran
    assert report.after.top1_agreement is not None  # ORT ran the written model


def test_resume_after_a_kill_reproduces_masks_and_weights(files, tmp_path):
    gradual = GradualConfig(0.6, "layer", ramp=1.0)  # masks change in both epochs
    full = tmp_path / "full.onnx"
    run_job(files["teacher"], files["teacher"], spec(files), options(full, gradual))
    resumed, ckpt = tmp_path / "resumed.onnx", tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run_job(
            files["teacher"], files["teacher"], spec(files),
            options(resumed, gradual, checkpoint_dir=ckpt), JobHooks(train=StopAfterEpoch(1)),
        )  # fmt: skip
    state = torch.load(ckpt / "last.pt", weights_only=False)["model"]
    halfway = [k for k in state if "gradual_masks" in k]
    assert halfway and 0 < float((state[halfway[0]] == 0).double().mean()) < 0.6
    run_job(
        files["teacher"], files["teacher"], spec(files),
        options(resumed, gradual, checkpoint_dir=ckpt, resume=True),
    )  # fmt: skip
    a, b = initializers(full), initializers(resumed)
    for name in PRUNED:
        np.testing.assert_array_equal(a[name] == 0, b[name] == 0, err_msg=name)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_student_sparser_than_the_target_keeps_its_zeros(files, tmp_path):
    proto = small_cnn(seed=0)
    w2 = onnx.numpy_helper.to_array(proto.graph.initializer[2]).copy()
    w2[np.abs(w2) < np.quantile(np.abs(w2), 0.9)] = 0  # 90 % zeros
    proto.graph.initializer[2].CopyFrom(onnx.numpy_helper.from_array(w2, "w2"))
    proto.metadata_props.add(key=SPARSITY_MARK, value=json.dumps({"w2": 0.9}))
    student, out = tmp_path / "sparse.onnx", tmp_path / "out.onnx"
    onnx.save(proto, student)
    report = run_job(student, files["teacher"], spec(files), options(out, GradualConfig(0.5)))
    inits = initializers(out)
    np.testing.assert_array_equal(inits["w2"] == 0, w2 == 0)  # no zero revived, none added
    assert np.mean(inits["wf"] == 0) == pytest.approx(0.5, abs=0.01)
    assert any("already sparser than 50.0%" in n for n in report.notes)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"sparsity": 1.0}, "--sparsity"),
        ({"sparsity": -0.1}, "--sparsity"),
        ({"sparsity": 0.5, "scope": "net"}, "--sparsity-scope"),
        ({"sparsity": 0.5, "ramp": 0.0}, "--sparsity-ramp"),
        ({"sparsity": 0.5, "ramp": 1.5}, "--sparsity-ramp"),
        ({"sparsity": 0.5, "updates": 0}, "updates"),
    ],
)
def test_bad_options_are_one_line_option_errors(kwargs, flag):
    with pytest.raises(OptionError, match=flag):
        GradualConfig(**kwargs)


def test_sparsity_needs_epochs(tmp_path):
    with pytest.raises(OptionError, match="--epochs"):
        JobOptions(output=tmp_path / "o.onnx", train=None, recover="blocks",
                   sparsity=GradualConfig(0.5))  # fmt: skip


def test_cli_flags_without_sparsity_are_refused(tmp_path):
    from onnxcomp.cli.train_options import PruneScope, TrainFlags, gradual_config

    base = TrainFlags(teacher=tmp_path / "t.onnx", data=tmp_path, output=tmp_path / "o.onnx")
    assert gradual_config(base) is None
    for change, flag in (
        ({"sparsity_ramp": 0.5}, "--sparsity-ramp"),
        ({"sparsity_scope": PruneScope("global")}, "--sparsity-scope"),
        ({"compress_first_layer": True}, "--compress-first-layer"),
    ):  # fmt: skip
        with pytest.raises(OptionError, match=flag):
            gradual_config(TrainFlags(**{**vars(base), **change}))
    config = gradual_config(TrainFlags(**{**vars(base), "sparsity": 0.3}))
    assert (config.sparsity, config.scope, config.ramp) == (0.3, "layer", 0.75)


def test_quantized_shared_and_unprunable_students_are_refused():
    teacher = small_cnn(seed=0)
    calib = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    model, module = imported(quantize(teacher, minmax_ranges(teacher, calib)))
    with pytest.raises(OptionError, match="quantized"):
        attach_gradual_pruning(module, model, GradualConfig(0.5))
    proto = small_cnn(seed=0)
    proto.metadata_props.add(key=SHARED_MARK, value=json.dumps({"w2": 16}))
    model, module = imported(proto)
    with pytest.raises(OptionError, match="k-means shared"):
        attach_gradual_pruning(module, model, GradualConfig(0.5))
    single = make_model(
        [helper.make_node("MatMul", ["x", "m"], ["y"])], [("x", ["N", 4])], ["y"],
        [tensor("m", np.ones((4, 2), np.float32))],
    )  # fmt: skip
    model, module = imported(single)
    with pytest.raises(OptionError, match="no prunable weight"):
        attach_gradual_pruning(module, model, GradualConfig(0.5))
    pruner, _ = attach_gradual_pruning(module, model, GradualConfig(0.5, first_layer=True))
    assert pruner.names == ["m"]


def cli(capsys, *args) -> tuple[int, str, str]:
    from onnxcomp.cli.entry import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_command_prunes_and_refuses_bad_flags_in_one_line(capsys, files, tmp_path):
    out = tmp_path / "cli.onnx"
    common = [
        "finetune", files["teacher"], "--teacher", files["teacher"], "--data", files["train"],
        "--val", files["val"], "-o", out, "--batch-size", "32", "--device", "cpu",
        "--epochs", "1",
    ]  # fmt: skip
    code, stdout, err = cli(capsys, *common, "--sparsity", "0.5", "--sparsity-scope", "global")
    assert code == 0, err
    assert "final sparsity 50.0% overall" in stdout
    inits = initializers(out)
    assert sum(int((inits[n] == 0).sum()) for n in PRUNED) == round(0.5 * (576 + 80))
    for extra, fragment in (
        (["--sparsity", "1.5"], "--sparsity 1.5: give a fraction in [0, 1)"),
        (["--sparsity", "0.5", "--sparsity-ramp", "2"], "--sparsity-ramp 2.0"),
        (["--sparsity-ramp", "0.5"], "--sparsity-ramp applies to --sparsity S"),
    ):
        code, _, err = cli(capsys, *common, "--force", *extra)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and fragment in err, err
