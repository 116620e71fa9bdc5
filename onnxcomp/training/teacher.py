"""The teacher: any ONNX model run in ONNX Runtime, its logits and chosen intermediate tensors.

Knowledge distillation (Hinton et al., 2015) needs the teacher's logits; feature losses
(FitNets, Romero et al. 2015; attention transfer, Zagoruyko & Komodakis 2017) also need
intermediate tensors. :class:`OnnxTeacher` copies the model with the requested tensors
("taps") added as graph outputs, the way ``onnxcomp.stats.collector`` exposes tensors for
statistics, and runs it batch by batch: ``teacher(feeds, indices) -> {name: array}`` gives the
graph outputs plus the taps, as numpy arrays (no torch needed here). A model that fixes its
batch runs in chunks of exactly that batch, the last one padded and trimmed
(``backends.base.FixedBatch``). When the training data is not augmented the teacher's output
for a sample never changes, so a :class:`TeacherCache` keyed by sample index (in memory, or in
``.npy`` memory maps under a cache folder) runs each sample through ONNX Runtime once.
:func:`check_compatible` refuses a teacher and student whose outputs differ in shape or classes.
"""

from __future__ import annotations

import difflib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.backends.base import FixedBatch
from onnxcomp.backends.ort import SessionConfig, create_session, run, session_batch
from onnxcomp.core.io import load_model
from onnxcomp.core.proto import PROTOBUF_LIMIT
from onnxcomp.errors import OnnxcompError, OptionError

Shape = Sequence[int | str | None]
TeacherSource = str | Path | ir.Model | onnx.ModelProto

# ORT input types whose feeds are cast when given in another float dtype (e.g. float64).
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _as_proto(model: TeacherSource) -> tuple[onnx.ModelProto, str]:
    """The model as a ModelProto, and how messages name it."""
    if isinstance(model, onnx.ModelProto):
        return model, "the in-memory teacher"
    if isinstance(model, ir.Model):
        return ir.to_proto(model), "the in-memory teacher"
    path = Path(model)
    return ir.to_proto(load_model(path)), f"'{path}'"


def tensor_names(proto: onnx.ModelProto) -> list[str]:
    """The names a tap may name: graph inputs and the outputs of the main graph's nodes."""
    names = [i.name for i in proto.graph.input]
    names += [name for node in proto.graph.node for name in node.output if name]
    return list(dict.fromkeys(names))


def _check_taps(proto: onnx.ModelProto, taps: Sequence[str], label: str) -> None:
    known = tensor_names(proto)
    present = set(known)
    for tap in taps:
        if tap in present:
            continue
        similar = difflib.get_close_matches(tap, known, n=5, cutoff=0.5) or known[:5]
        raise OptionError(
            f"teacher {label} has no tensor named '{tap}' to tap (similar: "
            f"{', '.join(similar)}); name the output of one of its nodes"
        )


def _dims(shape: Shape | None) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in (shape or ()))


def _show(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_compatible(
    teacher_output_shapes: Mapping[str, Shape],
    student_output_shapes: Mapping[str, Shape],
) -> None:
    """Refuse (one OnnxcompError line) a teacher and student whose outputs cannot be compared.

    Outputs are paired in graph order; their counts must agree, and each pair must have the
    same rank and the same size on every axis but the batch where both sizes are known
    (symbolic or unknown sizes pass). For (batch, classes) outputs the message names the
    class counts.
    """
    teacher = list(teacher_output_shapes.items())
    student = list(student_output_shapes.items())
    if len(teacher) != len(student):
        raise OnnxcompError(
            f"the teacher has {len(teacher)} output(s) ({', '.join(n for n, _ in teacher)}) "
            f"but the student has {len(student)} ({', '.join(n for n, _ in student)}); "
            "distil between models with the same outputs"
        )
    for (t_name, t_shape), (s_name, s_shape) in zip(teacher, student, strict=True):
        t_dims, s_dims = _dims(t_shape), _dims(s_shape)
        clash = len(t_dims) != len(s_dims) or any(
            t is not None and s is not None and t != s
            for t, s in zip(t_dims[1:], s_dims[1:], strict=False)
        )
        if not clash:
            continue
        what = f"shape {_show(t_dims)} but student output '{s_name}' has {_show(s_dims)}"
        if len(t_dims) == len(s_dims) == 2:
            what += f": the teacher predicts {t_dims[1]} classes, the student {s_dims[1]}"
        raise OnnxcompError(
            f"teacher output '{t_name}' has {what}; teacher and student must predict the same "
            "classes (the same output shapes)"
        )


class TeacherCache:
    """Teacher outputs of ``samples`` samples, keyed by sample index; filled on first use.

    Each output gets one array of shape (samples, *row shape), allocated when its first rows
    arrive: in memory, or, with ``directory``, as ``.npy`` memory maps in a fresh folder inside
    it (removed by :meth:`close`), so tapped feature maps of a large data set need not fit in
    memory. Only for data without augmentation: a sample's output must not change.
    """

    def __init__(self, samples: int, directory: str | Path | None = None) -> None:
        if samples <= 0:
            raise OptionError(f"the teacher cache needs a positive sample count, got {samples}")
        self.samples = samples
        self.filled = np.zeros(samples, dtype=bool)
        self.arrays: dict[str, np.ndarray] = {}
        self.folder: Path | None = None
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="teacher-", dir=directory))

    def _indices(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        outside = indices[(indices < 0) | (indices >= self.samples)]
        if outside.size:
            raise OnnxcompError(
                f"sample index {int(outside[0])} is outside the teacher cache of {self.samples} "
                "samples; size the cache to the training set"
            )
        return indices

    def has(self, indices: np.ndarray) -> np.ndarray:
        """Which of ``indices`` are cached (a boolean mask)."""
        return self.filled[self._indices(indices)]

    def _array(self, index: int, name: str, value: np.ndarray) -> np.ndarray:
        if name not in self.arrays:
            shape = (self.samples, *value.shape[1:])
            if self.folder is None:
                self.arrays[name] = np.zeros(shape, dtype=value.dtype)
            else:
                path = self.folder / f"output{index}.npy"
                self.arrays[name] = np.lib.format.open_memmap(
                    path, mode="w+", dtype=value.dtype, shape=shape
                )
        return self.arrays[name]

    def put(self, indices: np.ndarray, outputs: Mapping[str, np.ndarray]) -> None:
        """Store the rows of ``outputs`` (first axis = ``indices``)."""
        indices = self._indices(indices)
        for index, (name, value) in enumerate(outputs.items()):
            value = np.asarray(value)
            if value.ndim == 0 or value.shape[0] != indices.size:
                raise OnnxcompError(
                    f"teacher output '{name}' has shape {list(value.shape)}, not one row per "
                    "sample, so it cannot be cached by sample; run the teacher without its cache"
                )
            self._array(index, name, value)[indices] = value
        self.filled[indices] = True

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The cached rows of ``indices`` (all must be cached), as fresh arrays."""
        indices = self._indices(indices)
        return {name: np.array(array[indices]) for name, array in self.arrays.items()}

    def close(self) -> None:
        """Drop the arrays and the memory-map folder."""
        self.arrays.clear()
        self.filled[:] = False
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class OnnxTeacher:
    """An ONNX model run in ONNX Runtime as a distillation teacher.

    ``taps`` name intermediate tensors (node outputs) returned beside the graph outputs; an
    unknown name is refused at once with the closest names. ``provider`` (``cpu``, ``cuda``,
    ``tensorrt``) overrides ``session_config.provider`` (default: CPU). ``cache_samples`` (the
    training set's size, for data without augmentation) turns on a :class:`TeacherCache`: a
    call with ``indices`` then runs ONNX Runtime only on the samples not yet cached;
    ``cache_dir`` keeps the cache in memory-mapped files there. ``runs`` counts ONNX Runtime
    calls. ``label`` names an in-memory model in messages (e.g. the file it was read from).
    """

    def __init__(
        self,
        model: TeacherSource,
        taps: Sequence[str] = (),
        provider: str | None = None,
        session_config: SessionConfig | None = None,
        cache_samples: int | None = None,
        cache_dir: str | Path | None = None,
        label: str | None = None,
    ) -> None:
        proto, self.label = _as_proto(model)
        self.label = label or self.label
        self.graph_outputs = [o.name for o in proto.graph.output]
        _check_taps(proto, taps, self.label)
        self.taps = [t for t in dict.fromkeys(taps) if t not in self.graph_outputs]
        for name in self.taps:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
        config = session_config or SessionConfig()
        if provider is not None:
            config = replace(config, provider=provider)
        self._folder = None
        if proto.ByteSize() > PROTOBUF_LIMIT - 2**20:
            self._folder = tempfile.TemporaryDirectory(prefix="onnxcomp-teacher-")
            path = Path(self._folder.name) / "teacher.onnx"
            onnx.save(proto, path, save_as_external_data=True, location="teacher.data")
            self.session = create_session(path, config)
        else:
            self.session = create_session(proto.SerializeToString(), config)
        del proto
        self.batch: FixedBatch | None = session_batch(self.session)
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.output_names = [*self.graph_outputs, *self.taps]
        self.cache = None if cache_samples is None else TeacherCache(cache_samples, cache_dir)
        self.runs = 0

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def output_shapes(self) -> dict[str, tuple[int | str | None, ...]]:
        """The graph outputs' shapes as the model declares them (for :func:`check_compatible`)."""
        shapes = {o.name: tuple(o.shape or ()) for o in self.session.get_outputs()}
        return {name: shapes[name] for name in self.graph_outputs}

    def _feeds(self, inputs: Mapping[str, object] | object) -> dict[str, np.ndarray]:
        if not isinstance(inputs, Mapping):
            if len(self.inputs) != 1:
                raise OnnxcompError(
                    f"teacher {self.label} has {len(self.inputs)} inputs "
                    f"({', '.join(self.inputs)}); pass them as a dict by name"
                )
            inputs = {next(iter(self.inputs)): inputs}
        feeds = {}
        for name, kind in self.inputs.items():
            if name not in inputs:
                raise OnnxcompError(
                    f"teacher {self.label} needs input '{name}' (given: "
                    f"{', '.join(map(str, inputs)) or 'none'}); feed it the student's inputs"
                )
            value = inputs[name]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            value = np.asarray(value)
            wanted = _FLOAT_TYPES.get(kind)
            if wanted is not None and value.dtype != wanted and value.dtype.kind == "f":
                value = value.astype(wanted)
            feeds[name] = value
        return feeds

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """All outputs for ``feeds``; a fixed-batch model runs in chunks of its batch."""
        rows = _rows(feeds)
        step = self.batch.size if self.batch is not None else None
        if step is None or rows is None or rows <= step:
            self.runs += 1
            values = run(self.session, feeds, self.output_names, self.batch)
            return dict(zip(self.output_names, values, strict=True))
        parts = []
        for start in range(0, rows, step):
            chunk = {
                k: v[start : start + step] if _batched(v, rows) else v for k, v in feeds.items()
            }
            self.runs += 1
            parts.append(run(self.session, chunk, self.output_names, self.batch))
        return {
            name: np.concatenate([part[i] for part in parts])
            for i, name in enumerate(self.output_names)
        }

    def __call__(
        self, inputs: Mapping[str, object] | object, indices: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """Graph outputs and taps for a batch of ``inputs`` (by name, or one array).

        With a cache and ``indices`` (the samples' positions in the training set), cached
        samples are not run again.
        """
        feeds = self._feeds(inputs)
        if self.cache is None or indices is None:
            return self._run(feeds)
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = _rows(feeds)
        if rows != index.size:
            raise OnnxcompError(
                f"{index.size} sample indices for a batch of {rows} samples; pass one index "
                "per sample"
            )
        missing = ~self.cache.has(index)
        if missing.any():
            subset = {k: v[missing] if _batched(v, rows) else v for k, v in feeds.items()}
            self.cache.put(index[missing], self._run(subset))
        return self.cache.get(index)

    def close(self) -> None:
        """Release the cache and any temporary files."""
        if self.cache is not None:
            self.cache.close()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def _batched(value: np.ndarray, rows: int | None) -> bool:
    return value.ndim > 0 and value.shape[0] == rows


def _rows(feeds: Mapping[str, np.ndarray]) -> int | None:
    """The batch size of ``feeds`` (the first axis of the inputs; None when they disagree)."""
    sizes = {v.shape[0] for v in feeds.values() if v.ndim}
    return sizes.pop() if len(sizes) == 1 else None
