"""Streaming data sources: image folders, .npy and .npz files -> batches of model inputs."""

from __future__ import annotations

import abc
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from onnxcomp.data.preprocess import Preprocess
from onnxcomp.errors import OnnxcompError

IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
LABEL_KEYS: tuple[str, ...] = ("labels", "label", "y")
MAX_SKIPPED_LISTED = 5


@dataclass
class Batch:
    """One batch: model input name -> array (first axis = samples), and int64 labels or None."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))


class DataSource(abc.ABC):
    """A lazily decoded sequence of samples, read batch by batch."""

    path: Path
    num_samples: int
    has_labels: bool
    class_names: list[str] | None
    skipped: int
    skipped_files: list[str]

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying what is read and how many samples."""

    @abc.abstractmethod
    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yield batches of at most `batch_size` samples; the last one may be smaller."""


# --------------------------------------------------------------------------- images


class ImageSource(DataSource):
    """Images from an ImageFolder tree (`root/<class>/*.jpg`), a flat folder or one file."""

    def __init__(
        self,
        path: Path,
        files: list[Path],
        input_name: str,
        preprocess: Preprocess,
        labels: list[int] | None = None,
        class_names: list[str] | None = None,
        note: str = "",
    ) -> None:
        self.path = path
        self.files = files
        self.input_name = input_name
        self.preprocess = preprocess
        self.labels = labels
        self.class_names = class_names
        self.num_samples = len(files)
        self.has_labels = labels is not None
        self.skipped = 0
        self.skipped_files = []
        self._note = note

    def describe(self) -> str:
        kind = f"{len(self.class_names)} classes" if self.class_names is not None else "no labels"
        text = f"{self.path}: {self.num_samples} images ({kind}) -> input '{self.input_name}'"
        if self._note:
            text += f"; {self._note}"
        if self.skipped:
            text += f"; {self.skipped} unreadable skipped"
        return text

    def batches(self, batch_size: int) -> Iterator[Batch]:
        _check_batch_size(batch_size)
        self.skipped = 0
        self.skipped_files = []
        arrays: list[np.ndarray] = []
        labels: list[int] = []
        first_file: Path | None = None
        produced = 0
        for index, file in enumerate(self.files):
            image = self._decode(file)
            if image is None:
                continue
            array = self.preprocess.apply(image)
            if not arrays:
                first_file = file
            elif array.shape != arrays[0].shape:
                raise OnnxcompError(
                    f"{file}: preprocessed image shape {array.shape} differs from "
                    f"{arrays[0].shape} of {first_file} in the same batch; pass --resize/--crop "
                    "(or a preset such as --preset imagenet) so all images get one size"
                )
            arrays.append(array)
            if self.labels is not None:
                labels.append(self.labels[index])
            if len(arrays) == batch_size:
                produced += len(arrays)
                yield self._make_batch(arrays, labels)
                arrays, labels = [], []
        if arrays:
            produced += len(arrays)
            yield self._make_batch(arrays, labels)
        if produced == 0 and self.skipped:
            raise OnnxcompError(
                f"no readable images in {self.path} ({self.skipped} skipped; first: "
                f"{self.skipped_files[0]}); check that the files are valid images"
            )

    def _make_batch(self, arrays: list[np.ndarray], labels: list[int]) -> Batch:
        batch_labels = np.asarray(labels, dtype=np.int64) if self.labels is not None else None
        return Batch(inputs={self.input_name: np.stack(arrays)}, labels=batch_labels)

    def _decode(self, file: Path) -> Image.Image | None:
        """Fully decode `file` in the preprocess colour mode; None (and counted) if it fails."""
        mode = "L" if self.preprocess.grayscale else "RGB"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(file) as opened:
                    opened.load()
                    return opened.convert(mode)
        except Exception:  # any decoder failure means "unreadable": skip it, never crash
            self.skipped += 1
            if len(self.skipped_files) < MAX_SKIPPED_LISTED:
                self.skipped_files.append(str(file))
            return None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(path)


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    """All image files below `folder` (recursive), sorted, hidden entries skipped."""
    found = []
    for file in folder.rglob("*"):
        rel = file.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if _is_image(file):
            found.append(file)
    return sorted(found)


def _no_images_error(folder: Path) -> OnnxcompError:
    return OnnxcompError(
        f"{folder}: no images found (accepted extensions: {', '.join(IMAGE_EXTENSIONS)}); "
        "put images in the folder or in one subfolder per class"
    )


def _open_image_folder(
    folder: Path, input_name: str, preprocess: Preprocess, limit: int | None, seed: int
) -> ImageSource:
    loose = sorted(p for p in folder.iterdir() if _is_image(p))
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p))
    per_class = {d.name: _images_under(d) for d in class_dirs}
    per_class = {name: files for name, files in per_class.items() if files}
    if per_class:
        class_names = sorted(per_class)
        note = f"{len(loose)} loose images in the root ignored" if loose else ""
        groups = [per_class[name] for name in class_names]
        picked = _balanced_pick(groups, limit, seed)
        files = [groups[c][i] for c, i in picked]
        labels = [c for c, _ in picked]
        if limit is not None:
            note = "; ".join(filter(None, [note, f"limit {limit}, balanced over classes"]))
        return ImageSource(folder, files, input_name, preprocess, labels, class_names, note)
    if not loose:
        raise _no_images_error(folder)
    indices = _random_pick(len(loose), limit, seed)
    note = f"limit {limit}, random subset" if limit is not None else ""
    return ImageSource(folder, [loose[i] for i in indices], input_name, preprocess, note=note)


def _balanced_pick(groups: list[list[Path]], limit: int | None, seed: int) -> list[tuple[int, int]]:
    """(class, index) pairs: all, in order, without a limit; else round-robin, seeded."""
    if limit is None:
        return [(c, i) for c, files in enumerate(groups) for i in range(len(files))]
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(len(files))) for files in groups]
    order = list(rng.permutation(len(groups)))
    picked: list[tuple[int, int]] = []
    depth = 0
    while len(picked) < limit and any(depth < len(q) for q in queues):
        for c in order:
            if depth < len(queues[c]) and len(picked) < limit:
                picked.append((int(c), int(queues[c][depth])))
        depth += 1
    return picked


def _random_pick(count: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of `limit` items (all items without a limit)."""
    if limit is None or limit >= count:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=limit, replace=False))


# --------------------------------------------------------------------------- arrays


class ArraySource(DataSource):
    """Samples from .npy / .npz arrays (already preprocessed; first axis = samples)."""

    def __init__(
        self,
        path: Path,
        arrays: dict[str, np.ndarray],
        keys: dict[str, str],
        labels: np.ndarray | None,
        label_key: str | None,
        indices: np.ndarray | None,
        note: str = "",
    ) -> None:
        self.path = path
        self.arrays = arrays
        self.keys = keys
        self.labels = labels
        self.label_key = label_key
        self.indices = indices
        total = len(next(iter(arrays.values())))
        self.num_samples = total if indices is None else len(indices)
        self.has_labels = labels is not None
        self.class_names = None
        self.skipped = 0
        self.skipped_files = []
        self._note = note

    def describe(self) -> str:
        parts = [
            f"'{name}' <- {key} {self.arrays[name].dtype} {tuple(self.arrays[name].shape[1:])}"
            for name, key in self.keys.items()
        ]
        text = f"{self.path}: {self.num_samples} samples; " + ", ".join(parts)
        text += f"; labels from '{self.label_key}'" if self.label_key else "; no labels"
        if self._note:
            text += f"; {self._note}"
        return text

    def batches(self, batch_size: int) -> Iterator[Batch]:
        _check_batch_size(batch_size)
        for start in range(0, self.num_samples, batch_size):
            stop = min(start + batch_size, self.num_samples)
            rows: slice | np.ndarray = (
                slice(start, stop) if self.indices is None else self.indices[start:stop]
            )
            inputs = {name: np.ascontiguousarray(arr[rows]) for name, arr in self.arrays.items()}
            labels = None if self.labels is None else np.asarray(self.labels[rows], np.int64)
            yield Batch(inputs=inputs, labels=labels)


def _open_npy(path: Path, input_names: Sequence[str]) -> tuple[dict, dict, None, None]:
    if len(input_names) != 1:
        raise OnnxcompError(
            f"{path}: a .npy file feeds one model input, but the model has {len(input_names)} "
            f"({', '.join(input_names)}); save a .npz with one array per input name"
        )
    array = _load_npy(path)
    return {input_names[0]: array}, {input_names[0]: "array"}, None, None


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise OnnxcompError(f"{path}: cannot read .npy file ({_first_line(exc)})") from None
    _check_samples_axis(path, "array", array)
    return array


def _open_npz(
    path: Path, input_names: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, str], np.ndarray | None, str | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = list(npz.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise OnnxcompError(f"{path}: cannot read .npz file ({_first_line(exc)})") from None
    label_key = next((k for k in LABEL_KEYS if k in found), None)
    data_keys = [k for k in found if k != label_key]
    if all(name in found for name in input_names) and input_names:
        keys = {name: name for name in input_names}
    elif len(input_names) == 1 and len(data_keys) == 1:
        keys = {input_names[0]: data_keys[0]}
    else:
        raise OnnxcompError(
            f"{path}: no arrays match the model inputs: found keys [{', '.join(found)}], "
            f"expected [{', '.join(input_names)}]; save with np.savez(path, <input name>=array)"
        )
    arrays = {name: _load_npz_member(path, key) for name, key in keys.items()}
    for name, key in keys.items():
        _check_samples_axis(path, key, arrays[name])
    labels = _load_npz_member(path, label_key) if label_key else None
    return arrays, keys, labels, label_key


def _load_npz_member(path: Path, key: str) -> np.ndarray:
    """Memory-map an uncompressed .npz member; read compressed ones whole."""
    member = f"{key}.npy"
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(member)
            if info.compress_type == zipfile.ZIP_STORED:
                with zf.open(info) as fh:
                    header = _read_npy_header(fh)
                if header is not None and not header[2].hasobject:
                    shape, fortran, dtype, header_len = header
                    offset = _member_data_offset(path, info) + header_len
                    if shape == () or 0 in shape:
                        return np.zeros(shape, dtype)
                    order = "F" if fortran else "C"
                    return np.memmap(path, dtype, "r", offset, shape, order)
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise OnnxcompError(f"{path}: cannot read array '{key}' ({_first_line(exc)})") from None


def _read_npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran_order, dtype, header length) of an .npy stream; None for unknown versions."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        return None
    return shape, fortran, dtype, fh.tell()


def _member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset where a zip member's data starts (after its local file header)."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
        if header[:4] != b"PK\x03\x04":
            raise ValueError("bad zip local header")
        name_len = int.from_bytes(header[26:28], "little")
        extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def _check_samples_axis(path: Path, key: str, array: np.ndarray) -> None:
    if array.ndim == 0:
        raise OnnxcompError(
            f"{path}: array '{key}' is a scalar; the first axis must index the samples"
        )
    if array.dtype.hasobject:
        raise OnnxcompError(f"{path}: array '{key}' holds Python objects; save a numeric array")


def _prepare_labels(path: Path, key: str, labels: np.ndarray, count: int) -> np.ndarray:
    """Labels as a 1-D int64 array of `count` items (accepts shape (N,) or (N,1))."""
    labels = np.asarray(labels)
    if labels.size != count or labels.ndim == 0 or labels.shape[0] != count:
        raise OnnxcompError(
            f"{path}: labels '{key}' have shape {labels.shape}, expected ({count},) "
            "one integer class per sample"
        )
    labels = labels.reshape(count)
    if labels.dtype.kind not in "iub":
        as_int = labels.astype(np.int64)
        if labels.dtype.kind != "f" or not np.array_equal(as_int, labels):
            raise OnnxcompError(
                f"{path}: labels '{key}' must be integer class indices, got dtype {labels.dtype}"
            )
    return labels.astype(np.int64)


def _open_arrays(
    path: Path, input_names: Sequence[str], limit: int | None, seed: int, preprocess_given: bool
) -> ArraySource:
    if path.suffix.lower() == ".npy":
        arrays, keys, labels, label_key = _open_npy(path, input_names)
    else:
        arrays, keys, labels, label_key = _open_npz(path, input_names)
    counts = {keys[name]: len(arr) for name, arr in arrays.items()}
    if len(set(counts.values())) > 1:
        raise OnnxcompError(
            f"{path}: arrays have different sample counts {counts}; "
            "the first axis of every array must be the same number of samples"
        )
    total = next(iter(counts.values()))
    if total == 0:
        raise OnnxcompError(f"{path}: the arrays hold no samples (first axis has length 0)")
    if labels is not None and label_key is not None:
        labels = _prepare_labels(path, label_key, labels, total)
    indices = None if limit is None or limit >= total else _random_pick(total, limit, seed)
    notes = []
    if indices is not None:
        notes.append(f"limit {limit}, random subset")
    if preprocess_given:
        notes.append("arrays are used as stored (preprocessing applies to images only)")
    return ArraySource(path, arrays, keys, labels, label_key, indices, "; ".join(notes))


# --------------------------------------------------------------------------- entry point


def open_data_source(
    path: str | Path,
    input_names: Sequence[str],
    preprocess: Preprocess | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> DataSource:
    """Open `path` (image folder, ImageFolder tree, image file, .npy or .npz) as a DataSource.

    Nothing is decoded here beyond listing files and reading array headers; `batches()` streams.
    `limit` picks that many samples with `seed`: balanced over classes when the folder has class
    subfolders, else a random subset. Raises OnnxcompError with a one-line reason.
    """
    path = Path(path)
    input_names = list(input_names)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise OnnxcompError(f"limit must be a positive number of samples, got {limit!r}")
    if not path.exists():
        raise OnnxcompError(
            f"{path}: no such file or directory; give an image folder, a .npy or a .npz file"
        )
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".npy", ".npz"):
        return _open_arrays(path, input_names, limit, seed, preprocess is not None)
    if path.is_file() and suffix not in IMAGE_EXTENSIONS:
        raise OnnxcompError(
            f"{path}: unsupported data file type '{suffix or path.name}'; give an image folder, "
            f"an image ({', '.join(IMAGE_EXTENSIONS)}), a .npy or a .npz file"
        )
    input_name = _single_input(path, input_names)
    preprocess = preprocess if preprocess is not None else Preprocess()
    if path.is_file():
        return ImageSource(path, [path], input_name, preprocess)
    return _open_image_folder(path, input_name, preprocess, limit, seed)


def _single_input(path: Path, input_names: Sequence[str]) -> str:
    if len(input_names) != 1:
        raise OnnxcompError(
            f"{path}: images can feed exactly one model input, but the model has "
            f"{len(input_names)} ({', '.join(input_names) or 'none'}); "
            "use a .npz file with one array per input name"
        )
    return input_names[0]


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OnnxcompError(f"batch size must be a positive integer, got {batch_size!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
