"""``onnxcomp pack`` and ``onnxcomp unpack``: a binarized model's 1-bit storage form and back.

The packed form (``.ocpk``) is what users ship and store; ONNX has no 1-bit type, so it is
unpacked to the runnable ONNX before it is loaded. The library modules are imported in the
command functions only so that ``onnxcomp --help`` stays fast (see :mod:`onnxcomp.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onnxcomp.cli.options import DebugOpt, ModelArg
from onnxcomp.cli.root import console, set_debug
from onnxcomp.errors import OptionError


def _check_output(source: Path, output: Path) -> None:
    if output.resolve() == source.resolve():
        raise OptionError(f"-o {output}: the output would replace the input; give another path")


def pack(
    model: ModelArg,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Packed file (default: <model>.ocpk)."),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Pack a binarized model's sign weights into 1 bit each (shipping and storage form)."""
    from onnxcomp.report import human_bytes
    from onnxcomp.storage import pack as pack_model

    set_debug(debug)
    output = output or model.with_suffix(".ocpk")
    _check_output(model, output)
    result = pack_model(model, output)
    console.print(
        f"wrote {output}: {human_bytes(result.packed_bytes)} ({result.packed_tensors} sign "
        f"tensors, {result.packed_values:,} signs at 1 bit); runnable ONNX "
        f"{human_bytes(result.onnx_bytes)} ({result.ratio_vs_onnx:.1f}x larger), its fp32 "
        f"equivalent {human_bytes(result.fp32_bytes)} ({result.ratio_vs_fp32:.1f}x larger)"
    )


def unpack(
    packed: Annotated[Path, typer.Argument(help="Packed .ocpk file.", show_default=False)],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Runnable ONNX file (default: <packed>.onnx)."),
    ] = None,
    expect: Annotated[
        Path | None,
        typer.Option("--expect", help="Refuse unless packed from this ONNX file (sha256)."),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Rebuild the runnable ONNX model of a packed file, every checksum checked."""
    from onnxcomp.report import human_bytes
    from onnxcomp.storage import unpack as unpack_model

    set_debug(debug)
    output = output or packed.with_suffix(".onnx")
    _check_output(packed, output)
    result = unpack_model(packed, output, expect_source=expect)
    same = "byte-identical to" if result.identical else "equivalent to (re-serialized)"
    console.print(
        f"wrote {output}: {human_bytes(result.onnx_bytes)}, {same} the packed source "
        f"(from {human_bytes(result.packed_bytes)})"
    )
