"""``onnxcomp compare``: fidelity of one model against another, and accuracy of each."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from onnxcomp.cli.options import (
    DataFlags,
    DebugOpt,
    DimDefaultOpt,
    JsonOpt,
    ModelArg,
    SessionFlags,
    flags_command,
)
from onnxcomp.cli.progress import progress_bar
from onnxcomp.cli.root import console, set_debug


@dataclass(frozen=True)
class CompareFlags:
    """Everything ``onnxcomp compare`` is told."""

    model_a: ModelArg
    model_b: ModelArg
    inputs: DataFlags = field(default_factory=DataFlags)
    dim_default: DimDefaultOpt = 1
    as_json: JsonOpt = False
    session: SessionFlags = field(default_factory=SessionFlags)
    debug: DebugOpt = False


@flags_command(CompareFlags)
def compare(flags: CompareFlags) -> None:
    """Fidelity of B against A on the same inputs, and accuracy of each on labelled data."""
    # Imported here so that --help does not load onnx and ONNX Runtime.
    from onnxcomp.cli.configs import data_options, preprocess, session_config
    from onnxcomp.converter.verify import VerifyOptions, verify_files
    from onnxcomp.core.io import check_model
    from onnxcomp.report import render_fidelity

    set_debug(flags.debug)
    inputs = flags.inputs
    options = data_options(inputs, preprocess(inputs), VerifyOptions, dim_default=flags.dim_default)
    session = session_config(flags.session)
    for path in (flags.model_a, flags.model_b):
        check_model(path)
    with progress_bar("comparing") as bar:
        fidelity = verify_files(
            flags.model_a,
            flags.model_b,
            options,
            session,
            on_batch=bar.advance,
            on_start=bar.set_total,
        )
    if flags.as_json:
        print(json.dumps(fidelity.to_dict(), indent=2))
    else:
        render_fidelity(fidelity, console, names=(flags.model_a.name, flags.model_b.name))
