"""``onnxcomp debug``: per-layer SQNR of an int8 model against its float original."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated

import typer

from onnxcomp.cli.options import (
    BatchSizeOpt,
    DataFlags,
    DebugOpt,
    JsonOpt,
    ModelArg,
    flags_command,
)
from onnxcomp.cli.progress import progress_bar
from onnxcomp.cli.root import console, set_debug


@dataclass(frozen=True)
class DebugDataFlags(DataFlags):
    """The data options, in larger batches."""

    batch_size: BatchSizeOpt = 32


@dataclass(frozen=True)
class DebugFlags:
    """Everything ``onnxcomp debug`` is told."""

    fp32_model: ModelArg
    int8_model: ModelArg
    inputs: DebugDataFlags = field(default_factory=DebugDataFlags)
    top: Annotated[int, typer.Option("--top", help="Layers to list.", min=1)] = 25
    as_json: JsonOpt = False
    debug: DebugOpt = False


@flags_command(DebugFlags)
def debug(flags: DebugFlags) -> None:
    """Per-layer SQNR of weights and activations of an int8 model, worst first."""
    # Imported here so that --help does not load onnx and ONNX Runtime.
    from onnxcomp.cli.configs import data_options, preprocess
    from onnxcomp.converter.debug import debug_models, render_debug
    from onnxcomp.core.io import check_model

    set_debug(flags.debug)
    options = data_options(flags.inputs, preprocess(flags.inputs))
    for path in (flags.fp32_model, flags.int8_model):
        check_model(path)
    with progress_bar("debugging") as bar:
        report = debug_models(flags.fp32_model, flags.int8_model, options, on_batch=bar.advance)
    if flags.as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_debug(report, console, top=flags.top)
