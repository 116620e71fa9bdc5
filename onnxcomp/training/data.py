"""Labelled training data held in memory, served in shuffled, optionally augmented batches.

`load_training_data` reads an onnxcomp.data source (an ImageFolder tree with one subfolder per
class, a flat image folder, a .npy or a .npz file with an optional `labels` array) once into
memory; `TrainingData.batches` then yields, per epoch, batches of float32 model inputs with their
labels and the sample indices (so a teacher cache can key on them).

Memory: images are stored as uint8 pixels after resize/crop and before scaling and
normalisation, so 50,000 CIFAR images (32x32x3) take 147 MiB; float arrays from .npy/.npz are
stored as float16 (`float16=True`, the default: 50,000 x 3x32x32 take 293 MiB, twice that as
float32), integer arrays as they are. Batches are converted to float32 one at a time.

Augmentation (`augment=True`) is the CIFAR recipe: a random crop of the original size after
zero padding of 4 pixels on each side, and a horizontal flip with probability 1/2, applied to
every 4-D input (the spatial axes follow the preprocessing layout for images; arrays are taken
as NCHW unless `layout="NHWC"`). Images are padded with black pixels before normalisation (as
torchvision's ``RandomCrop(32, padding=4)`` on the PIL image); arrays, already normalised, with
zeros. The shuffle order and every crop/flip are drawn from ``(seed, epoch)`` per sample index,
so an epoch is the same whichever process or shard serves it (DDP runs match 1-process runs).

This module needs numpy only, not torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from onnxcomp.data import ArraySource, ImageSource, Preprocess, open_data_source
from onnxcomp.data.preprocess import center_crop, resize_shorter_side
from onnxcomp.errors import OnnxcompError

PAD = 4
KD_ONLY_NOTE = "no labels: knowledge distillation only (a teacher is needed; accuracy not reported)"


@dataclass
class TrainBatch:
    """One training batch: input name -> float32 array, int64 labels or None, sample indices."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class TrainingData:
    """Samples in memory (see the module docstring for the storage and the memory it takes).

    `arrays` maps each model input name to its stored array (first axis = samples); `pixel`
    names the inputs stored as uint8 image pixels (H, W, C) that `preprocess` turns into model
    inputs; the other arrays are used as stored (converted to float32).
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    class_names: list[str] | None = None
    preprocess: Preprocess | None = None
    pixel: frozenset[str] = frozenset()
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        counts = {len(a) for a in self.arrays.values()}
        if len(counts) != 1 or not self.arrays:
            raise OnnxcompError(f"{self.source}: inputs must all hold the same number of samples")
        if self.labels is not None and len(self.labels) != self.num_samples:
            raise OnnxcompError(
                f"{self.source}: {len(self.labels)} labels for {self.num_samples} samples"
            )
        if self.labels is None and KD_ONLY_NOTE not in self.notes:
            self.notes.append(KD_ONLY_NOTE)

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored arrays and labels."""
        labels = 0 if self.labels is None else self.labels.nbytes
        return sum(a.nbytes for a in self.arrays.values()) + labels

    def describe(self) -> str:
        """One line: where from, how many samples, classes or no labels, memory, notes."""
        kind = (
            f"{len(self.class_names)} classes"
            if self.class_names
            else ("labelled" if self.has_labels else "no labels")
        )
        text = f"{self.source}: {self.num_samples} samples ({kind}), {self.nbytes / 2**20:.0f} MiB"
        return "; ".join([text, *self.notes])

    def batches(
        self,
        batch_size: int,
        epoch: int = 0,
        seed: int = 0,
        *,
        shuffle: bool = True,
        augment: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[TrainBatch]:
        """Yield this process's batches of `batch_size` samples for `epoch`.

        With `world_size` > 1 the epoch order (shuffled from `(seed, epoch)`) is padded by
        repeating its start to a multiple of `world_size` and dealt round-robin, like torch's
        DistributedSampler: rank r serves order[r::world_size], so the union of the ranks' k-th
        batches is the k-th batch of `batch_size * world_size` of a 1-process run.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OnnxcompError(f"batch size must be a positive integer, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise OnnxcompError(f"rank {rank} outside world size {world_size}")
        rng = np.random.default_rng([seed, epoch])
        count = self.num_samples
        order = rng.permutation(count) if shuffle else np.arange(count)
        crops = rng.integers(0, 2 * PAD + 1, size=(count, 2))
        flips = rng.random(count) < 0.5
        padded = -(-count // world_size) * world_size
        order = np.concatenate([order, order[: padded - count]])
        mine = order[rank::world_size]
        for start in range(0, len(mine), batch_size):
            rows = mine[start : start + batch_size]
            inputs = {}
            for name, stored in self.arrays.items():
                chunk = stored[rows]
                if augment and chunk.ndim == 4:
                    chunk = augment_batch(chunk, crops[rows], flips[rows], self._hw_axes(name))
                inputs[name] = self._to_input(name, chunk)
            labels = None if self.labels is None else self.labels[rows]
            yield TrainBatch(inputs, labels, rows)

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Batches each process serves per epoch."""
        per_rank = -(-self.num_samples // world_size)
        return -(-per_rank // batch_size)

    def _hw_axes(self, name: str) -> tuple[int, int]:
        if name in self.pixel or self.layout == "NHWC":
            return (1, 2)
        return (2, 3)

    def _to_input(self, name: str, chunk: np.ndarray) -> np.ndarray:
        if name not in self.pixel:
            return np.ascontiguousarray(chunk, dtype=np.float32)
        pre = self.preprocess if self.preprocess is not None else Preprocess()
        arr = chunk.astype(np.float32) * np.float32(pre.scale)
        if pre.channel_order == "BGR" and arr.shape[3] == 3:
            arr = arr[..., ::-1]
        arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        if pre.layout == "NCHW":
            arr = arr.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(arr, dtype=np.float32)


def augment_batch(
    batch: np.ndarray, crops: np.ndarray, flips: np.ndarray, hw_axes: tuple[int, int]
) -> np.ndarray:
    """Zero-pad the spatial axes by PAD, crop back at offsets `crops` (row, col), flip where set.

    `batch` has samples on axis 0 and its height and width on `hw_axes`; the result has the
    shape and dtype of `batch`.
    """
    h_axis, w_axis = hw_axes
    height, width = batch.shape[h_axis], batch.shape[w_axis]
    pad = [(0, 0)] * batch.ndim
    pad[h_axis] = pad[w_axis] = (PAD, PAD)
    padded = np.pad(batch, pad)
    out = np.empty_like(batch)
    for i in range(len(batch)):
        top, left = int(crops[i, 0]), int(crops[i, 1])
        sample = np.take(padded[i], range(top, top + height), axis=h_axis - 1)
        sample = np.take(sample, range(left, left + width), axis=w_axis - 1)
        out[i] = np.flip(sample, axis=w_axis - 1) if flips[i] else sample
    return out


# --------------------------------------------------------------------------- loading


def load_training_data(
    path: str | Path,
    input_names: Sequence[str],
    preprocess: Preprocess | None = None,
    *,
    limit: int | None = None,
    seed: int = 0,
    float16: bool = True,
    layout: Literal["NCHW", "NHWC"] = "NCHW",
    progress: Callable[[int], None] | None = None,
) -> TrainingData:
    """Read `path` once into memory as TrainingData (OnnxcompError with one line if it cannot).

    `limit` keeps that many samples, balanced over the classes when there are labels (round
    robin over classes in a seeded order), else a seeded random subset. `progress(n)` is called
    as images are decoded. Unreadable images are skipped and counted in the notes.
    """
    source = open_data_source(path, input_names, preprocess)
    if isinstance(source, ImageSource):
        return _load_images(source, limit, seed, progress)
    if isinstance(source, ArraySource):
        return _load_arrays(source, limit, seed, float16, layout)
    raise OnnxcompError(f"{path}: unsupported training data source {type(source).__name__}")


def pick_subset(labels: np.ndarray | None, count: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the kept samples: balanced over classes with labels, else random."""
    if limit is None or limit >= count:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(count, size=limit, replace=False))
    classes = np.unique(labels)
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in rng.permutation(classes)]
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for queue in queues:
            if depth < len(queue) and len(picked) < limit:
                picked.append(int(queue[depth]))
        depth += 1
    return np.sort(np.asarray(picked, dtype=np.int64))


def _load_images(
    source: ImageSource, limit: int | None, seed: int, progress: Callable[[int], None] | None
) -> TrainingData:
    labels = None if source.labels is None else np.asarray(source.labels, np.int64)
    keep = pick_subset(labels, len(source.files), limit, seed)
    pre = source.preprocess
    pixels: list[np.ndarray] = []
    kept: list[int] = []
    skipped = 0
    for index in keep:
        array = _decode_pixels(source.files[index], pre)
        if progress is not None:
            progress(1)
        if array is None:
            skipped += 1
            continue
        if pixels and array.shape != pixels[0].shape:
            raise OnnxcompError(
                f"{source.files[index]}: image size {array.shape[:2]} differs from "
                f"{pixels[0].shape[:2]} of {source.files[kept[0]]}; pass --resize/--crop"
            )
        pixels.append(array)
        kept.append(int(index))
    if not pixels:
        raise OnnxcompError(f"{source.path}: no readable images ({skipped} skipped)")
    notes = [f"limit {limit}, balanced over classes"] if limit is not None else []
    if skipped:
        notes.append(f"{skipped} unreadable images skipped")
    return TrainingData(
        arrays={source.input_name: np.stack(pixels)},
        labels=None if labels is None else labels[kept],
        source=str(source.path),
        class_names=source.class_names,
        preprocess=pre,
        pixel=frozenset({source.input_name}),
        notes=notes,
    )


def _decode_pixels(file: Path, pre: Preprocess) -> np.ndarray | None:
    """uint8 (H, W, C) pixels after resize and center crop; None if the file cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(file) as opened:
                opened.load()
                image = opened.convert("L" if pre.grayscale else "RGB")
    except Exception:  # any decoder failure means "unreadable": skip it, never crash
        return None
    if pre.resize is not None:
        image = resize_shorter_side(image, pre.resize)
    if pre.crop_size is not None:
        image = center_crop(image, pre.crop_size)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _load_arrays(
    source: ArraySource, limit: int | None, seed: int, float16: bool, layout: str
) -> TrainingData:
    labels = source.labels
    keep = pick_subset(labels, source.num_samples, limit, seed)
    arrays = {}
    for name, stored in source.arrays.items():
        chunk = np.asarray(stored[keep])
        if chunk.dtype.kind == "f":
            chunk = chunk.astype(np.float16 if float16 else np.float32)
        arrays[name] = chunk
    notes = []
    if limit is not None:
        notes.append(
            f"limit {limit}, " + ("balanced over classes" if labels is not None else "random")
        )
    if float16 and any(a.dtype == np.float16 for a in arrays.values()):
        notes.append("float arrays stored as float16")
    return TrainingData(
        arrays=arrays,
        labels=None if labels is None else np.asarray(labels[keep], np.int64),
        source=str(source.path),
        layout="NHWC" if layout == "NHWC" else "NCHW",
        notes=notes,
    )
