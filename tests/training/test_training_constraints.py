"""Sparsity masks and codebook training (onnxcomp/training/constraints.py) on tiny graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper

torch = pytest.importorskip("torch")

from onnxcomp.errors import OnnxcompError  # noqa: E402
from onnxcomp.training.constraints import apply_weight_constraints  # noqa: E402
from onnxcomp.training.importer import import_onnx  # noqa: E402

torch.set_num_threads(1)
RNG = np.random.default_rng(3)


def tiny(marks: dict[str, dict] | None = None, seed: int = 0) -> onnx.ModelProto:
    """Conv(W1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(W2): W1 half zeros, W2 four
    distinct values (0 among them)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    w1[np.abs(w1) < np.median(np.abs(w1))] = 0
    w2 = rng.choice(np.array([-0.5, 0.0, 0.25, 0.75], np.float32), (5, 4))
    w2[0, :4] = [-0.5, 0.0, 0.25, 0.75]  # every value present
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "W2", "b2"], ["y"], transB=1),
    ]
    inits = [
        tensor("W1", w1),
        tensor("b1", rng.normal(0, 0.1, 4).astype(np.float32)),
        tensor("W2", w2),
        tensor("b2", np.zeros(5, np.float32)),
    ]
    model = make_model(nodes, [("x", ["N", 3, 6, 6])], ["y"], inits)
    for key, value in (marks or {}).items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    return model


SPARSE = {"onnxcomp.sparsity": {"W1": 0.5}}
SHARED = {"onnxcomp.shared": {"W2": 4}}


def imported(proto: onnx.ModelProto):
    model = ir.from_proto(proto)
    return model, import_onnx(model)


def sgd_steps(module, steps: int = 3, lr: float = 0.1, **sgd) -> None:
    x = torch.from_numpy(RNG.normal(0, 1, (8, 3, 6, 6)).astype(np.float32))
    target = torch.from_numpy(RNG.normal(0, 1, (8, 5)).astype(np.float32))
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, **sgd)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x)[0], target)
        loss.backward()
        optimizer.step()


def weight(module, name: str) -> np.ndarray:
    return module.tensors()[name].detach().numpy().copy()


def test_masked_zeros_stay_zero_under_sgd_momentum_and_weight_decay():
    model, module = imported(tiny(SPARSE))
    notes = apply_weight_constraints(module, model)
    assert any("sparsity kept: 1 weight(s)" in n for n in notes)
    w1, w2 = weight(module, "W1"), weight(module, "W2")
    sgd_steps(module, momentum=0.9, weight_decay=5e-4)
    after = weight(module, "W1")
    assert np.all(after[w1 == 0] == 0)
    assert np.all(after[w1 != 0] != w1[w1 != 0])  # the others trained
    assert not np.array_equal(weight(module, "W2"), w2)  # unmarked: trained freely
    # without the constraint the same steps move the zeros (so the check above can fail)
    _, free = imported(tiny(SPARSE))
    sgd_steps(free, momentum=0.9, weight_decay=5e-4)
    assert np.count_nonzero(weight(free, "W1")[w1 == 0]) > 0


def test_a_shared_weight_trains_its_centroids_by_the_mean_member_gradient():
    proto = tiny(SHARED)
    model, module = imported(proto)
    notes = apply_weight_constraints(module, model)
    assert any("weight sharing kept: 1 weight(s)" in n for n in notes)
    w2 = weight(module, "W2")
    # the reference: the dense weight's gradient in an unconstrained copy, summed per value
    _, free = imported(proto)
    x = torch.from_numpy(RNG.normal(0, 1, (8, 3, 6, 6)).astype(np.float32))
    for m in (module, free):
        m(x)[0].pow(2).sum().backward()
    dense_grad = free.onnx_parameters()["W2"].grad.numpy()
    centroids = module.params.parametrizations[module._keys["W2"]].original
    # autograd's sum of the members' gradients, divided by the member count (the hook)
    expected = [dense_grad[w2 == v].mean() for v in (-0.5, 0.25, 0.75)]
    np.testing.assert_allclose(centroids.grad.numpy(), expected, rtol=1e-5, atol=1e-7)
    before = centroids.detach().numpy().copy()
    with torch.no_grad():
        centroids -= 0.1 * centroids.grad
    after = weight(module, "W2")
    for i, v in enumerate((-0.5, 0.25, 0.75)):  # every member moved with its centroid
        np.testing.assert_allclose(after[w2 == v], before[i] - 0.1 * expected[i], rtol=1e-6)
    assert np.all(after[w2 == 0] == 0)  # the zero cluster is fixed
    assert np.unique(after).size <= 4


def test_training_and_export_keep_both_structures_and_match_the_module_in_ort():
    proto = tiny({**SPARSE, "onnxcomp.shared": {"W1": 8, "W2": 4}}, seed=1)
    w1 = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    shared_w1 = np.where(w1 == 0, 0, np.round(w1 * 2) / 2).astype(np.float32)
    proto.graph.initializer[0].CopyFrom(tensor("W1", shared_w1))
    model, module = imported(proto)
    apply_weight_constraints(module, model)
    sgd_steps(module, steps=4, momentum=0.9, weight_decay=5e-4)
    module.eval()
    exported = ir.to_proto(module.export_onnx())
    marks = {p.key: p.value for p in exported.metadata_props}
    assert json.loads(marks["onnxcomp.shared"]) == {"W1": 8, "W2": 4}
    assert json.loads(marks["onnxcomp.sparsity"]) == {"W1": 0.5}
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in exported.graph.initializer}
    assert np.array_equal(arrays["W1"] == 0, shared_w1 == 0)  # sparse and shared: zeros kept
    assert np.unique(arrays["W1"]).size <= 8 and np.unique(arrays["W2"]).size <= 4
    assert not np.array_equal(arrays["W1"], shared_w1)
    x = RNG.normal(0, 1, (2, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(run(exported, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)


def test_a_model_without_marks_is_left_as_it_is():
    model, module = imported(tiny())
    keys = list(module.state_dict())
    assert apply_weight_constraints(module, model) == []
    assert list(module.state_dict()) == keys
    assert not hasattr(module.params, "parametrizations")


def test_marks_that_cannot_be_kept_are_notes_and_a_broken_mark_is_one_line():
    marks = {"onnxcomp.shared": {"W1": 4, "gone": 4}, "onnxcomp.sparsity": {"W2": 0.2, "b1": 0.1}}
    proto = tiny(marks)
    model, module = imported(proto)
    notes = apply_weight_constraints(module, model)
    assert any("not trainable float initializers" in n and "gone" in n for n in notes)
    assert any(n.startswith("W1: ") and "> K=4" in n for n in notes)  # W1: ~50 values
    assert any(n.startswith("b1: ") and "holds no zeros" in n for n in notes)
    assert any("sparsity kept: 1 weight(s)" in n for n in notes)  # W2 holds zeros
    assert not hasattr(module.params, "parametrizations")
    bad = tiny()
    bad.metadata_props.add(key="onnxcomp.sparsity", value="{not json")
    model, module = imported(bad)
    with pytest.raises(OnnxcompError, match=r"onnxcomp\.sparsity.*not JSON"):
        apply_weight_constraints(module, model)


def test_the_finetune_job_keeps_a_pruned_and_shared_student_and_says_so(tmp_path):
    from onnxcomp.training.job import DataSpec, JobOptions, run_job
    from onnxcomp.training.trainer import TrainConfig

    teacher = tiny(seed=2)
    student = tiny({**SPARSE, **SHARED}, seed=2)
    w1 = onnx.numpy_helper.to_array(student.graph.initializer[0]) * 1.5  # damaged
    student.graph.initializer[0].CopyFrom(tensor("W1", w1))
    onnx.save(teacher, tmp_path / "teacher.onnx")
    onnx.save(student, tmp_path / "student.onnx")
    np.savez(tmp_path / "x.npz", x=RNG.normal(0, 1, (32, 3, 6, 6)).astype(np.float32))
    out = tmp_path / "out.onnx"
    config = TrainConfig(epochs=2, lr=0.05, batch_size=16, device="cpu", augment=False)
    report = run_job(
        tmp_path / "student.onnx",
        tmp_path / "teacher.onnx",
        DataSpec(path=tmp_path / "x.npz", batch_size=16),
        JobOptions(output=out, train=config, verify=False),
    )
    assert any("sparsity kept: 1" in n for n in report.notes)
    assert any("weight sharing kept: 1" in n for n in report.notes)
    trained = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    assert np.array_equal(trained["W1"] == 0, w1 == 0) and not np.array_equal(trained["W1"], w1)
    assert np.unique(trained["W2"]).size <= 4 and np.sum(trained["W2"] == 0) == np.sum(
        onnx.numpy_helper.to_array(student.graph.initializer[2]) == 0
    )
