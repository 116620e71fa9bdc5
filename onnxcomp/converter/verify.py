"""Fidelity of a converted model: run both models in ONNX Runtime on the same inputs.

Inputs come from the user's data (streamed in batches) or are random samples that respect
the input shapes and dtypes. Metrics are accumulated batch by batch, so memory does not grow
with the number of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from onnxcomp.backends.ort import SessionConfig, create_session, run, session_batch
from onnxcomp.core.inputs import InputSpec, fixed_batch, input_specs
from onnxcomp.core.io import read_proto
from onnxcomp.data.batches import DataOptions, Feeds, batch_note, sample_batches
from onnxcomp.errors import OnnxcompError


@dataclass
class OutputFidelity:
    """How close one output of the candidate is to the reference's.

    ``relative_error`` is max |candidate - reference| / max |reference|, over all samples.
    """

    name: str
    max_abs_error: float
    mean_abs_error: float
    relative_error: float
    cosine: float
    top1_agreement: float | None


@dataclass
class Fidelity:
    """Fidelity over all outputs, and accuracy of both models when the data has labels."""

    samples: int
    source: str
    outputs: list[OutputFidelity]
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def relative_error(self) -> float:
        return max((o.relative_error for o in self.outputs), default=0.0)

    @property
    def top1_agreement(self) -> float | None:
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return values[0] if values else None

    def to_dict(self) -> dict:
        return {**asdict(self), "relative_error": self.relative_error}


class _OutputStats:
    """Streaming sums for one output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_abs = 0.0
        self.ref_max = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.dot = 0.0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.agree = 0
        self.rows = 0
        self.classifier = True

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise OnnxcompError(
                f"output '{self.name}' has shape {cand.shape} in the converted model but "
                f"{ref.shape} in the original"
            )
        r = ref.astype(np.float64, copy=False)
        c = cand.astype(np.float64, copy=False)
        diff = np.abs(c - r)
        if diff.size:
            worst = float(np.max(diff))
            self.max_abs = max(self.max_abs, worst if np.isfinite(worst) else np.inf)
            self.ref_max = max(self.ref_max, float(np.max(np.abs(r))))
        self.abs_sum += float(diff.sum())
        self.count += diff.size
        self.dot += float(np.vdot(r, c))
        self.ref_sq += float(np.vdot(r, r))
        self.cand_sq += float(np.vdot(c, c))
        if r.ndim == 2 and r.shape[1] > 1:
            self.agree += int((r.argmax(1) == c.argmax(1)).sum())
            self.rows += r.shape[0]
        else:
            self.classifier = False

    def result(self) -> OutputFidelity:
        norm = np.sqrt(self.ref_sq * self.cand_sq)
        cosine = self.dot / norm if norm > 0 else float(self.ref_sq == self.cand_sq)
        return OutputFidelity(
            name=self.name,
            max_abs_error=self.max_abs,
            mean_abs_error=self.abs_sum / max(self.count, 1),
            relative_error=self.max_abs / self.ref_max if self.ref_max > 0 else self.max_abs,
            cosine=float(cosine),
            top1_agreement=self.agree / self.rows if self.classifier and self.rows else None,
        )


def measure_fidelity(
    reference: Callable[[Feeds], list[np.ndarray]],
    candidate: Callable[[Feeds], list[np.ndarray]],
    output_names: Sequence[str],
    batches: Iterator[tuple[Feeds, np.ndarray | None]],
    source: str,
    on_batch: Callable[[int], None] | None = None,
) -> Fidelity:
    """Run both models on every batch and accumulate the fidelity metrics."""
    stats = [_OutputStats(name) for name in output_names]
    samples = 0
    ref_correct = cand_correct = labelled = 0
    for feeds, labels in batches:
        ref_out = reference(feeds)
        cand_out = candidate(feeds)
        for stat, r, c in zip(stats, ref_out, cand_out, strict=True):
            stat.update(np.asarray(r), np.asarray(c))
        n = next(iter(feeds.values())).shape[0] if feeds else 1
        samples += n
        if labels is not None and ref_out and np.asarray(ref_out[0]).ndim == 2:
            ref_correct += int((np.asarray(ref_out[0]).argmax(1) == labels).sum())
            cand_correct += int((np.asarray(cand_out[0]).argmax(1) == labels).sum())
            labelled += len(labels)
        if on_batch:
            on_batch(n)
    if samples == 0:
        raise OnnxcompError(f"{source}: no samples to compare the models on")
    return Fidelity(
        samples=samples,
        source=source,
        outputs=[s.result() for s in stats],
        reference_accuracy=ref_correct / labelled if labelled else None,
        candidate_accuracy=cand_correct / labelled if labelled else None,
    )


def session_runner(session) -> Callable[[Feeds], list[np.ndarray]]:
    """A callable that runs an ORT session on feeds (only the inputs it declares; fewer
    samples than a fixed batch are padded and trimmed back: ``backends.base.FixedBatch``)."""
    names = [i.name for i in session.get_inputs()]
    batch = session_batch(session)

    def runner(feeds: Feeds) -> list[np.ndarray]:
        return run(session, {k: feeds[k] for k in names}, batch=batch)

    return runner


def _batching_specs(
    ref_specs: list[InputSpec], cand_specs: list[InputSpec], reference: Path, candidate: Path
) -> list[InputSpec]:
    """The specs whose batch both models accept: a fixed batch of either one."""
    ref_batch, cand_batch = fixed_batch(ref_specs), fixed_batch(cand_specs)
    if ref_batch is not None and cand_batch is not None and ref_batch != cand_batch:
        raise OnnxcompError(
            f"{candidate}: fixes the batch to {cand_batch}, {reference} to {ref_batch}; the "
            "models are not comparable on the same batches (give models with the same batch)"
        )
    return cand_specs if ref_batch is None and cand_batch is not None else ref_specs


@dataclass(frozen=True)
class VerifyOptions(DataOptions):
    """Samples to verify on, and the tolerance of lossless pipelines."""

    tolerance: float = 1e-4


def verify_files(
    reference: Path,
    candidate: Path,
    options: VerifyOptions,
    session_config: SessionConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Fidelity:
    """Fidelity of ``candidate`` against ``reference``, both run in ONNX Runtime."""
    config = session_config or SessionConfig()
    ref_proto, cand_proto = read_proto(reference), read_proto(candidate)
    specs = input_specs(ref_proto)
    cand_specs = {s.name: s for s in input_specs(cand_proto)}
    for spec in specs:
        other = cand_specs.get(spec.name)
        if other is None or other.dtype != spec.dtype or len(other.shape) != len(spec.shape):
            raise OnnxcompError(
                f"{candidate}: input {spec.describe()} of {reference} has no match "
                f"(found {other.describe() if other else 'none'}); the models are not comparable"
            )
    ref_outputs = [o.name for o in ref_proto.graph.output]
    cand_outputs = [o.name for o in cand_proto.graph.output]
    if len(ref_outputs) != len(cand_outputs):
        raise OnnxcompError(
            f"{candidate}: has {len(cand_outputs)} outputs, {reference} has {len(ref_outputs)}"
        )
    # The reference runs with ORT's graph optimizations off, so that ORT's own fusions (its
    # Conv+BatchNorm fusion among them) cannot hide a difference the conversion introduced.
    ref_session = create_session(reference, replace(config, optimization_level="disable"))
    cand_session = create_session(candidate, config)
    specs = _batching_specs(specs, list(cand_specs.values()), reference, candidate)
    batches, source, count = sample_batches(specs, options)
    if on_start:
        on_start(count)
    fidelity = measure_fidelity(
        session_runner(ref_session),
        session_runner(cand_session),
        ref_outputs,
        batches,
        source,
        on_batch,
    )
    note = batch_note(fixed_batch(specs))
    if note:
        fidelity.notes.append(note)
    return fidelity
