"""The deploy job: check, write the artifact into a temporary folder beside the output, verify
it against the source ``.onnx``, write the manifest and samples, then rename into place.

Rules:

1. Options, the target's install and the output folder are checked before the model is read:
   an existing, non-empty output folder is refused unless ``force``; a folder that holds the
   source model is refused always (replacing it would delete the input).
2. The model is deployed as it is (no compression here: ``onnxcomp convert`` first).
3. Verification runs the artifact on its backend against the source in ONNX Runtime on the
   user's data or random inputs: a float source with graph optimizations off (as
   ``converter.verify`` does), a quantized one with them on (its int8 kernels are what the
   artifact should reproduce; off, ORT simulates QDQ in float and rounds differently). A float
   model deployed with float I/O must match within ``tolerance`` (relative: max abs error over
   max |reference|), else :class:`VerificationError` and nothing is written; a quantized model
   (or int8/uint8 I/O) is reported, not judged: int8 kernels round differently.
4. Everything is written into ``.onnxcomp-deploy-XXXX`` beside the output and renamed into place
   at the end; any error removes it, and the previous folder (``force``) stays untouched until
   the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from onnxcomp.backends.base import Session, SessionConfig
from onnxcomp.backends.ort import create_session
from onnxcomp.backends.registry import get_backend
from onnxcomp.converter.verify import Fidelity, VerifyOptions, measure_fidelity, session_runner
from onnxcomp.core.inputs import InputSpec, input_specs
from onnxcomp.core.io import load_model, read_proto
from onnxcomp.core.ops import QUANTIZED_OPS, first_node_of
from onnxcomp.data.batches import sample_batches
from onnxcomp.deploy.artifact import IO_DTYPES, PLATFORMS, Artifact, WriteOptions
from onnxcomp.deploy.manifest import (
    MANIFEST_NAME,
    SAMPLES_NAME,
    build_manifest,
    file_entries,
    input_layouts,
    op_counts,
    preprocessing_entry,
    save_samples,
    sha256,
    tensor_entries,
)
from onnxcomp.deploy.targets import Target, get_target
from onnxcomp.errors import OnnxcompError, OptionError, VerificationError


@dataclass(frozen=True)
class DeployOptions:
    """What ``deploy`` is told; checked when built (:class:`OptionError`)."""

    target: str = "ort"
    platform: str = "arm"
    io_dtype: str = "float32"
    labels: Path | None = None
    force: bool = False
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    session: SessionConfig = field(default_factory=SessionConfig)
    manifest_samples: int = 4

    def __post_init__(self) -> None:
        target = get_target(self.target)
        if self.platform not in PLATFORMS:
            raise OptionError(f"--platform {self.platform}: choose one of {', '.join(PLATFORMS)}")
        if self.io_dtype not in IO_DTYPES:
            raise OptionError(f"--io-dtype {self.io_dtype}: choose one of {', '.join(IO_DTYPES)}")
        if self.io_dtype not in target.io_dtypes:
            raise OptionError(
                f"--io-dtype {self.io_dtype}: target {target.name} takes "
                f"{', '.join(target.io_dtypes)} only"
            )
        if self.manifest_samples < 1:
            raise OptionError(f"manifest_samples must be >= 1, got {self.manifest_samples}")
        if self.labels is not None and not self.labels.is_file():
            raise OptionError(f"--labels {self.labels}: no such file (one label per line)")

    @property
    def target_spec(self) -> Target:
        return get_target(self.target)


@dataclass
class DeployReport:
    """What ``deploy`` wrote and how close the artifact is to the source."""

    source: str
    output: str
    target: str
    artifact: str
    source_bytes: int
    artifact_bytes: int
    fidelity: Fidelity
    judged: bool
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "output": self.output,
            "target": self.target,
            "artifact": self.artifact,
            "source_bytes": self.source_bytes,
            "artifact_bytes": self.artifact_bytes,
            "fidelity": self.fidelity.to_dict(),
            "judged": self.judged,
            "notes": self.notes,
            "seconds": self.seconds,
        }


def check_output_folder(output: Path, source: Path, force: bool) -> None:
    """Refuse an output that is a file, holds the source, is not empty (without ``force``), or
    whose parent cannot be written."""
    if output.exists() and not output.is_dir():
        raise OnnxcompError(f"{output}: is a file; give a folder for the deployed files")
    if source.resolve().is_relative_to(output.resolve()):
        raise OnnxcompError(
            f"{output}: holds the input model {source}; choose another output folder"
        )
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OnnxcompError(
            f"{output}: folder exists and is not empty; choose another folder, or --force to "
            "replace it"
        )
    parent = output.resolve().parent
    if not parent.is_dir():
        raise OnnxcompError(f"{output}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OnnxcompError(f"{output}: folder {parent} is not writable; choose another output")


def read_labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not labels:
        raise OnnxcompError(f"{path}: no labels found; give one label per line")
    return labels


@contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A temporary folder beside ``output``, renamed to ``output`` on a clean exit (replacing
    the old folder only then), removed on an error."""
    stage = Path(tempfile.mkdtemp(prefix=".onnxcomp-deploy-", dir=output.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield stage
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 is for the staging only
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=".onnxcomp-old-", dir=stage.parent))
            os.replace(output, trash / "previous")
            os.replace(stage, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(stage, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _first_samples(specs: list[InputSpec], options: VerifyOptions, count: int) -> dict:
    """The first ``count`` samples of the verification data (or random inputs)."""
    batches, _, _ = sample_batches(specs, replace(options, limit=count, samples=count))
    feeds, _ = next(iter(batches))
    rows = next(iter(feeds.values())).shape[0] if feeds else 0
    return {k: v[:count] if v.ndim and v.shape[0] == rows else v for k, v in feeds.items()}


def _verify(
    source: Path,
    artifact: Artifact,
    target: Target,
    specs: list[InputSpec],
    options: DeployOptions,
    quantized: bool,
    on_batch: Callable[[int], None] | None,
) -> tuple[Fidelity, Session]:
    level = "disable" if not quantized else options.session.optimization_level
    reference = create_session(source, replace(options.session, optimization_level=level))
    candidate = get_backend(target.backend).create_session(artifact.path, options.session)
    batches, description, _ = sample_batches(specs, options.verify)
    fidelity = measure_fidelity(
        session_runner(reference),
        target.runner(candidate),
        [o.name for o in reference.get_outputs()],
        batches,
        description,
        on_batch,
    )
    return fidelity, candidate


def deploy(
    source: str | Path,
    output: str | Path,
    options: DeployOptions = DeployOptions(),
    on_batch: Callable[[int], None] | None = None,
) -> DeployReport:
    """Deploy ``source`` into the folder ``output`` (rules in the module docstring)."""
    start = time.perf_counter()
    source, output = Path(source), Path(output)
    target = options.target_spec
    target.check()
    check_output_folder(output, source, options.force)
    labels = read_labels(options.labels)
    model = load_model(source)
    specs = input_specs(read_proto(source))
    layouts = input_layouts(specs, options.verify.preprocess, target.single_layout, source)
    quantized = first_node_of(model, QUANTIZED_OPS) is not None
    judged = not quantized and options.io_dtype == "float32"
    write_options = WriteOptions(source.stem, options.platform, options.io_dtype)  # type: ignore[arg-type]
    with staged_folder(output) as stage:
        artifact = target.write(model, stage, write_options)
        fidelity, session = _verify(source, artifact, target, specs, options, quantized, on_batch)
        if judged and fidelity.relative_error > options.verify.tolerance:
            raise VerificationError(
                f"{source}: the {target.name} artifact differs from the model by "
                f"{fidelity.relative_error:.2e} relative error (tolerance "
                f"{options.verify.tolerance:.0e}); nothing written. Please report it"
            )
        feeds = _first_samples(specs, options.verify, options.manifest_samples)
        outputs = target.runner(session)(feeds)
        keys = save_samples(stage / SAMPLES_NAME, feeds, outputs, session.output_names)
        manifest = build_manifest(
            target=target.name,
            platform=options.platform if target.name == "ort" else None,
            io_dtype=options.io_dtype,
            source={"file": source.name, "sha256": sha256(source)},
            artifact={"file": artifact.path.name, "bytes": artifact.path.stat().st_size},
            inputs=tensor_entries(
                [v for v in model.graph.inputs if v.name not in model.graph.initializers],
                layouts,
            ),
            preprocessing=preprocessing_entry(options.verify.preprocess),
            outputs=tensor_entries(list(model.graph.outputs)),
            labels=labels,
            ops=op_counts(model),
            runtime_ops=artifact.runtime_ops,
            quantized=quantized,
            verification={
                "samples": fidelity.samples,
                "source": fidelity.source,
                "relative_error": fidelity.relative_error,
                "top1_agreement": fidelity.top1_agreement,
            },
            samples={"file": SAMPLES_NAME, **keys},
            notes=artifact.notes,
            files=file_entries(stage),
        )
        (stage / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        artifact_bytes = artifact.path.stat().st_size
    return DeployReport(
        source=str(source),
        output=str(output),
        target=target.name,
        artifact=artifact.path.name,
        source_bytes=source.stat().st_size,
        artifact_bytes=artifact_bytes,
        fidelity=fidelity,
        judged=judged,
        notes=artifact.notes,
        seconds=time.perf_counter() - start,
    )
