"""``onnxcomp distill``: train a student (an ONNX file, or torch code ``package.module:function``)
from an ONNX teacher.

A torch student is exported to ONNX first (``onnxcomp.export``, BatchNorm kept so it trains,
with the teacher's input and output names) and then trained like an ONNX one: the training
module imports no other technique, so this wiring lives here. Library modules are imported
when the command runs, so that ``onnxcomp --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxcomp.cli.options import PreprocessFlags, SessionFlags, flags_command
from onnxcomp.cli.train_options import TrainFlags, run_training
from onnxcomp.errors import OnnxcompError

DEFAULT_LR = 0.1


@dataclasses.dataclass(frozen=True)
class DistillFlags:
    student: Annotated[
        str,
        typer.Option(
            "--student",
            help="Student: an .onnx file, or 'package.module:function' returning a torch module "
            "(e.g. models.zoo:resnet20).",
        ),
    ]
    train: TrainFlags
    preprocessing: PreprocessFlags = dataclasses.field(default_factory=PreprocessFlags)
    session: SessionFlags = dataclasses.field(default_factory=SessionFlags)


def torch_student(factory: str) -> Any:
    """A job student source: exports the module ``factory`` builds with the teacher's names."""

    def build(spec: Any, folder: Path) -> Path:
        from onnxcomp.cli.export import build_module
        from onnxcomp.export import export_torch

        if len(spec.input_names) != 1:
            raise OnnxcompError(
                f"'{factory}': torch students take one input; the teacher has "
                f"{len(spec.input_names)} ({', '.join(spec.input_names)}); export it to ONNX"
            )
        shape = (1, *spec.input_shapes[spec.input_names[0]][1:])
        return export_torch(
            build_module(factory),
            folder / "student.onnx",
            input_shape=shape,
            keep_batchnorm=True,
            input_names=spec.input_names,
            output_names=spec.output_names,
        )

    build.label = factory  # type: ignore[attr-defined]
    return build


@flags_command(DistillFlags)
def distill(flags: DistillFlags) -> None:
    """Distil a student from an ONNX teacher; verify against the teacher, write it atomically."""
    is_file = flags.student.endswith(".onnx") or Path(flags.student).exists()
    student = Path(flags.student) if is_file else torch_student(flags.student)
    if not is_file and ":" not in flags.student:
        raise OnnxcompError(
            f"--student '{flags.student}': no such .onnx file, and not 'package.module:function'"
        )
    run_training(flags.train, flags.preprocessing, flags.session, student, DEFAULT_LR)
