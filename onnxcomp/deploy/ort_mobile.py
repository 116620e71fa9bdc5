"""The ORT-format (``.ort``) writer for ONNX Runtime Mobile, through ONNX Runtime's own converter.

Rules:

1. The model goes through ``onnxruntime.tools.convert_onnx_models_to_ort`` with the ``Fixed``
   optimisation style (optimizations applied before saving; ``Runtime`` is for NNAPI/CoreML
   partitioning) and ``target_platform`` ``arm`` (phones: QDQ int8 kept as int8 kernels, no
   x86 NCHWc layout) or ``amd64`` (x86: NCHWc blocked layouts baked in, so the file runs only
   on x86 CPUs like the one it was made for).
2. Its ``required_operators.config`` ships beside the ``.ort`` as ``required_operators.config``
   (input to a reduced build: ``build.sh --minimal_build --include_ops_by_config``); the
   converter's comment line naming the temporary path is rewritten to the file name.
3. INT4/UINT4 initializers are refused: they convert but the ``.ort`` does not load.
4. Dynamic input dims are kept: ORT mobile's CPU provider runs any size; NNAPI and CoreML need
   fixed shapes (a note says how to fix them). Nothing is refused for them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import sys
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.backends.ort import condense_message
from onnxcomp.deploy.artifact import Artifact, WriteOptions
from onnxcomp.errors import OnnxcompError

CONFIG_NAME = "required_operators.config"
_INT4 = (ir.DataType.INT4, ir.DataType.UINT4)


def int4_problem(model: ir.Model) -> str | None:
    """Why the model cannot become a ``.ort`` because of INT4 tensors, or None."""
    for name, value in model.graph.initializers.items():
        if value.dtype in _INT4:
            return (
                f"initializer '{name}' is {value.dtype.name}: INT4 weights convert to .ort but "
                "ONNX Runtime cannot load the result; deploy an int8 model (convert --int8) "
                "or ship the .onnx"
            )
    return None


def dynamic_notes(model: ir.Model) -> list[str]:
    """What ORT mobile does with the model's dynamic input dims."""
    notes = []
    for value in model.graph.inputs:
        shape = value.shape
        if shape is None or value.name in model.graph.initializers:
            continue
        dynamic = [str(d) for d in shape if not isinstance(d, int)]
        if dynamic:
            notes.append(
                f"input '{value.name}' has dynamic dims ({', '.join(dynamic)}): ORT mobile's "
                "CPU provider runs any size; NNAPI/CoreML need fixed shapes "
                "(python -m onnxruntime.tools.make_dynamic_shape_fixed)"
            )
    return notes


def read_config(path: Path) -> dict[str, list[str]]:
    """``required_operators.config`` as ``{"domain;opset": [ops]}`` (comment lines skipped)."""
    ops: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, names = line.split(";", 2)
        ops[f"{domain};{opset}"] = sorted(names.split(","))
    return ops


@contextlib.contextmanager
def _quiet_converter():
    """The converter prints progress, logs at INFO and ORT warns on its own logger: hide them."""
    loggers = [logging.getLogger(n) for n in ("ort_format_model.utils", "ort_format_model")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        ort.set_default_logger_severity(2)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _ort_tools_without_torch() -> None:
    """Make ``onnxruntime.tools`` importable without running its ``__init__``, which imports
    torch whenever torch is installed (seconds, for a helper the converter never uses; a broken
    torch install would break the conversion). Nothing is done when the package is already
    imported or torch already loaded."""
    if "onnxruntime.tools" in sys.modules or "torch" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime.tools")
    if spec is None:
        raise OnnxcompError(
            "--target ort: onnxruntime.tools is missing from this ONNX Runtime install; "
            "reinstall onnxruntime"
        )
    sys.modules["onnxruntime.tools"] = importlib.util.module_from_spec(spec)


def write_ort(model: ir.Model, out_dir: Path, options: WriteOptions) -> Artifact:
    """Write ``<name>.ort`` and ``required_operators.config`` into ``out_dir`` (rules above)."""
    _ort_tools_without_torch()
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    problem = int4_problem(model)
    if problem:
        raise OnnxcompError(f"--target ort: {problem}")
    source_dir = out_dir / ".source"
    source_dir.mkdir()
    source = source_dir / f"{options.name}.onnx"
    ir.save(model, str(source))
    try:
        with _quiet_converter():
            convert_onnx_models_to_ort(
                source,
                output_dir=out_dir,
                optimization_styles=[OptimizationStyle.Fixed],
                target_platform=options.platform,
            )
    except Exception as error:
        raise OnnxcompError(
            f"--target ort: ONNX Runtime could not convert the model to .ort: "
            f"{condense_message(error).replace(str(source), source.name)}"
        ) from error
    finally:
        source.unlink(missing_ok=True)
        source_dir.rmdir()
    path = out_dir / f"{options.name}.ort"
    config = out_dir / CONFIG_NAME
    (out_dir / f"{options.name}.{CONFIG_NAME}").rename(config)
    lines = config.read_text().splitlines()
    lines = [f"# - {path.name}" if line.startswith("# - ") else line for line in lines]
    config.write_text("\n".join(lines) + "\n")
    notes = [f"ORT format, Fixed optimisation style, target platform {options.platform}"]
    if options.platform == "amd64":
        notes.append("amd64 bakes in x86 NCHWc layouts: the .ort runs only on x86 CPUs")
    return Artifact(
        path=path,
        extra_files=[config],
        runtime_ops=read_config(config),
        notes=notes + dynamic_notes(model),
    )
