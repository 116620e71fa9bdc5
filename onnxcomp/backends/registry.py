"""The runtimes onnxcomp can run models on, by name."""

from __future__ import annotations

from pathlib import Path

from onnxcomp.backends.base import Backend
from onnxcomp.backends.ort import ORT
from onnxcomp.backends.tflite import TFLITE
from onnxcomp.errors import OptionError

BACKENDS: dict[str, Backend] = {ORT.name: ORT, TFLITE.name: TFLITE}
DEFAULT_BACKEND = ORT.name


def get_backend(name: str = DEFAULT_BACKEND) -> Backend:
    """The backend called ``name``, or a one-line OptionError listing the known ones."""
    if name not in BACKENDS:
        raise OptionError(f"backend {name}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backend_for_path(path: str | Path) -> Backend:
    """The backend that runs a model file, by its suffix (``.tflite``: TFLite, else ORT)."""
    return TFLITE if Path(path).suffix.lower() == ".tflite" else ORT
