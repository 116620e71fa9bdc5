"""``onnxcomp pack`` and ``onnxcomp unpack``: the Deep Compression archive and back.

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
    """Pack a model into the Deep Compression archive (sparse, codebook, 1-bit signs, zstd)."""
    from onnxcomp.report import human_bytes
    from onnxcomp.storage import pack as pack_model

    set_debug(debug)
    output = output or model.with_suffix(".ocpk")
    _check_output(model, output)
    result = pack_model(model, output)
    from rich.table import Table

    table = Table(title=f"wrote {output}")
    table.add_column("stage")
    table.add_column("bytes", justify="right")
    table.add_column("vs fp32 .onnx", justify="right")
    for stage, size in result.stages():
        table.add_row(stage, f"{size:,}", f"{result.fp32_bytes / size:.1f}x")
    console.print(table)
    kinds: dict[str, int] = {}
    for _, kind in result.kinds:
        kinds[kind] = kinds.get(kind, 0) + 1
    encoded = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
    console.print(
        f"tensors encoded: {encoded}; archive {human_bytes(result.packed_bytes)} "
        f"({result.ratio_vs_fp32:.1f}x smaller than fp32, "
        f"{result.ratio_vs_onnx:.1f}x than the .onnx)"
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
