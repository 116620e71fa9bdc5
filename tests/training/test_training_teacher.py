"""OnnxTeacher against running the model directly: outputs, taps, cache, fixed batch, errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from graphs import make_model, run, tensor
from onnx import helper

from onnxcomp.errors import OnnxcompError, OptionError
from onnxcomp.training.teacher import OnnxTeacher, TeacherCache, check_compatible

RNG = np.random.default_rng(3)
W1 = RNG.normal(size=(3, 5)).astype(np.float32)
W2 = RNG.normal(size=(5, 4)).astype(np.float32)


def mlp(batch: int | str = "N"):
    """x -> MatMul -> hidden -> Relu -> act -> MatMul -> logits."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["hidden"], name="fc1"),
        helper.make_node("Relu", ["hidden"], ["act"], name="relu"),
        helper.make_node("MatMul", ["act", "w2"], ["logits"], name="fc2"),
    ]
    return make_model(nodes, [("x", [batch, 3])], ["logits"], [tensor("w1", W1), tensor("w2", W2)])


def counting(teacher: OnnxTeacher, monkeypatch) -> list[int]:
    """Count the calls that reach ONNX Runtime's own session.run, and their rows."""
    rows: list[int] = []
    original = teacher.session.run

    def wrapped(names, feeds, *args, **kwargs):
        rows.append(next(iter(feeds.values())).shape[0])
        return original(names, feeds, *args, **kwargs)

    monkeypatch.setattr(teacher.session, "run", wrapped)
    return rows


def test_outputs_and_taps_equal_the_model_run_directly():
    model = mlp()
    x = RNG.normal(size=(6, 3)).astype(np.float32)
    teacher = OnnxTeacher(ir.from_proto(model), taps=["hidden", "act"])
    out = teacher({"x": x})
    assert list(out) == ["logits", "hidden", "act"]
    np.testing.assert_allclose(out["logits"], run(model, {"x": x})[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["hidden"], x @ W1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["act"], np.maximum(x @ W1, 0), rtol=1e-5, atol=1e-5)
    assert teacher.output_shapes == {"logits": ("N", 4)}


def test_a_path_and_a_single_array_feed_and_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "t.onnx"
    path.write_bytes(mlp().SerializeToString())
    x = RNG.normal(size=(2, 3))  # float64: cast to the model's float32
    teacher = OnnxTeacher(path, taps=["logits"])  # tapping a graph output adds nothing
    assert teacher.output_names == ["logits"]
    from_array = teacher(x)["logits"]
    from_tensor = teacher(torch.from_numpy(x))["logits"]
    np.testing.assert_array_equal(from_array, from_tensor)
    expected = np.maximum(x.astype(np.float32) @ W1, 0) @ W2
    np.testing.assert_allclose(from_array, expected, rtol=1e-5, atol=1e-5)


def test_cache_returns_identical_outputs_without_running_again(monkeypatch):
    x = RNG.normal(size=(8, 3)).astype(np.float32)
    teacher = OnnxTeacher(mlp(), taps=["act"], cache_samples=8)
    rows = counting(teacher, monkeypatch)
    first = teacher({"x": x[:4]}, indices=[0, 1, 2, 3])
    assert rows == [4]
    # two cached samples and two new ones: only the new ones reach ONNX Runtime
    mixed = teacher({"x": x[[2, 5, 3, 6]]}, indices=[2, 5, 3, 6])
    assert rows == [4, 2]
    again = teacher({"x": x[:4]}, indices=[0, 1, 2, 3])
    assert rows == [4, 2]
    for name in ("logits", "act"):
        np.testing.assert_array_equal(again[name], first[name])
        np.testing.assert_array_equal(mixed[name][[0, 2]], first[name][[2, 3]])
    direct = OnnxTeacher(mlp(), taps=["act"])({"x": x[[2, 5, 3, 6]]})
    np.testing.assert_allclose(mixed["act"], direct["act"], rtol=1e-6)
    np.testing.assert_allclose(mixed["logits"], direct["logits"], rtol=1e-6)


def test_cache_in_memory_mapped_files(tmp_path, monkeypatch):
    x = RNG.normal(size=(5, 3)).astype(np.float32)
    teacher = OnnxTeacher(mlp(), taps=["act"], cache_samples=5, cache_dir=tmp_path)
    rows = counting(teacher, monkeypatch)
    first = teacher(x, indices=range(5))
    files = list(tmp_path.rglob("*.npy"))
    assert len(files) == 2
    again = teacher(x[::-1], indices=[4, 3, 2, 1, 0])
    assert rows == [5]
    np.testing.assert_array_equal(again["logits"], first["logits"][::-1])
    teacher.close()
    assert not list(tmp_path.rglob("*.npy"))


def test_cache_errors():
    teacher = OnnxTeacher(mlp(), cache_samples=3)
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(OnnxcompError, match="outside the teacher cache of 3 samples"):
        teacher(x, indices=[1, 3])
    with pytest.raises(OnnxcompError, match="2 sample indices for a batch of 3"):
        teacher(np.zeros((3, 3), np.float32), indices=[0, 1])
    with pytest.raises(OptionError, match="positive sample count"):
        TeacherCache(0)


@pytest.mark.parametrize("count", [3, 4, 7, 9])
def test_fixed_batch_teacher_runs_in_its_batch_with_a_short_last_one(count, monkeypatch):
    model = mlp(batch=4)
    x = RNG.normal(size=(count, 3)).astype(np.float32)
    teacher = OnnxTeacher(model, taps=["act"])
    rows = counting(teacher, monkeypatch)
    out = teacher({"x": x})
    assert all(r == 4 for r in rows) and len(rows) == -(-count // 4)
    assert out["logits"].shape == (count, 4) and out["act"].shape == (count, 5)
    np.testing.assert_allclose(out["act"], np.maximum(x @ W1, 0), rtol=1e-5, atol=1e-5)
    padded = np.concatenate([x, np.zeros((-count % 4, 3), np.float32)])
    reference = np.concatenate([run(model, {"x": c})[0] for c in np.split(padded, len(rows))])
    np.testing.assert_allclose(out["logits"], reference[:count], rtol=1e-6, atol=1e-6)


def test_unknown_tap_names_similar_tensors():
    with pytest.raises(OptionError, match=r"no tensor named 'hiden'.*similar: hidden"):
        OnnxTeacher(mlp(), taps=["hiden"])
    with pytest.raises(OptionError, match=r"no tensor named 'w1'"):
        OnnxTeacher(mlp(), taps=["w1"])  # an initializer is not a node output


def test_missing_input_and_multi_input_errors():
    teacher = OnnxTeacher(mlp())
    with pytest.raises(OnnxcompError, match="needs input 'x' \\(given: image\\)"):
        teacher({"image": np.zeros((1, 3), np.float32)})


def test_check_compatible():
    check_compatible({"logits": ("N", 10)}, {"out": (None, 10)})
    check_compatible({"logits": ("N", 10)}, {"out": ("batch", "classes")})
    with pytest.raises(OnnxcompError, match="teacher predicts 100 classes, the student 10"):
        check_compatible({"logits": ("N", 100)}, {"out": ("N", 10)})
    with pytest.raises(OnnxcompError, match=r"has shape \[\?, 10, 4\] but student output"):
        check_compatible({"logits": ("N", 10, 4)}, {"out": ("N", 10)})
    with pytest.raises(OnnxcompError, match="teacher has 2 output"):
        check_compatible({"a": (1, 2), "b": (1, 2)}, {"out": (1, 2)})


def test_provider_overrides_the_session_config():
    from onnxcomp.backends.base import SessionConfig

    with pytest.raises(OnnxcompError, match="unknown execution provider 'tpu'"):
        OnnxTeacher(mlp(), session_config=SessionConfig(provider="tpu"))
    teacher = OnnxTeacher(mlp(), provider="cpu", session_config=SessionConfig(provider="tpu"))
    assert teacher.session.get_providers() == ["CPUExecutionProvider"]
