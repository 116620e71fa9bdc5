"""``manifest.json`` and ``samples.npz``: what a device-side integrator needs beside the artifact.

The manifest lists the inputs (shape, dtype, layout, preprocessing when known), the outputs,
the labels when given, the source model's ops and the ops the runtime needs, every shipped
file's size and sha256, the onnxcomp version, the verification's figures and the sample file's
keys. ``samples.npz`` holds a few sample inputs (``input_0``...) and the artifact's own outputs
on them (``output_0``...), as this machine's runtime computed them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcomp import __version__
from onnxcomp.core.inputs import InputSpec
from onnxcomp.data.preprocess import Preprocess
from onnxcomp.errors import OnnxcompError

MANIFEST_NAME = "manifest.json"
SAMPLES_NAME = "samples.npz"
FORMAT_VERSION = 1
_IMAGE_CHANNELS = (1, 3, 4)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def guess_layout(shape: Sequence[int | str | None]) -> str | None:
    """NCHW or NHWC for a 4-D image input whose channel axis is clear, else None."""
    if len(shape) != 4:
        return None
    second, last = shape[1] in _IMAGE_CHANNELS, shape[3] in _IMAGE_CHANNELS
    if second and not last:
        return "NCHW"
    if last and not second:
        return "NHWC"
    return None


def input_layouts(
    specs: Sequence[InputSpec], preprocess: Preprocess | None, single_layout: bool, source: Path
) -> dict[str, str | None]:
    """Each input's layout; one line when two image inputs differ and one layout must hold
    (the target needs it, or one preprocessing is given for all inputs)."""
    layouts = {s.name: guess_layout(s.shape) for s in specs}
    images = {name: layout for name, layout in layouts.items() if layout is not None}
    if (single_layout or preprocess is not None) and len(set(images.values())) > 1:
        found = ", ".join(f"'{name}' {layout}" for name, layout in images.items())
        why = "the target takes one layout" if single_layout else "one preprocessing is given"
        raise OnnxcompError(
            f"{source}: image inputs have different layouts ({found}) but {why}; export the "
            "model with all image inputs in one layout"
        )
    if preprocess is not None:
        layouts = {n: preprocess.layout if n in images else None for n in layouts}
    return layouts


def op_counts(model: ir.Model) -> dict[str, int]:
    """``{"Conv": 20, "com.microsoft::QGemm": 1}`` over the graph and its subgraphs."""
    counts = Counter(
        f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return dict(sorted(counts.items()))


def file_entries(folder: Path) -> dict[str, dict[str, object]]:
    """Size and sha256 of every file in ``folder`` but the manifest, by relative path."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST_NAME:
            entries[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    return entries


def save_samples(
    path: Path,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[np.ndarray],
    output_names: Sequence[str],
) -> dict[str, dict[str, str]]:
    """Write the sample inputs and expected outputs; the npz keys of each tensor name."""
    inputs = {f"input_{i}": name for i, name in enumerate(feeds)}
    named_outputs = {f"output_{i}": name for i, name in enumerate(output_names)}
    arrays = {key: feeds[name] for key, name in inputs.items()}
    arrays.update({key: np.asarray(out) for key, out in zip(named_outputs, outputs, strict=True)})
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return {"inputs": inputs, "outputs": named_outputs}


def tensor_entries(
    values: Sequence[ir.Value], layouts: Mapping[str, str | None] | None = None
) -> list[dict[str, object]]:
    entries = []
    for value in values:
        shape = (
            None
            if value.shape is None
            else [d if isinstance(d, int) else str(d) for d in value.shape]
        )
        entry: dict[str, object] = {
            "name": value.name,
            "dtype": value.dtype.name.lower() if value.dtype is not None else None,
            "shape": shape,
        }
        if layouts is not None:
            entry["layout"] = layouts.get(value.name or "")
        entries.append(entry)
    return entries


def preprocessing_entry(preprocess: Preprocess | None) -> dict[str, object] | None:
    return None if preprocess is None else dataclasses.asdict(preprocess)


def build_manifest(**fields: object) -> dict[str, object]:
    """The manifest: format version and onnxcomp version first, then ``fields`` as given."""
    return {"format_version": FORMAT_VERSION, "onnxcomp_version": __version__, **fields}
