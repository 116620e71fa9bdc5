"""Loading, checking and saving ONNX models, with clear errors for bad files.

Loading goes through ``onnx`` first (to give one-line errors for missing, truncated or
invalid files and unsafe external-data paths) and then into ``onnx_ir``, which keeps external
data memory-mapped so models over 2 GB never become one protobuf in memory.
Saving is atomic: everything is written into a temporary folder beside the target and renamed.
onnx-ir drops ONNX ``sparse_initializer`` without a word, so a file holding them is read
through protobuf and densified first (:func:`onnxcomp.core.proto.densify`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxcomp.core.proto import (
    densify,
    external_locations,
    has_sparse_initializers,
    store_sparse,
)
from onnxcomp.errors import OnnxcompError

# Models whose tensors add up to more than this are saved with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
MIN_OPSET = 7


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse external data that is missing or lies outside the model's folder."""
    folder = path.parent.resolve()
    for location in sorted(external_locations(proto)):
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise OnnxcompError(
                f"{path}: external data location '{location}' points outside the model's "
                "folder; refusing to read it (move the data file next to the model)"
            )
        if not target.is_file():
            raise OnnxcompError(
                f"{path}: external data file '{location}' is missing; copy it next to the model"
            )


def read_proto(path: str | Path) -> onnx.ModelProto:
    """Read the model's graph without external data, with one-line errors for bad files."""
    path = Path(path)
    if not path.exists():
        raise OnnxcompError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxcompError(f"{path}: is a folder, expected an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise OnnxcompError(
            f"{path}: not a valid ONNX file (truncated or another format): {_one_line(exc)}"
        ) from exc
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and not proto.graph.output):
        raise OnnxcompError(f"{path}: not an ONNX model (no graph found); re-export the model")
    check_external_data(proto, path)
    return proto


def default_opset(proto: onnx.ModelProto) -> int:
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    raise OnnxcompError("the model imports no default ONNX opset; re-export it")


def check_model(path: str | Path, proto: onnx.ModelProto | None = None) -> None:
    """Run onnx.checker on the file (path-based, so large models work too)."""
    path = Path(path)
    proto = proto if proto is not None else read_proto(path)
    opset = default_opset(proto)
    if opset < MIN_OPSET:
        raise OnnxcompError(
            f"{path}: opset {opset} is older than {MIN_OPSET}, the oldest onnxcomp reads; "
            "re-export the model with a newer opset"
        )
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise OnnxcompError(f"{path}: fails onnx.checker: {_one_line(exc)}") from exc


def load_model(path: str | Path, check: bool = True) -> ir.Model:
    """Load a model into onnx-ir (external data stays memory-mapped), checked first.

    A model with sparse initializers is read whole through protobuf, densified (the weights
    become ordinary initializers of the same names), then converted.
    """
    path = Path(path)
    proto = read_proto(path)
    if check:
        check_model(path, proto)
    try:
        if has_sparse_initializers(proto):
            return _load_densified(path)
        return ir.load(str(path))
    except OnnxcompError:
        raise
    except Exception as exc:
        raise OnnxcompError(f"{path}: cannot be read: {_one_line(exc)}") from exc


def _load_densified(path: Path) -> ir.Model:
    proto = onnx.load(str(path))
    try:
        densify(proto)
    except OnnxcompError as exc:
        raise OnnxcompError(f"{path}: {exc}") from exc
    return ir.from_proto(proto)


def model_nbytes(model: ir.Model) -> int:
    """Bytes of tensor data held by the model's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def check_output_path(output: Path, inputs: list[Path], force: bool = False) -> None:
    """Refuse writing over an input (unless forced) or into a folder that cannot be written."""
    resolved = output.resolve()
    for source in inputs:
        if source.exists() and resolved == source.resolve() and not force:
            raise OnnxcompError(
                f"{output}: is the input file; choose another output path (or --force to "
                "replace the input)"
            )
    folder = resolved.parent
    if not folder.is_dir():
        raise OnnxcompError(f"{output}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxcompError(f"{output}: folder {folder} is not writable; choose another output")
    if output.is_dir():
        raise OnnxcompError(f"{output}: is a folder; give a file name ending in .onnx")


@contextmanager
def staged_save(model: ir.Model, output: str | Path) -> Iterator[Path]:
    """Save ``model`` into a temporary folder beside ``output``; yield the staged path.

    On a clean exit of the ``with`` block the staged files are renamed into place (data
    file first, then the model); on an exception nothing is left behind. Models whose
    tensors exceed ~1.8 GB are saved with external data in ``<name>.data``.
    """
    output = Path(output)
    stage = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=output.resolve().parent))
    try:
        staged = stage / output.name
        data_name = output.name + ".data"
        external = model_nbytes(model) > EXTERNAL_DATA_THRESHOLD
        try:
            ir.save(model, str(staged), external_data=data_name if external else None)
        except OSError as exc:
            raise OnnxcompError(f"{output}: cannot write: {_one_line(exc)}") from exc
        yield staged
        if external:
            os.replace(stage / data_name, output.resolve().parent / data_name)
        os.replace(staged, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_sparse_initializers(path: Path) -> list[str] | None:
    """Rewrite the saved model at ``path`` with its mostly-zero float weights as ONNX sparse
    initializers (:func:`onnxcomp.core.proto.store_sparse`); returns their names, or None
    (file left as it is) when the model keeps its weights in external data."""
    proto = onnx.load(str(path), load_external_data=False)
    if external_locations(proto):
        return None
    moved = store_sparse(proto)
    if moved:
        onnx.save(proto, str(path))
    return moved


def save_model(model: ir.Model, output: str | Path) -> Path:
    """Atomically save ``model`` to ``output``."""
    with staged_save(model, output):
        pass
    return Path(output)
