"""``onnxcomp inspect``: what a model is (opset, inputs, ops, parameters, size, MACs)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from onnxcomp.cli.options import DebugOpt, DimDefaultOpt, JsonOpt, ModelArg
from onnxcomp.cli.root import console, set_debug


def inspect(
    model: ModelArg,
    as_json: JsonOpt = False,
    batch: Annotated[int, typer.Option("--batch", help="Batch size for MAC counts.", min=1)] = 1,
    dim_default: DimDefaultOpt = 1,
    top: Annotated[int, typer.Option("--top", help="Layers to list by MACs.", min=1)] = 20,
    debug: DebugOpt = False,
) -> None:
    """Show what a model is: opset, inputs, op histogram, parameters, size and MACs."""
    # Imported here so that --help does not load onnx.
    from onnxcomp.core.analysis import summarize
    from onnxcomp.core.io import check_model, read_proto
    from onnxcomp.report import render_summary

    set_debug(debug)
    proto = read_proto(model)
    check_model(model, proto)
    summary = summarize(proto, path=model, batch=batch, dim_default=dim_default)
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        render_summary(summary, console, top=top)
