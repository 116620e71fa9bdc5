"""``onnxcomp finetune``: train a compressed ONNX model back towards its original.

The library modules it runs (torch among them) are imported when the command runs, not at
module level, only so that ``onnxcomp --help`` stays fast (see :mod:`onnxcomp.cli`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from onnxcomp.cli.options import ModelArg, PreprocessFlags, SessionFlags, flags_command
from onnxcomp.cli.train_options import Recover, TrainFlags, run_training

DEFAULT_LR = None  # by student kind: onnxcomp.training.job.DEFAULT_LR


@dataclasses.dataclass(frozen=True)
class FinetuneFlags:
    model: ModelArg
    train: TrainFlags
    preprocessing: PreprocessFlags = dataclasses.field(default_factory=PreprocessFlags)
    session: SessionFlags = dataclasses.field(default_factory=SessionFlags)
    recover: Annotated[
        Recover | None,
        typer.Option(
            "--recover",
            help="Block-wise reconstruction against the teacher before the epochs "
            "(--epochs 0: recovery only).",
        ),
    ] = None


@flags_command(FinetuneFlags)
def finetune(flags: FinetuneFlags) -> None:
    """Fine-tune a compressed model (pruned, low-rank, int8 QDQ...) with distillation from the
    original; verify against both and write it atomically."""
    recover = flags.recover.value if flags.recover is not None else None
    run_training(flags.train, flags.preprocessing, flags.session, flags.model, DEFAULT_LR, recover)
