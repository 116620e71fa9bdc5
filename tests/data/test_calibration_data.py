"""Tests for onnxcomp.data: preprocessing and streaming data readers."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxcomp.data import (
    PRESETS,
    Preprocess,
    load_preprocess_config,
    open_data_source,
)
from onnxcomp.data import readers as readers_module
from onnxcomp.errors import OnnxcompError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)
RAW = Preprocess(scale=1.0)  # pixel values unchanged, NCHW


# --------------------------------------------------------------------------- helpers


def _save_png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def _random_rgb(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _write_corrupt_files(folder: Path) -> list[Path]:
    """A truncated JPEG and a text file named .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_tmp_full.jpg"
    Image.fromarray(_random_rgb(0, 64, 64)).save(good, quality=90)
    data = good.read_bytes()
    good.unlink()
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text = folder / "notes.jpg"
    text.write_text("this is not an image\n")
    return [truncated, text]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageFolder tree: classes a (6), b (4), c (2); pixel R = 50*class, G = 10*index."""
    root = tmp_path / "imgs"
    for label, (name, count) in enumerate([("a", 6), ("b", 4), ("c", 2)]):
        for index in range(count):
            _save_png(root / name / f"{index:02d}.png", (50 * label, 10 * index, 7))
    (root / "README.txt").write_text("not an image, ignored")
    return root


def _all_batches(source, batch_size: int) -> list:
    return list(source.batches(batch_size))


def _concat(batches: list, name: str = "x") -> np.ndarray:
    return np.concatenate([b.inputs[name] for b in batches])


def _concat_labels(batches: list) -> np.ndarray:
    return np.concatenate([b.labels for b in batches])


# --------------------------------------------------------------------------- preprocess


def test_known_pixel_normalisation_imagenet_stats() -> None:
    image = Image.new("RGB", (6, 4), (10, 128, 250))
    pre = Preprocess(mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD))
    out = pre.apply(image)
    assert out.dtype == np.float32
    assert out.shape == (3, 4, 6)
    expected = [
        (10 / 255 - 0.485) / 0.229,
        (128 / 255 - 0.456) / 0.224,
        (250 / 255 - 0.406) / 0.225,
    ]
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(out[channel], value, rtol=1e-6)


def test_bgr_nhwc_matches_numpy_reference() -> None:
    rgb = _random_rgb(1, 5, 7)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    pre = Preprocess(scale=1 / 255, mean=mean, std=std, channel_order="BGR", layout="NHWC")
    out = pre.apply(Image.fromarray(rgb))
    bgr = rgb[:, :, [2, 1, 0]].astype(np.float64) / 255
    expected = (bgr - np.array(mean)) / np.array(std)
    assert out.shape == (5, 7, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # NCHW of the same settings is the transpose.
    nchw = Preprocess(mean=mean, std=std, channel_order="BGR").apply(Image.fromarray(rgb))
    np.testing.assert_allclose(nchw, expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-6)


def test_resize_shorter_side_then_center_crop_dimensions() -> None:
    image = Image.fromarray(_random_rgb(2, 200, 300))  # height 200, width 300
    resized = Preprocess(resize=256).apply(image)
    assert resized.shape == (3, 256, 384)  # 300 * 256 / 200
    portrait = Preprocess(resize=64).apply(Image.fromarray(_random_rgb(3, 150, 100)))
    assert portrait.shape == (3, 96, 64)
    assert PRESETS["imagenet"].apply(image).shape == (3, 224, 224)
    assert Preprocess(center_crop=(20, 10), layout="NHWC").apply(image).shape == (20, 10, 3)


def test_center_crop_takes_the_middle() -> None:
    rgb = _random_rgb(4, 8, 10)  # H=8, W=10
    out = Preprocess(center_crop=4, scale=1.0, layout="NHWC").apply(Image.fromarray(rgb))
    np.testing.assert_array_equal(out, rgb[2:6, 3:7].astype(np.float32))


def test_resize_matches_torch_antialiased_bilinear() -> None:
    torch = pytest.importorskip("torch")
    yy, xx = np.mgrid[0:90, 0:120]
    waves = [np.sin(xx / 3.0), np.cos(yy / 4.0), np.sin((xx + yy) / 5.0)]
    textured = (127 + 120 * np.stack(waves, axis=-1)).astype(np.uint8)
    out = Preprocess(resize=45, scale=1.0).apply(Image.fromarray(textured))
    assert out.shape == (3, 45, 60)
    tensor = torch.from_numpy(textured.transpose(2, 0, 1)[None].astype(np.float32))
    ref = torch.nn.functional.interpolate(
        tensor, size=(45, 60), mode="bilinear", antialias=True, align_corners=False
    )[0].numpy()
    # PIL rounds to uint8; nearest/bicubic differ from this reference by 2..30 per pixel.
    np.testing.assert_allclose(out, ref, atol=1.0)


def test_grayscale_and_rgba_conversion() -> None:
    gray_pre = Preprocess(grayscale=True, mean=(0.5,), std=(0.25,))
    out = gray_pre.apply(Image.new("RGB", (3, 2), (100, 100, 100)))
    assert out.shape == (1, 2, 3)
    np.testing.assert_allclose(out, (100 / 255 - 0.5) / 0.25, rtol=1e-6)
    # An L image fed to a 3-channel preprocess becomes RGB (3 equal channels).
    rgb_out = Preprocess(scale=1.0).apply(Image.new("L", (3, 2), 77))
    assert rgb_out.shape == (3, 2, 3)
    np.testing.assert_array_equal(rgb_out, np.full((3, 2, 3), 77.0, np.float32))
    # RGBA: alpha dropped, colour kept.
    rgba_out = Preprocess(scale=1.0).apply(Image.new("RGBA", (2, 2), (10, 20, 30, 0)))
    np.testing.assert_array_equal(rgba_out[:, 0, 0], [10, 20, 30])


def test_presets() -> None:
    imagenet, cifar = PRESETS["imagenet"], PRESETS["cifar10"]
    assert (imagenet.resize, imagenet.center_crop) == (256, 224)
    assert (cifar.resize, cifar.center_crop) == (None, None)
    for preset in (imagenet, cifar):
        np.testing.assert_allclose(preset.mean, IMAGENET_MEAN)
        np.testing.assert_allclose(preset.std, IMAGENET_STD)
        assert (preset.scale, preset.channel_order, preset.layout) == (1 / 255, "RGB", "NCHW")
    assert cifar.apply(Image.new("RGB", (32, 32))).shape == (3, 32, 32)


def test_with_overrides() -> None:
    pre = PRESETS["imagenet"].with_overrides(resize=None, center_crop=[32, 16], layout="nhwc")
    assert (pre.resize, pre.center_crop, pre.layout) == (256, (32, 16), "NHWC")
    assert PRESETS["imagenet"].layout == "NCHW"  # frozen original untouched
    with pytest.raises(OnnxcompError, match=r"'resize'.*positive integer"):
        PRESETS["imagenet"].with_overrides(resize=-3)
    with pytest.raises(OnnxcompError, match=r"unknown preprocessing option.*colour"):
        PRESETS["imagenet"].with_overrides(colour="red")
    with pytest.raises(OnnxcompError, match=r"'mean'.*3 values.*1 channel"):
        PRESETS["imagenet"].with_overrides(grayscale=True)


def test_load_preprocess_config_json_and_toml(tmp_path: Path) -> None:
    json_file = tmp_path / "pre.json"
    json_file.write_text(json.dumps({"preset": "imagenet", "center_crop": 200, "layout": "NHWC"}))
    pre = load_preprocess_config(json_file)
    assert (pre.resize, pre.center_crop, pre.layout) == (256, 200, "NHWC")
    np.testing.assert_allclose(pre.mean, IMAGENET_MEAN)

    toml_file = tmp_path / "pre.toml"
    toml_file.write_text('channel_order = "BGR"\nmean = [1.0, 2.0, 3.0]\nscale = 1.0\n')
    pre = load_preprocess_config(toml_file)
    assert pre == Preprocess(channel_order="BGR", mean=(1.0, 2.0, 3.0), scale=1.0)


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("a.json", '{"resize": 256, "colour": "red"}', r"a\.json: unknown key 'colour'"),
        ("b.json", '{"resize": "big"}', r"b\.json: key 'resize': must be a positive integer"),
        ("c.toml", 'layout = "CHW"', r"c\.toml: key 'layout': must be one of NCHW, NHWC"),
        ("d.json", '{"preset": "coco"}', r"d\.json: key 'preset': unknown preset 'coco'"),
        ("e.json", '{"std": [1, 0, 1]}', r"e\.json: key 'std': must not contain 0"),
        ("f.json", "{not json", r"f\.json: cannot parse"),
        ("g.yaml", "resize: 3", r"g\.yaml: unsupported preprocessing config type"),
        ("h.json", "[1, 2]", r"h\.json: preprocessing config must be a table"),
    ],
)
def test_load_preprocess_config_errors(tmp_path: Path, name: str, text: str, pattern: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(OnnxcompError, match=pattern) as info:
        load_preprocess_config(path)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- image folders


def test_image_folder_labels_from_class_folders(image_folder: Path) -> None:
    source = open_data_source(image_folder, ["x"], RAW)
    assert source.class_names == ["a", "b", "c"]
    assert source.has_labels and source.num_samples == 12
    batches = _all_batches(source, 5)
    data, labels = _concat(batches), _concat_labels(batches)
    assert labels.dtype == np.int64 and labels.shape == (12,)
    np.testing.assert_array_equal(labels, [0] * 6 + [1] * 4 + [2] * 2)
    # Red channel encodes the class folder the image came from.
    np.testing.assert_array_equal(data[:, 0, 0, 0], 50.0 * labels)
    assert "3 classes" in source.describe()


def test_streaming_batch_sizes_and_lazy_decoding(
    image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(readers_module.Image, "open", counting_open)
    source = open_data_source(image_folder, ["x"], RAW)
    assert opened == []  # opening decodes nothing
    iterator = source.batches(5)
    first = next(iterator)
    assert len(first) == 5 and first.inputs["x"].shape == (5, 3, 8, 8)
    assert len(opened) == 5  # only the first batch decoded
    sizes = [len(first)] + [len(b) for b in iterator]
    assert sizes == [5, 5, 2]
    assert [len(b) for b in source.batches(12)] == [12]
    assert [len(b) for b in source.batches(100)] == [12]


def test_balanced_limit_per_class(image_folder: Path) -> None:
    source = open_data_source(image_folder, ["x"], RAW, limit=6, seed=3)
    assert source.num_samples == 6
    labels = _concat_labels(_all_batches(source, 4))
    assert Counter(labels.tolist()) == {0: 2, 1: 2, 2: 2}

    source = open_data_source(image_folder, ["x"], RAW, limit=9, seed=3)
    batches = _all_batches(source, 4)
    counts = Counter(_concat_labels(batches).tolist())
    assert sum(counts.values()) == 9 and counts[2] == 2  # class c only has 2 images
    assert abs(counts[0] - counts[1]) <= 1
    # No image picked twice: (class, index) pairs encoded in R and G are unique.
    data = _concat(batches)
    pairs = {(int(r), int(g)) for r, g in data[:, :2, 0, 0]}
    assert len(pairs) == 9


def test_limit_is_deterministic_with_seed(image_folder: Path) -> None:
    def picked(seed: int) -> list[tuple[int, int]]:
        source = open_data_source(image_folder, ["x"], RAW, limit=5, seed=seed)
        data = _concat(_all_batches(source, 5))
        return [(int(r), int(g)) for r, g in data[:, :2, 0, 0]]

    assert picked(0) == picked(0)
    assert len({tuple(picked(seed)) for seed in range(6)}) > 1


def test_flat_folder_no_labels_and_random_subset(tmp_path: Path) -> None:
    for index in range(10):
        _save_png(tmp_path / "flat" / f"img{index}.png", (index, 0, 0), size=(4, 4))
    source = open_data_source(tmp_path / "flat", ["x"], RAW)
    assert not source.has_labels and source.class_names is None
    batches = _all_batches(source, 4)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(b.labels is None for b in batches)
    np.testing.assert_array_equal(_concat(batches)[:, 0, 0, 0], np.arange(10))

    def subset(seed: int) -> list[int]:
        src = open_data_source(tmp_path / "flat", ["x"], RAW, limit=4, seed=seed)
        return _concat(_all_batches(src, 3))[:, 0, 0, 0].astype(int).tolist()

    assert subset(1) == subset(1)
    assert len(set(subset(1))) == 4
    assert len({tuple(subset(seed)) for seed in range(6)}) > 1


def test_corrupt_files_are_skipped_and_counted(image_folder: Path) -> None:
    bad = _write_corrupt_files(image_folder / "b")
    source = open_data_source(image_folder, ["x"], RAW)
    assert source.num_samples == 14
    batches = _all_batches(source, 4)
    assert sum(len(b) for b in batches) == 12
    assert source.skipped == 2
    assert sorted(source.skipped_files) == sorted(str(p) for p in bad)
    assert "2 unreadable skipped" in source.describe()
    # Labels stay aligned with the images around the skipped files.
    np.testing.assert_array_equal(_concat(batches)[:, 0, 0, 0], 50.0 * _concat_labels(batches))
    # A second pass counts afresh.
    _all_batches(source, 4)
    assert source.skipped == 2


def test_all_images_unreadable(tmp_path: Path) -> None:
    _write_corrupt_files(tmp_path / "bad")
    source = open_data_source(tmp_path / "bad", ["x"])
    with pytest.raises(OnnxcompError, match=r"no readable images in .*bad \(2 skipped; first: "):
        _all_batches(source, 4)


def test_mixed_sizes_need_resize(tmp_path: Path) -> None:
    _save_png(tmp_path / "mixed" / "a.png", (1, 2, 3), size=(8, 8))
    _save_png(tmp_path / "mixed" / "b.png", (1, 2, 3), size=(10, 6))
    source = open_data_source(tmp_path / "mixed", ["x"])
    with pytest.raises(OnnxcompError, match=r"b\.png.*--resize/--crop.*preset"):
        _all_batches(source, 2)
    # One image per batch is fine; resize + crop fixes it for any batch size.
    assert [b.inputs["x"].shape for b in source.batches(1)] == [(1, 3, 8, 8), (1, 3, 6, 10)]
    fixed = open_data_source(tmp_path / "mixed", ["x"], Preprocess(resize=6, center_crop=6))
    assert [b.inputs["x"].shape for b in fixed.batches(2)] == [(2, 3, 6, 6)]


def test_grayscale_file_in_rgb_folder(tmp_path: Path) -> None:
    folder = tmp_path / "gray"
    folder.mkdir()
    Image.new("L", (5, 5), 200).save(folder / "g.png")
    Image.new("RGBA", (5, 5), (1, 2, 3, 4)).save(folder / "h.png")
    batch = next(open_data_source(folder, ["x"], RAW).batches(8))
    assert batch.inputs["x"].shape == (2, 3, 5, 5)
    np.testing.assert_array_equal(batch.inputs["x"][0, :, 0, 0], [200, 200, 200])
    np.testing.assert_array_equal(batch.inputs["x"][1, :, 0, 0], [1, 2, 3])


def test_single_image_file(tmp_path: Path) -> None:
    path = _save_png(tmp_path / "one.png", (9, 8, 7))
    batches = _all_batches(open_data_source(path, ["x"], RAW), 4)
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0].inputs["x"][0, :, 0, 0], [9, 8, 7])


# --------------------------------------------------------------------------- arrays


def test_npy_reader_streams_memmap(tmp_path: Path) -> None:
    data = np.random.default_rng(5).standard_normal((10, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    source = open_data_source(tmp_path / "x.npy", ["input"])
    assert isinstance(source.arrays["input"], np.memmap)
    assert source.num_samples == 10 and not source.has_labels
    batches = _all_batches(source, 4)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(type(b.inputs["input"]) is np.ndarray for b in batches)
    np.testing.assert_array_equal(_concat(batches, "input"), data)

    limited = open_data_source(tmp_path / "x.npy", ["input"], limit=3, seed=7)
    got = _concat(_all_batches(limited, 2), "input")
    assert got.shape == (3, 3, 4, 4)
    rows = [int(np.flatnonzero((data == row).all(axis=(1, 2, 3)))[0]) for row in got]
    assert len(set(rows)) == 3 and rows == sorted(rows)
    again = _concat(
        _all_batches(open_data_source(tmp_path / "x.npy", ["input"], limit=3, seed=7), 3), "input"
    )
    np.testing.assert_array_equal(got, again)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_multi_input_with_labels(tmp_path: Path, compressed: bool) -> None:
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 100, size=(7, 5), dtype=np.int64)
    mask = rng.standard_normal((7, 5)).astype(np.float32)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.int32)
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "d.npz", ids=ids, mask=mask, labels=labels)
    source = open_data_source(tmp_path / "d.npz", ["mask", "ids"])
    # Uncompressed members are memory-mapped, compressed ones read whole.
    assert isinstance(source.arrays["ids"], np.memmap) is not compressed
    assert source.has_labels and source.num_samples == 7
    batches = _all_batches(source, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(_concat(batches, "ids"), ids)
    np.testing.assert_array_equal(_concat(batches, "mask"), mask)
    assert batches[0].inputs["ids"].dtype == np.int64
    got_labels = _concat_labels(batches)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_labels, labels)


def test_npz_single_array_any_key_and_y_labels(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    np.savez(tmp_path / "d.npz", features=x, y=np.array([0.0, 1, 0, 1, 1, 0]))
    source = open_data_source(tmp_path / "d.npz", ["input.1"], limit=4, seed=0)
    batches = _all_batches(source, 10)
    got = batches[0].inputs["input.1"]
    rows = (got[:, 0] // 4).astype(int)
    np.testing.assert_array_equal(got, x[rows])
    np.testing.assert_array_equal(batches[0].labels, np.array([0, 1, 0, 1, 1, 0])[rows])
    assert "labels from 'y'" in source.describe()


# --------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path: Path) -> None:
    with pytest.raises(OnnxcompError, match=r"nope: no such file or directory.*\.npz"):
        open_data_source(tmp_path / "nope", ["x"])


def test_error_empty_folder_lists_extensions(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(OnnxcompError, match=r"empty: no images found.*\.jpg.*\.png"):
        open_data_source(tmp_path / "empty", ["x"])


def test_error_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(OnnxcompError, match=r"data\.csv: unsupported data file type '\.csv'"):
        open_data_source(path, ["x"])


def test_error_images_need_one_input(image_folder: Path) -> None:
    with pytest.raises(OnnxcompError, match=r"exactly one model input.*has 2 \(a, b\).*\.npz"):
        open_data_source(image_folder, ["a", "b"])


def test_error_npz_keys_do_not_match(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", foo=np.zeros((2, 3)), bar=np.zeros((2, 3)))
    with pytest.raises(OnnxcompError, match=r"found keys \[foo, bar\], expected \[input\]"):
        open_data_source(tmp_path / "d.npz", ["input"])


def test_error_npz_sample_counts_differ(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.zeros((2, 3)), b=np.zeros((3, 3)))
    with pytest.raises(OnnxcompError, match=r"different sample counts"):
        open_data_source(tmp_path / "d.npz", ["a", "b"])


def test_error_npy_for_two_inputs_and_bad_labels(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    with pytest.raises(OnnxcompError, match=r"x\.npy: a \.npy file feeds one model input"):
        open_data_source(tmp_path / "x.npy", ["a", "b"])
    np.savez(tmp_path / "l.npz", x=np.zeros((4, 2)), labels=np.zeros(3))
    with pytest.raises(OnnxcompError, match=r"labels 'labels' have shape \(3,\), expected \(4,\)"):
        open_data_source(tmp_path / "l.npz", ["x"])


def test_error_bad_limit_and_batch_size(image_folder: Path) -> None:
    with pytest.raises(OnnxcompError, match="limit must be a positive"):
        open_data_source(image_folder, ["x"], limit=0)
    source = open_data_source(image_folder, ["x"])
    with pytest.raises(OnnxcompError, match="batch size must be a positive"):
        next(source.batches(0))


# --------------------------------------------------------------------------- real data


def test_real_cifar10_jpegs(tmp_path: Path) -> None:
    archive = SHARED_DATA / "cifar10" / "test_jpg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"shared data not available: {archive} is absent")
    wanted = {"airplane": 10, "automobile": 10}
    taken: Counter[str] = Counter()
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            if taken == Counter(wanted):
                break  # stop streaming as soon as enough files are out
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[1] not in wanted:
                continue
            if taken[parts[1]] >= wanted[parts[1]]:
                continue
            target = tmp_path / "cifar" / parts[1] / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            extracted = tar.extractfile(member)
            assert extracted is not None
            target.write_bytes(extracted.read())
            taken[parts[1]] += 1
    assert taken == Counter(wanted)

    source = open_data_source(tmp_path / "cifar", ["input"], PRESETS["cifar10"], limit=8, seed=1)
    assert source.class_names == ["airplane", "automobile"]
    batches = _all_batches(source, 3)
    assert [len(b) for b in batches] == [3, 3, 2]
    assert Counter(_concat_labels(batches).tolist()) == {0: 4, 1: 4}
    data = _concat(batches, "input")
    assert data.shape == (8, 3, 32, 32) and data.dtype == np.float32
    low = (0 - IMAGENET_MEAN) / IMAGENET_STD
    high = (1 - IMAGENET_MEAN) / IMAGENET_STD
    assert (data.min(axis=(0, 2, 3)) >= low - 1e-5).all()
    assert (data.max(axis=(0, 2, 3)) <= high + 1e-5).all()
    # Independent reference for the first full-folder image.
    first = sorted((tmp_path / "cifar" / "airplane").iterdir())[0]
    full = next(open_data_source(tmp_path / "cifar", ["input"], PRESETS["cifar10"]).batches(1))
    pixels = np.asarray(Image.open(first).convert("RGB"), dtype=np.float64) / 255
    expected = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(full.inputs["input"][0], expected, rtol=1e-5, atol=1e-5)
    assert full.labels.tolist() == [0]
