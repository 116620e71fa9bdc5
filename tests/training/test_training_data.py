"""In-memory training data: loading, subsets, batches, augmentation, DDP sharding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnxcomp.data import get_preset, open_data_source
from onnxcomp.errors import OnnxcompError
from onnxcomp.training.data import PAD, TrainingData, augment_batch, load_training_data, pick_subset


def image_folder(root, classes=3, per_class=4, size=8):
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folder_matches_streaming_reader(tmp_path):
    root = image_folder(tmp_path / "train")
    preset = get_preset("cifar10")
    data = load_training_data(root, ["input"], preset)
    assert data.arrays["input"].dtype == np.uint8 and data.arrays["input"].shape == (12, 8, 8, 3)
    assert data.class_names == ["class0", "class1", "class2"]
    assert data.nbytes == 12 * 8 * 8 * 3 + 12 * 8
    batches = list(data.batches(5, shuffle=False))
    assert [len(b) for b in batches] == [5, 5, 2]
    # the reference: onnxcomp.data's streaming reader with the same preprocessing
    reference = list(open_data_source(root, ["input"], preset).batches(5))
    for got, ref in zip(batches, reference, strict=True):
        assert got.inputs["input"].dtype == np.float32
        np.testing.assert_allclose(got.inputs["input"], ref.inputs["input"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_array_equal(np.concatenate([b.indices for b in batches]), np.arange(12))


def test_limit_is_balanced_over_classes(tmp_path):
    root = image_folder(tmp_path / "train", classes=3, per_class=4)
    data = load_training_data(root, ["input"], limit=6, seed=3)
    assert np.bincount(data.labels).tolist() == [2, 2, 2]
    assert "limit 6, balanced over classes" in data.describe()
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    picked = pick_subset(labels, len(labels), 12, seed=1)
    assert np.bincount(labels[picked]).tolist() == [5, 3, 4] or np.bincount(
        labels[picked]
    ).tolist() == [4, 3, 5]
    assert len(np.unique(picked)) == 12
    np.testing.assert_array_equal(pick_subset(labels, 23, 12, seed=1), picked)  # seeded


def test_npz_stored_float16_and_unlabelled_says_kd_only(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=x, labels=np.arange(10) % 2)
    data = load_training_data(tmp_path / "d.npz", ["input"])
    assert data.arrays["input"].dtype == np.float16 and data.has_labels
    batch = next(data.batches(10, shuffle=False))
    assert batch.inputs["input"].dtype == np.float32
    np.testing.assert_allclose(batch.inputs["input"], x, atol=2e-3)
    full = load_training_data(tmp_path / "d.npz", ["input"], float16=False)
    np.testing.assert_array_equal(next(full.batches(10, shuffle=False)).inputs["input"], x)

    np.savez(tmp_path / "u.npz", input=x)
    unlabelled = load_training_data(tmp_path / "u.npz", ["input"])
    assert not unlabelled.has_labels and next(unlabelled.batches(4)).labels is None
    assert unlabelled.describe().count("knowledge distillation only") == 1


def test_augment_batch_against_numpy():
    x = np.arange(2 * 3 * 6 * 7, dtype=np.float32).reshape(2, 3, 6, 7) + 1
    # offset (PAD, PAD) is the identity crop; with a flip it is numpy's flip of the width
    same = augment_batch(x, np.full((2, 2), PAD), np.array([False, True]), (2, 3))
    np.testing.assert_array_equal(same[0], x[0])
    np.testing.assert_array_equal(same[1], x[1][:, :, ::-1])
    # offset (0, 0): the image moves down-right by PAD, zeros fill the top and left
    shifted = augment_batch(x, np.zeros((2, 2), int), np.array([False, False]), (2, 3))
    np.testing.assert_array_equal(shifted[:, :, PAD:, PAD:], x[:, :, : 6 - PAD, : 7 - PAD])
    assert not shifted[:, :, :PAD, :].any() and not shifted[:, :, :, :PAD].any()
    # NHWC pixels: the same rule on axes (1, 2)
    hwc = x.transpose(0, 2, 3, 1).astype(np.uint8)
    out = augment_batch(hwc, np.array([[PAD + 1, PAD - 2]] * 2), np.array([True, True]), (1, 2))
    padded = np.pad(hwc, [(0, 0), (PAD, PAD), (PAD, PAD), (0, 0)])
    expected = padded[:, PAD + 1 : PAD + 7, PAD - 2 : PAD + 5][:, :, ::-1]
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def _is_augmented_copy(got: np.ndarray, original: np.ndarray) -> bool:
    """Whether `got` (C,H,W) is some padded crop, flipped or not, of `original`."""
    h, w = original.shape[1:]
    padded = np.pad(original, [(0, 0), (PAD, PAD), (PAD, PAD)])
    for top in range(2 * PAD + 1):
        for left in range(2 * PAD + 1):
            crop = padded[:, top : top + h, left : left + w]
            if np.array_equal(got, crop) or np.array_equal(got, crop[:, :, ::-1]):
                return True
    return False


def test_augmented_batches_are_deterministic_and_valid():
    rng = np.random.default_rng(1)
    x = rng.integers(1, 100, size=(12, 2, 5, 5)).astype(np.float32)
    data = TrainingData({"x": x}, np.arange(12) % 3, "arrays")

    def epoch(e, seed=0):
        return list(data.batches(4, epoch=e, seed=seed, augment=True))

    first, again, other = epoch(0), epoch(0), epoch(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.inputs["x"], b.inputs["x"])
        np.testing.assert_array_equal(a.indices, b.indices)
    assert not all(
        np.array_equal(a.inputs["x"], b.inputs["x"]) for a, b in zip(first, other, strict=True)
    )
    changed = 0
    for batch in first + other:
        assert batch.inputs["x"].shape == (4, 2, 5, 5)
        np.testing.assert_array_equal(batch.labels, data.labels[batch.indices])
        for got, index in zip(batch.inputs["x"], batch.indices, strict=True):
            assert _is_augmented_copy(got, x[index])
            changed += not np.array_equal(got, x[index])
    assert changed > 12  # most samples were actually moved or flipped
    assert sorted(np.concatenate([b.indices for b in first]).tolist()) == list(range(12))


def test_image_augmentation_pads_black_before_normalising(tmp_path):
    root = image_folder(tmp_path / "train", classes=1, per_class=3, size=6)
    preset = get_preset("cifar10")
    data = load_training_data(root, ["input"], preset)
    mean = np.asarray(preset.mean, np.float32)[:, None, None]
    black = (0 - mean) / np.asarray(preset.std, np.float32)[:, None, None]
    plain = {
        int(i): v
        for b in data.batches(3, shuffle=False)
        for i, v in zip(b.indices, b.inputs["input"], strict=True)
    }
    for batch in data.batches(3, epoch=2, augment=True):
        for got, index in zip(batch.inputs["input"], batch.indices, strict=True):
            # undo normalisation relative to black: zero padding shows as exact zeros
            assert _is_augmented_copy(got - black, plain[int(index)] - black)


def test_ddp_shards_union_to_the_single_process_batches():
    data = TrainingData({"x": np.zeros((11, 1), np.float32)}, None, "s")
    single = [b.indices for b in data.batches(4, epoch=3, seed=9, world_size=1)]
    ranks = [
        [b.indices for b in data.batches(2, epoch=3, seed=9, rank=r, world_size=2)] for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == data.steps_per_epoch(2, 2) == 3
    merged = [np.sort(np.concatenate([a, b])) for a, b in zip(*ranks, strict=True)]
    # padded to 12 by repeating the first index of the order, as DistributedSampler does
    for k in range(2):
        np.testing.assert_array_equal(merged[k], np.sort(single[k]))
    np.testing.assert_array_equal(
        np.sort(np.concatenate(merged)), np.sort(np.concatenate([*single, single[0][:1]]))
    )


def test_bad_input_one_line(tmp_path):
    with pytest.raises(OnnxcompError, match="no such file"):
        load_training_data(tmp_path / "missing", ["input"])
    data = TrainingData({"x": np.zeros((3, 1), np.float32)}, None, "s")
    with pytest.raises(OnnxcompError, match="batch size"):
        next(data.batches(0))
    with pytest.raises(OnnxcompError, match="labels for 3 samples"):
        TrainingData({"x": np.zeros((3, 1), np.float32)}, np.zeros(2, np.int64), "s")
