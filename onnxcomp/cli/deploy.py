"""``onnxcomp deploy``: an ONNX model to a device artifact (``.ort``, ``.tflite``) with its
manifest, verified against the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from onnxcomp.cli.options import (
    DataFlags,
    DebugOpt,
    DeployTarget,
    DimDefaultOpt,
    IoDtype,
    JsonOpt,
    ModelArg,
    Platform,
    SessionFlags,
    flags_command,
)
from onnxcomp.cli.progress import progress_bar
from onnxcomp.cli.root import console, set_debug


@dataclass(frozen=True)
class DeployFlags:
    """Everything ``onnxcomp deploy`` is told."""

    model: ModelArg
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output folder (created; must not hold files).")
    ]
    target: Annotated[
        DeployTarget,
        typer.Option("--target", help="ort: ONNX Runtime Mobile .ort; tflite: LiteRT .tflite."),
    ] = DeployTarget.ort
    platform: Annotated[
        Platform,
        typer.Option("--platform", help="ort: arm (phones) or amd64 (x86, NCHWc baked in)."),
    ] = Platform.arm
    io_dtype: Annotated[
        IoDtype,
        typer.Option(
            "--io-dtype", help="tflite: input/output type (int8/uint8 need an int8 model)."
        ),
    ] = IoDtype.float32
    labels: Annotated[
        Path | None, typer.Option("--labels", help="Text file, one class label per line.")
    ] = None
    force: Annotated[
        bool, typer.Option("--force", help="Replace an output folder that holds files.")
    ] = False
    inputs: DataFlags = field(default_factory=DataFlags)
    dim_default: DimDefaultOpt = 1
    as_json: JsonOpt = False
    session: SessionFlags = field(default_factory=SessionFlags)
    debug: DebugOpt = False


@flags_command(DeployFlags)
def deploy(flags: DeployFlags) -> None:
    """Write a device artifact and its manifest, verified against the model (quantize first
    with `convert --int8`)."""
    # Imported here so that --help does not load onnx and ONNX Runtime.
    from onnxcomp.cli.configs import data_options, preprocess, session_config
    from onnxcomp.converter.verify import VerifyOptions
    from onnxcomp.deploy import DeployOptions
    from onnxcomp.deploy import deploy as run_deploy
    from onnxcomp.report import human_bytes, render_fidelity

    set_debug(flags.debug)
    inputs = flags.inputs
    options = DeployOptions(
        target=flags.target.value,
        platform=flags.platform.value,
        io_dtype=flags.io_dtype.value,
        labels=flags.labels,
        force=flags.force,
        verify=data_options(
            inputs, preprocess(inputs), VerifyOptions, dim_default=flags.dim_default
        ),
        session=session_config(flags.session),
    )
    with progress_bar("verifying") as bar:
        report = run_deploy(flags.model, flags.output, options, on_batch=bar.advance)
    if flags.as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    console.print(
        f"wrote {report.output}/{report.artifact} ({human_bytes(report.artifact_bytes)}; "
        f"{flags.model.name} {human_bytes(report.source_bytes)}) and manifest.json"
    )
    render_fidelity(report.fidelity, console, names=(flags.model.name, report.artifact))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
