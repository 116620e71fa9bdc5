"""``onnxcomp export``: a torch.nn.Module to ONNX with deployment defaults."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated

import typer

from onnxcomp.cli.options import DebugOpt
from onnxcomp.cli.root import console, set_debug
from onnxcomp.errors import OnnxcompError, OptionError


def export(
    factory: Annotated[
        str, typer.Argument(help="Python callable returning a torch.nn.Module: 'pkg.mod:fn'.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx file.")],
    input_shape: Annotated[
        str, typer.Option("--input-shape", help="Example input shape, e.g. 1,3,32,32.")
    ] = "1,3,32,32",
    state_dict: Annotated[
        Path | None, typer.Option("--state-dict", help="torch checkpoint to load first.")
    ] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.", min=7)] = 17,
    keep_batchnorm: Annotated[
        bool, typer.Option("--keep-batchnorm", help="Keep BatchNormalization nodes.")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Export a torch.nn.Module with deployment defaults (eval mode, dynamic batch, one file)."""
    # Imported here so that --help does not load torch (an optional dependency) or onnx.
    from onnxcomp.export import export_torch

    set_debug(debug)
    shape = _shape(input_shape)
    module = build_module(factory)
    if state_dict is not None:
        _load_state(module, state_dict)
    path = export_torch(
        module, output, input_shape=shape, opset=opset, keep_batchnorm=keep_batchnorm
    )
    console.print(f"wrote {path}")


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise OptionError(f"--input-shape '{text}': expected e.g. 1,3,32,32") from None


def build_module(factory: str):
    """The module that ``package.module:callable`` returns."""
    module_name, _, attr = factory.partition(":")
    if not attr:
        raise OptionError(f"'{factory}': expected 'package.module:callable'")
    try:
        return getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError) as exc:
        raise OnnxcompError(f"'{factory}': cannot import it: {exc}") from exc


def _load_state(module, path: Path) -> None:
    """Load a torch checkpoint (a state dict, or a dict holding one under 'state_dict')."""
    # torch is optional: imported only when a checkpoint is given.
    import torch

    if not path.is_file():
        raise OnnxcompError(f"{path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    module.load_state_dict(state)
