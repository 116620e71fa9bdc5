"""Block-wise recovery: block detection, OnnxModule.run_from, fitting to the teacher in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper

torch = pytest.importorskip("torch")

from int8_models import minmax_ranges, quantize, small_cnn  # noqa: E402

from onnxcomp.errors import OnnxcompError, OptionError  # noqa: E402
from onnxcomp.training.data import TrainingData  # noqa: E402
from onnxcomp.training.importer import import_onnx  # noqa: E402
from onnxcomp.training.recover import (  # noqa: E402
    Boundary,
    RecoverConfig,
    find_boundaries,
    recover_blocks,
)

torch.set_num_threads(1)
node = helper.make_node


def residual(seed: int = 0, inner: int = 4, stem: int = 4, join: str = "r1") -> onnx.ModelProto:
    """x -> conv0 -> relu r0 -> [conv1 -> relu -> conv2 -> +r0 -> relu r1] -> [conv3 -> +r1 ->
    relu r2] -> GAP -> flatten -> fc (5 classes). ``inner`` channels inside the first block
    (pruned students have fewer), ``stem`` channels on the residual stream."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape).astype(np.float32)

    inits = [
        tensor("w0", w(stem, 3, 3, 3)),
        tensor("b0", rng.normal(0, 0.1, stem).astype(np.float32)),
        tensor("w1", w(inner, stem, 3, 3)),
        tensor("b1", rng.normal(0, 0.1, inner).astype(np.float32)),
        tensor("w2", w(stem, inner, 3, 3)),
        tensor("b2", rng.normal(0, 0.1, stem).astype(np.float32)),
        tensor("w3", w(stem, stem, 3, 3)),
        tensor("b3", rng.normal(0, 0.1, stem).astype(np.float32)),
        tensor("wf", w(5, stem)),
        tensor("bf", rng.normal(0, 0.1, 5).astype(np.float32)),
    ]
    pads = {"pads": [1, 1, 1, 1]}
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", **pads),
        node("Relu", ["c0"], ["r0"], name="relu0"),
        node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", **pads),
        node("Relu", ["c1"], ["a1"], name="relu1"),
        node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", **pads),
        node("Add", ["c2", "r0"], ["s1"], name="add1"),
        node("Relu", ["s1"], [join], name="relu_s1"),
        node("Conv", [join, "w3", "b3"], ["c3"], name="conv3", **pads),
        node("Add", ["c3", join], ["s2"], name="add2"),
        node("Relu", ["s2"], ["r2"], name="relu_s2"),
        node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        node("Flatten", ["gap"], ["flat"], name="flatten"),
        node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    return make_model(nodes, [("x", ["N", 3, 6, 6])], ["logits"], inits)


def pruned(teacher: onnx.ModelProto, keep: int = 2) -> onnx.ModelProto:
    """The teacher with conv1's output channels cut to ``keep`` (conv2's inputs with them)."""
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for init in student.graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if init.name in ("w1", "b1"):
            init.CopyFrom(tensor(init.name, array[:keep]))
        elif init.name == "w2":
            init.CopyFrom(tensor(init.name, array[:, :keep]))
    return student


def data(count: int = 64, seed: int = 1) -> TrainingData:
    x = np.random.default_rng(seed).normal(0, 1, (count, 3, 6, 6)).astype(np.float16)
    return TrainingData({"x": x}, None, "test data")


def taps(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The named tensors of ``model`` in ONNX Runtime."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return dict(zip(names, run(proto, {"x": x}), strict=True))


# --------------------------------------------------------------------------- boundaries


def test_boundaries_of_a_residual_graph():
    found, kind = find_boundaries(ir.from_proto(residual()).graph)
    assert kind == "residual blocks"
    assert found == [Boundary("r1", "r1"), Boundary("r2", "r2")]


def test_boundaries_without_residual_adds_are_layers():
    found, kind = find_boundaries(ir.from_proto(small_cnn()).graph)
    assert kind == "layers"
    assert found == [Boundary("r1", "r1"), Boundary("r2", "r2")]  # logits: a graph output


def test_boundaries_of_an_int8_student_follow_its_qdq_pairs():
    model = small_cnn()
    x = np.random.default_rng(0).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    student = ir.from_proto(quantize(model, minmax_ranges(model, x)))
    found, kind = find_boundaries(student.graph)
    teacher_names = {o for n in model.graph.node for o in n.output}
    assert kind == "layers" and len(found) == 2
    producers = {v.name: n for n in student.graph for v in n.outputs}
    for boundary in found:
        assert producers[boundary.tensor].op_type == "DequantizeLinear"
        assert boundary.target in teacher_names


def test_boundaries_of_a_cifar_resnet_export(tmp_path):
    from models.resnet_cifar import ResNetCifar
    from onnxcomp.export import export_torch

    torch.manual_seed(0)
    path = export_torch(ResNetCifar(1).eval(), tmp_path / "resnet8.onnx")
    graph = ir.load(path).graph
    found, kind = find_boundaries(graph)
    producers = {v.name: n for n in graph for v in n.outputs}
    assert kind == "residual blocks" and len(found) == 3  # one block per stage
    for boundary in found:  # each after the Relu that follows a residual Add
        assert boundary.tensor == boundary.target
        relu = producers[boundary.tensor]
        assert relu.op_type == "Relu" and relu.inputs[0].producer().op_type == "Add"


# --------------------------------------------------------------------------- run_from


def test_run_from_equals_run_on_the_full_graph():
    model = residual()
    module = import_onnx(ir.from_proto(model))
    x = torch.from_numpy(data(8).arrays["x"].astype(np.float32))
    with torch.no_grad():
        full = module.run({"x": x}, ["r0", "a1", "r1", "r2"])
        part = module.run_from({"r0": full["r0"]}, ["r1"])
        tail = module.run_from({"r1": full["r1"]}, ["logits", "r2"])
    assert list(part) == ["r1"] and torch.equal(part["r1"], full["r1"])
    assert torch.equal(tail["logits"], full["logits"]) and torch.equal(tail["r2"], full["r2"])
    assert module.run_from({"r1": full["r1"]}, ["r1"])["r1"] is full["r1"]


def test_run_from_runs_only_the_nodes_it_needs():
    model = residual()
    module = import_onnx(ir.from_proto(model))
    r0 = torch.rand(2, 4, 6, 6)
    with torch.no_grad():  # a1 fed as zeros: conv1 must not run, so r1 = relu(b2 + r0)
        out = module.run_from({"r0": r0, "a1": torch.zeros(2, 4, 6, 6)}, ["r1"])["r1"]
    b2 = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b2"))
    np.testing.assert_allclose(out.numpy(), np.maximum(r0.numpy() + b2[:, None, None], 0))


def test_run_from_refuses_what_it_cannot_compute():
    module = import_onnx(ir.from_proto(residual()))
    with pytest.raises(OnnxcompError, match="'x' is not fed") as error:
        module.run_from({}, ["r1"])
    assert "\n" not in str(error.value)
    with pytest.raises(OnnxcompError, match="'nope' is not a tensor of the model"):
        module.run_from({"r0": torch.zeros(1, 4, 6, 6)}, ["nope"])


# --------------------------------------------------------------------------- recovery


def test_recovery_lowers_each_block_error_and_the_exported_output_error():
    teacher = residual()
    student = pruned(teacher)
    samples = data(64)
    module = import_onnx(ir.from_proto(student))
    config = RecoverConfig(iterations=150, lr=0.01, batch_size=16, samples=64)
    result = recover_blocks(module, ir.from_proto(teacher), samples, config)

    assert [b.name for b in result.blocks] == ["r1", "r2", "outputs"]
    # the first block's error before, computed independently in ORT on the same samples
    x = samples.arrays["x"].astype(np.float32)
    want = np.mean((taps(student, ["r1"], x)["r1"] - taps(teacher, ["r1"], x)["r1"]) ** 2)
    assert result.blocks[0].loss_before == pytest.approx(want, rel=1e-4)
    for block in result.blocks:
        assert block.kept and block.loss_after < block.loss_before
    assert result.blocks[0].loss_after < 0.5 * result.blocks[0].loss_before
    assert result.notes and "3 residual blocks on 64 samples" in result.notes[0]

    held_out = data(32, seed=7).arrays["x"].astype(np.float32)
    recovered = ir.to_proto(module.export_onnx())
    reference = run(teacher, {"x": held_out})[0]
    before = np.abs(run(student, {"x": held_out})[0] - reference).mean()
    after = np.abs(run(recovered, {"x": held_out})[0] - reference).mean()
    assert after < 0.7 * before


def test_recovery_of_an_int8_student_trains_weights_and_steps():
    rng = np.random.default_rng(3)
    teacher = small_cnn()
    noisy = onnx.ModelProto()
    noisy.CopyFrom(teacher)
    for init in noisy.graph.initializer:
        if init.name in ("w1", "w2"):
            array = onnx.numpy_helper.to_array(init)
            noise = rng.normal(0, 0.1, array.shape).astype(np.float32)
            init.CopyFrom(tensor(init.name, array + noise))
    x = rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    student = quantize(noisy, minmax_ranges(noisy, x))
    module = import_onnx(ir.from_proto(student))
    config = RecoverConfig(iterations=100, lr=3e-3, step_lr=1e-4, batch_size=16, samples=64)
    result = recover_blocks(
        module, ir.from_proto(teacher), TrainingData({"input": x}, None, "calib"), config
    )
    assert all(b.loss_after < b.loss_before for b in result.blocks)

    exported = ir.to_proto(module.export_onnx())
    held_out = rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    reference = run(teacher, {"input": held_out})[0]
    before = np.abs(run(student, {"input": held_out})[0] - reference).mean()
    after = np.abs(run(exported, {"input": held_out})[0] - reference).mean()
    assert after < before
    ops_before = [n.op_type for n in student.graph.node]
    assert [n.op_type for n in exported.graph.node] == ops_before  # still a QDQ model
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in student.graph.initializer}
    moved = [
        i.name
        for i in exported.graph.initializer
        if i.name.endswith("_scale")
        and i.name in scales
        and not np.array_equal(onnx.numpy_helper.to_array(i), scales[i.name])
    ]
    assert moved  # the LSQ steps were trained


def test_a_student_whose_boundaries_do_not_match_is_refused():
    teacher = ir.from_proto(residual())
    renamed = import_onnx(ir.from_proto(residual(join="joined")))
    config = RecoverConfig(iterations=1, batch_size=8, samples=16)
    with pytest.raises(OnnxcompError, match="'joined' is not a tensor of the teacher") as error:
        recover_blocks(renamed, teacher, data(16), config)
    assert "\n" not in str(error.value)
    narrower = import_onnx(ir.from_proto(residual(stem=3)))
    with pytest.raises(OnnxcompError, match=r"'r1' has shape \[3, 6, 6\] in the student but "):
        recover_blocks(narrower, teacher, data(16), config)


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"iterations": 0}, "--recover-iters"),
        ({"iterations": 2.5}, "--recover-iters"),
        ({"lr": 0}, "--recover-lr"),
        ({"lr": float("nan")}, "--recover-lr"),
        ({"samples": -4}, "--recover-samples"),
        ({"step_lr": -1e-5}, "--recover-step-lr"),
        ({"input_mix": 1.5}, "--recover-input-mix"),
        ({"batch_size": 64, "samples": 32}, "--recover-batch-size"),
    ],
)
def test_option_errors_name_the_flag(options, flag):
    with pytest.raises(OptionError, match=flag):
        RecoverConfig(**options)
