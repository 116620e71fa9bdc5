"""The deploy targets by name: each maps to a writer and to the backend that runs its artifact.

A target is a :class:`Target`: ``write(model, out_dir, options) -> Artifact``, the name of the
backend (:mod:`onnxcomp.backends.registry`) that loads the artifact for verification, which
``--io-dtype`` values it takes, whether all image inputs must share one layout, and ``check()``:
what must be installed, run before any work. Adding a target is adding one entry to
:data:`TARGETS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcomp.backends.base import Session
from onnxcomp.backends.registry import get_backend
from onnxcomp.deploy.artifact import Artifact, WriteOptions
from onnxcomp.deploy.ort_mobile import write_ort
from onnxcomp.errors import OnnxcompError, OptionError

Writer = Callable[[ir.Model, Path, WriteOptions], Artifact]

_TFLITE_WRITER = "onnxcomp.deploy.tflite.writer"


@dataclass(frozen=True)
class Target:
    """One deploy target (see the module docstring)."""

    name: str
    write: Writer
    backend: str
    io_dtypes: tuple[str, ...] = ("float32",)
    single_layout: bool = False
    check: Callable[[], None] = lambda: None
    # feeds in the source ONNX model's form (names, layout, dtype) -> its outputs' form
    runner: Callable[[Session], Callable[[dict], list[np.ndarray]]] = lambda session: (
        lambda feeds: session.run({n: feeds[n] for n in session.input_names})
    )


def _tflite_writer():
    """``write_tflite``, or a one-line error when this build has no TFLite writer."""
    try:
        module = importlib.import_module(_TFLITE_WRITER)
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("onnxcomp.deploy.tflite"):
            raise
        raise OnnxcompError(
            "--target tflite: this onnxcomp has no TFLite writer (onnxcomp.deploy.tflite is "
            "missing); use --target ort, or update onnxcomp"
        ) from error
    return module.write_tflite


def _check_tflite() -> None:
    _tflite_writer()
    try:
        get_backend("tflite")
    except OptionError as error:
        raise OnnxcompError(
            f"--target tflite: no TFLite backend to verify the file with ({error})"
        ) from error


def _tflite_runner(session: Session) -> Callable[[dict], list[np.ndarray]]:
    from onnxcomp.deploy.tflite.adapter import onnx_layout_runner

    return onnx_layout_runner(session)


def write_tflite(model: ir.Model, out_dir: Path, options: WriteOptions) -> Artifact:
    """``<name>.tflite`` through :mod:`onnxcomp.deploy.tflite` (NHWC, fp32 or full int8)."""
    path = out_dir / f"{options.name}.tflite"
    notes = _tflite_writer()(model, path, io_dtype=options.io_dtype)
    return Artifact(path=path, notes=list(notes))


TARGETS: dict[str, Target] = {
    "ort": Target("ort", write_ort, backend="onnxruntime"),
    "tflite": Target(
        "tflite",
        write_tflite,
        backend="tflite",
        io_dtypes=("float32", "int8", "uint8"),
        single_layout=True,
        check=_check_tflite,
        runner=_tflite_runner,
    ),
}


def get_target(name: str) -> Target:
    """The target called ``name``, or a one-line OptionError listing the known ones."""
    if name not in TARGETS:
        raise OptionError(f"--target {name}: unknown target; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
