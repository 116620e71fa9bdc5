"""Reference models build, export to ONNX and match torch in onnxruntime; pretrained ResNet."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import zoo  # noqa: E402
from models.digits import DigitsCNN, train_on_arrays  # noqa: E402
from models.resnet_cifar import load_pretrained, resnet20  # noqa: E402
from onnxcomp.errors import OnnxcompError  # noqa: E402
from onnxcomp.export import export_torch  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
CLASSES += ("dog", "frog", "horse", "ship", "truck")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    assert ref.shape == got.shape
    return float(np.abs(ref - got).max() / max(float(np.abs(ref).max()), 1e-12))


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def op_count(path: Path, op_type: str) -> int:
    return sum(node.op_type == op_type for node in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    return {name: zoo.build(name) for name in zoo.MODELS}


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_model_builds_and_runs(name: str, built: dict[str, nn.Module]) -> None:
    model = built[name]
    assert not model.training
    x = torch.randn(2, *zoo.input_shape(name)[1:])
    with torch.no_grad():
        y = model(x)
    assert y.ndim == 2 and y.shape[0] == 2
    assert torch.isfinite(y).all()
    assert float(y.std()) > 0  # not a constant output
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("keep_batchnorm", [True, False], ids=["keep_bn", "fold_bn"])
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_export_matches_torch(
    name: str, keep_batchnorm: bool, built: dict[str, nn.Module], tmp_path: Path
) -> None:
    model = built[name]
    path = export_torch(
        model,
        tmp_path / f"{name}.onnx",
        input_shape=zoo.input_shape(name),
        keep_batchnorm=keep_batchnorm,
    )
    assert path == tmp_path / f"{name}.onnx"
    onnx.checker.check_model(str(path))
    n_bn = op_count(path, "BatchNormalization")
    n_bn_torch = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn == (n_bn_torch if keep_batchnorm else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.onnx"]  # no temp files left
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = rng.standard_normal((batch, *zoo.input_shape(name)[1:]), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert rel_err(ref, run_ort(path, x)) < 1e-4, f"batch {batch}"


def test_vgg_gemm_batchnorm_kept_then_folded(tmp_path: Path) -> None:
    model = zoo.build("vgg_cifar")
    kept = export_torch(model, tmp_path / "keep.onnx", keep_batchnorm=True)
    graph = onnx.load(str(kept)).graph
    producers = {out: node for node in graph.node for out in node.output}
    bn_inputs = [
        producers[n.input[0]].op_type for n in graph.node if n.op_type == "BatchNormalization"
    ]
    assert bn_inputs.count("Gemm") == 1 and bn_inputs.count("Conv") == 6
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs.get("training_mode", 0) == 0
            assert len(node.output) == 1
    folded = export_torch(model, tmp_path / "fold.onnx", keep_batchnorm=False)
    assert op_count(folded, "BatchNormalization") == 0
    assert op_count(folded, "Gemm") == 2


def test_export_restores_modes_and_uses_eval_batchnorm(tmp_path: Path) -> None:
    model = zoo.build("vgg_cifar")
    model.train()
    model.classifier[4].eval()  # mixed modes must come back exactly
    before = {name: m.training for name, m in model.named_modules()}
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32), dtype=np.float32)
    for keep in (True, False):
        path = export_torch(model, tmp_path / f"m{keep}.onnx", keep_batchnorm=keep)
        assert {name: m.training for name, m in model.named_modules()} == before
        model.eval()
        with torch.no_grad():
            ref_eval = model(torch.from_numpy(x)).numpy()
        model.train()
        model.classifier[4].eval()
        with torch.no_grad():
            ref_train = model(torch.from_numpy(x)).numpy()
        got = run_ort(path, x)
        assert rel_err(ref_eval, got) < 1e-4
        assert rel_err(ref_train, got) > 1e-2  # would pass only with train-mode statistics


def test_export_options(tmp_path: Path) -> None:
    model = zoo.build("digits_cnn")
    example = torch.randn(2, 1, 8, 8)
    path = export_torch(
        model, tmp_path / "sub" / "d.onnx", example_input=example, dynamic_batch=False, opset=13
    )
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 1, 8, 8]
    assert proto.graph.input[0].name == "input" and proto.graph.output[0].name == "logits"
    assert {o.domain: o.version for o in proto.opset_import}[""] == 13
    assert not list(proto.graph.initializer[0].external_data)
    # Overwrite in place with a dynamic-batch export: the default opset is 17.
    export_torch(model, path, input_shape=(1, 1, 8, 8))
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {o.domain: o.version for o in proto.opset_import}[""] == 17
    assert sorted(p.name for p in path.parent.iterdir()) == ["d.onnx"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_export_is_deterministic(tmp_path: Path) -> None:
    model = zoo.build("resnet20")
    a = export_torch(model, tmp_path / "a.onnx", keep_batchnorm=True)
    b = export_torch(model, tmp_path / "b.onnx", keep_batchnorm=True)
    assert a.read_bytes() == b.read_bytes()


def test_export_failure_is_clear_and_leaves_nothing(tmp_path: Path) -> None:
    model = zoo.build("vgg_cifar")  # needs 32x32 inputs
    target = tmp_path / "bad.onnx"
    with pytest.raises(OnnxcompError, match="VGGCifar"):
        export_torch(model, target, input_shape=(1, 3, 64, 64))
    assert list(tmp_path.iterdir()) == []


def test_digits_training_loop_learns_synthetic_data() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 400).astype(np.int64)
    x = rng.random((400, 1, 8, 8), dtype=np.float32) * 0.3
    x[np.arange(400), 0, y % 8, y // 8 * 4] += 1.0  # class-dependent bright pixel
    model = train_on_arrays(x[:300], y[:300], epochs=10)
    assert isinstance(model, DigitsCNN) and not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 10_000 <= n_params <= 30_000
    with torch.no_grad():
        pred = model(torch.from_numpy(x[300:])).argmax(1).numpy()
    assert (pred == y[300:]).mean() > 0.9


def test_digits_model_trains_on_sklearn_digits() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install onnxcomp[demo])")
    from models.digits import train_digits_model

    model, x_test, y_test = train_digits_model(seed=0)
    assert x_test.shape[1:] == (1, 8, 8) and x_test.dtype == np.float32
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(1).numpy()
    assert (pred == y_test).mean() > 0.9


# ---------------------------------------------------------------- pretrained ResNet on real CIFAR


def _cifar_sample(per_class: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Stream the test archive and decode the first ``per_class`` JPEGs of each class."""
    from PIL import Image

    archive = DATA / "cifar10" / "test_jpg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"CIFAR-10 test JPEGs not found at {archive} (shared data absent)")
    images: dict[int, list[np.ndarray]] = {i: [] for i in range(len(CLASSES))}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 2 or parts[-2] not in CLASSES:
                continue
            label = CLASSES.index(parts[-2])
            if len(images[label]) >= per_class:
                if all(len(v) >= per_class for v in images.values()):
                    break
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            with Image.open(io.BytesIO(fh.read())) as img:
                images[label].append(np.asarray(img.convert("RGB"), dtype=np.float32))
    x = np.stack([img for label in sorted(images) for img in images[label]])
    y = np.array([label for label in sorted(images) for _ in images[label]], dtype=np.int64)
    x = (x.transpose(0, 3, 1, 2) / 255.0 - MEAN) / STD
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def pretrained_dir() -> Path:
    path = DATA / "pretrained"
    if not (path / "resnet20.th").is_file():
        pytest.skip(f"pretrained checkpoints not found at {path} (shared data absent)")
    return DATA


def test_pretrained_resnet_classifies_real_cifar(pretrained_dir: Path, tmp_path: Path) -> None:
    x, y = _cifar_sample()
    assert x.shape == (50, 3, 32, 32) and np.bincount(y).tolist() == [5] * 10
    model = load_pretrained(20, pretrained_dir)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == 269_722
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= 0.6, f"ResNet-20 accuracy {acc:.2f} on 50 real CIFAR images"
    # An untrained network of the same shape is at chance: the weights, not the data, do the work.
    with torch.no_grad():
        rand_acc = float((resnet20().eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert rand_acc < acc - 0.3
    for keep in (True, False):
        path = zoo.export_reference("resnet20", tmp_path / f"r20_{keep}.onnx", keep, pretrained_dir)
        got = run_ort(path, x)
        assert rel_err(logits, got) < 1e-4
        assert (got.argmax(1) == logits.argmax(1)).all()
    teacher = load_pretrained(56, pretrained_dir / "pretrained")
    with torch.no_grad():
        acc56 = float((teacher(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert acc56 >= 0.6, f"ResNet-56 accuracy {acc56:.2f}"


def test_load_pretrained_rejects_unknown_depth(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="20 or 56"):
        load_pretrained(32, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(20, tmp_path)


def test_export_without_torch_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    code = "import sys, onnxcomp.export; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(OnnxcompError, match=r"onnxcomp\[torch\]"):
        export_torch(nn.Identity(), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_digits_split_is_stratified_and_scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from models.digits import load_digits_arrays

    rng = np.random.default_rng(0)
    target = np.repeat(np.arange(10), 40)
    fake = types.SimpleNamespace(data=rng.integers(0, 17, (400, 64)).astype(float), target=target)
    datasets = types.ModuleType("sklearn.datasets")
    datasets.load_digits = lambda: fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", datasets)
    x_tr, y_tr, x_te, y_te = load_digits_arrays(seed=0)
    assert x_tr.shape == (300, 1, 8, 8) and x_te.shape == (100, 1, 8, 8)
    assert x_te.dtype == np.float32 and y_te.dtype == np.int64
    assert x_tr.min() >= 0.0 and x_tr.max() <= 1.0
    assert np.bincount(y_te).tolist() == [10] * 10
    assert np.bincount(y_tr).tolist() == [30] * 10
    # Every row comes from the source, scaled by 1/16.
    src = {row.tobytes() for row in (fake.data / 16).astype(np.float32)}
    assert {r.reshape(64).tobytes() for r in np.concatenate([x_tr, x_te])} <= src
    assert load_digits_arrays(seed=0)[3].tolist() == y_te.tolist()


def test_export_for_training_gives_every_use_its_own_initializer(tmp_path: Path) -> None:
    """A fresh network's equal BatchNorm tensors (ones, zeros) are merged by torch's exporter;
    kept for training they must stay separate, or layers share parameters and a BatchNorm's
    running statistics alias another layer's parameter (backward then fails)."""
    import onnx_ir

    from onnxcomp.training.importer import import_onnx

    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
    )
    path = export_torch(module, tmp_path / "m.onnx", input_shape=(1, 3, 8, 8), keep_batchnorm=True)
    model = onnx.load(path)
    uses = [name for node in model.graph.node for name in node.input]
    inits = {i.name for i in model.graph.initializer}
    assert all(uses.count(name) == 1 for name in inits)
    assert not [n for n in model.graph.node if n.op_type == "Identity"]
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    (reference,) = ort.InferenceSession(str(path)).run(None, {"input": x})
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(reference, expected, rtol=1e-4, atol=1e-5)
    imported = import_onnx(onnx_ir.load(str(path)))
    imported.train()
    (y,) = imported(torch.from_numpy(x))
    y.sum().backward()  # fails when a running statistic aliases a parameter
