"""Batching at the batch size the model accepts, and one-line errors for data whose sample
shape does not fit a fixed input size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from int8_models import small_cnn
from PIL import Image

from onnxcomp.core.inputs import input_specs
from onnxcomp.data import Preprocess
from onnxcomp.data.batches import DataOptions, batch_note, sample_batches
from onnxcomp.errors import OnnxcompError

SAMPLES = np.random.default_rng(5).normal(size=(10, 3, 8, 8)).astype(np.float32)
LABELS = np.arange(10) % 3


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, input=SAMPLES, labels=LABELS)
    return path


@pytest.mark.parametrize(("batch", "sizes"), [(1, [1] * 10), (4, [4, 4, 2]), ("N", [8, 2])])
def test_data_batches_follow_the_model(npz, batch, sizes):
    specs = input_specs(small_cnn(batch=batch))
    batches, _, count = sample_batches(specs, DataOptions(data=npz, batch_size=8))
    got = list(batches)
    assert [f["input"].shape[0] for f, _ in got] == sizes
    assert count == 10
    np.testing.assert_array_equal(np.concatenate([f["input"] for f, _ in got]), SAMPLES)
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in got]), LABELS)


@pytest.mark.parametrize(("batch", "sizes"), [(1, [1] * 10), (4, [4, 4, 2]), ("N", [8, 2])])
def test_random_batches_give_exactly_the_samples_asked(batch, sizes):
    specs = input_specs(small_cnn(batch=batch))
    batches, source, count = sample_batches(specs, DataOptions(samples=10, batch_size=8))
    assert [f["input"].shape for f, _ in batches] == [(n, 3, 8, 8) for n in sizes]
    assert (source, count) == ("random inputs", 10)


def test_batch_note():
    assert batch_note(None) is None
    assert batch_note(1) == (
        "batch fixed to 1 by the model: calibration and verification run 1 sample at a time"
    )
    assert "run 4 samples at a time" in batch_note(4)
    assert "padded" in batch_note(4)


def _images(folder: Path, size: int, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (size, size), (10 * i, 20, 30)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("batch", [1, 4, "N"])
def test_images_of_another_size_name_resize_and_crop_at_the_first_batch(tmp_path, batch):
    folder = _images(tmp_path / "imgs", size=12)
    specs = input_specs(small_cnn(batch=batch))
    batches, _, _ = sample_batches(specs, DataOptions(data=folder))
    with pytest.raises(OnnxcompError) as info:
        next(batches)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(str(folder)) and "(3, 12, 12)" in text and "[" in text
    assert "--resize/--crop" in text
    # The fix it names works: resized and cropped to 8x8 the images fit.
    fixed = DataOptions(data=folder, preprocess=Preprocess(resize=8, center_crop=8))
    assert sum(f["input"].shape[0] for f, _ in sample_batches(specs, fixed)[0]) == 3


def test_arrays_of_another_size_say_they_are_used_as_stored(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, input=np.zeros((5, 3, 9, 9), np.float32))
    batches, _, _ = sample_batches(input_specs(small_cnn(batch=1)), DataOptions(data=path))
    with pytest.raises(OnnxcompError, match=r"bad\.npz: samples of shape \(3, 9, 9\) .*as stored"):
        next(batches)
