"""The main job: load, run the passes, save (staged), verify, then put the file in place."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from onnxcomp.backends.ort import SessionConfig
from onnxcomp.converter.base import PassContext, PassRecord
from onnxcomp.converter.pipeline import Pipeline, PipelineOptions
from onnxcomp.converter.verify import Fidelity, VerifyOptions, verify_files
from onnxcomp.core.inputs import batch_of_shapes
from onnxcomp.core.io import (
    check_output_path,
    load_model,
    staged_save,
    write_sparse_initializers,
)
from onnxcomp.core.units import format_bytes
from onnxcomp.data.batches import DataOptions, batch_note
from onnxcomp.errors import VerificationError


@dataclass
class ConvertReport:
    """What ``convert`` did: per-pass records, fidelity, sizes."""

    input_path: str
    output_path: str
    records: list[PassRecord]
    fidelity: Fidelity | None
    input_bytes: int
    output_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "input": self.input_path,
            "output": self.output_path,
            "passes": [r.to_dict() for r in self.records],
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "seconds": self.seconds,
            "notes": self.notes,
        }


@dataclass
class ConvertHooks:
    """Callbacks the CLI uses for progress display."""

    on_pass: Callable[[str], None] | None = None
    on_task: Callable[[str, int | None], None] | None = None
    on_advance: Callable[[int], None] | None = None


def file_bytes(path: Path) -> int:
    """Size of the model file plus its external-data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _model_batch(model: ir.Model) -> int | None:
    """The batch the model's real inputs fix (``core.inputs.batch_of_shapes``), or None."""
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    shapes = [
        tuple(d if isinstance(d, int) else None for d in v.shape) if v.shape is not None else ()
        for v in inputs
    ]
    return batch_of_shapes(shapes)


def sparse_note(staged: Path) -> str:
    """``--sparse-initializers``: rewrite the staged file, and say what it did in one line."""
    before = staged.stat().st_size
    moved = write_sparse_initializers(staged)
    if moved is None:
        return (
            "--sparse-initializers: the model is saved with external data; its weights stay dense"
        )
    if not moved:
        return (
            "--sparse-initializers: no weight is sparse enough to gain (float32 needs more "
            "than 2/3 zeros: add --sparsity S); the file is dense"
        )
    return (
        f"--sparse-initializers: {len(moved)} weight(s) stored as ONNX sparse_initializer, "
        f"file {format_bytes(before)} -> {format_bytes(staged.stat().st_size)}"
    )


def convert(
    input_path: str | Path,
    output_path: str | Path,
    options: PipelineOptions = PipelineOptions(),
    verify: VerifyOptions | None = VerifyOptions(),
    session: SessionConfig = SessionConfig(),
    force: bool = False,
    hooks: ConvertHooks = ConvertHooks(),
    calibration: DataOptions | None = None,
    sparse_initializers: bool = False,
) -> ConvertReport:
    """Convert ``input_path`` into ``output_path`` and verify the result.

    The output is written only when verification passes; a lossless pipeline whose result
    differs by more than ``verify.tolerance`` (max abs error over max |reference|) raises
    :class:`VerificationError` and leaves no file. ``sparse_initializers``: the staged file's
    mostly-zero float weights are written as ONNX ``sparse_initializer`` (where smaller)
    before it is checked and verified.
    """
    start = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    check_output_path(output_path, [input_path], force=force)
    model = load_model(input_path)
    note = batch_note(_model_batch(model))
    context = PassContext(
        calibration=calibration,
        evaluation=verify if verify is not None and verify.data is not None else None,
        session=session,
        on_task=hooks.on_task,
        on_advance=hooks.on_advance,
    )
    result = Pipeline.from_options(options, context).run(model, on_pass=hooks.on_pass)
    fidelity = None
    notes = [note] if note and (calibration is not None or verify is not None) else []
    with staged_save(result.model, output_path) as staged:
        from onnxcomp.core.io import check_model

        if sparse_initializers:
            notes.append(sparse_note(staged))
        check_model(staged)
        if verify is not None:
            fidelity = verify_files(
                input_path,
                staged,
                verify,
                session,
                on_batch=hooks.on_advance,
                on_start=lambda n: hooks.on_task and hooks.on_task("verifying", n),
            )
            if result.lossless and fidelity.relative_error > verify.tolerance:
                raise VerificationError(
                    f"{input_path}: the lossless passes changed the outputs by "
                    f"{fidelity.relative_error:.2e} relative error (tolerance "
                    f"{verify.tolerance:.0e}); no output written. This is a bug in onnxcomp: "
                    "please report it, and run with --no-fold-batchnorm/--no-cleanup to "
                    "find the pass"
                )
        output_bytes = staged.stat().st_size
    return ConvertReport(
        input_path=str(input_path),
        output_path=str(output_path),
        records=result.records,
        fidelity=fidelity,
        input_bytes=file_bytes(input_path),
        output_bytes=file_bytes(output_path) if output_path.exists() else output_bytes,
        seconds=time.perf_counter() - start,
        notes=notes,
    )
