"""Image preprocessing: PIL image -> float32 array the model expects."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from onnxcomp.errors import OnnxcompError

ChannelOrder = Literal["RGB", "BGR"]
Layout = Literal["NCHW", "NHWC"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessFieldError(OnnxcompError):
    """One preprocessing field has a bad value; `key` names it, `reason` says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid preprocessing option '{key}': {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class Preprocess:
    """How to turn an image into a model input.

    Steps, in order: convert to RGB (or L when `grayscale`), resize the shorter side to `resize`
    (bilinear, like torchvision ``Resize(int)``), center-crop to `center_crop` (an int or
    ``(height, width)``), multiply by `scale`, reorder channels to `channel_order`, then
    ``(x - mean) / std``. `mean` and `std` are given in the model's channel order (after the
    reorder), with one value per channel or a single value for all. `layout` picks (C,H,W) or
    (H,W,C).
    """

    resize: int | None = None
    center_crop: int | tuple[int, int] | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channel_order: ChannelOrder = "RGB"
    layout: Layout = "NCHW"
    grayscale: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _normalise_field(f.name, getattr(self, f.name)))
        channels = self.channels
        for key in ("mean", "std"):
            values: tuple[float, ...] = getattr(self, key)
            if len(values) in (1, channels):
                continue
            if channels == 1 and len(set(values)) == 1:
                object.__setattr__(self, key, values[:1])
                continue
            raise PreprocessFieldError(
                key,
                f"has {len(values)} values but the images have {channels} channel(s); "
                f"give {channels} value(s) or one value for all channels",
            )

    @property
    def channels(self) -> int:
        """Number of channels in the output array."""
        return 1 if self.grayscale else 3

    @property
    def crop_size(self) -> tuple[int, int] | None:
        """Center crop as (height, width), or None."""
        if self.center_crop is None:
            return None
        if isinstance(self.center_crop, int):
            return (self.center_crop, self.center_crop)
        return self.center_crop

    def with_overrides(self, **overrides: Any) -> Preprocess:
        """A copy with the given fields replaced; `None` values are ignored (flag not given)."""
        unknown = sorted(set(overrides) - FIELD_NAMES)
        if unknown:
            raise OnnxcompError(
                f"unknown preprocessing option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(FIELD_NAMES))}"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given)

    def apply(self, image: Image.Image) -> np.ndarray:
        """Preprocess one image into a float32 array, (C,H,W) or (H,W,C)."""
        mode = "L" if self.grayscale else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        if self.resize is not None:
            image = resize_shorter_side(image, self.resize)
        crop = self.crop_size
        if crop is not None:
            image = center_crop(image, crop)
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = arr * np.float32(self.scale)
        if self.channel_order == "BGR" and arr.shape[2] == 3:
            arr = arr[:, :, ::-1]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        arr = (arr - mean) / std
        if self.layout == "NCHW":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr, dtype=np.float32)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side equals `size`, keeping the aspect ratio (torchvision rule)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the (height, width) center; pads with zeros where the image is smaller."""
    crop_h, crop_w = size
    width, height = image.size
    top = _crop_offset(height, crop_h)
    left = _crop_offset(width, crop_w)
    return image.crop((left, top, left + crop_w, top + crop_h))


def _crop_offset(length: int, crop: int) -> int:
    if crop > length:
        return -((crop - length) // 2)
    return round((length - crop) / 2.0)


def _normalise_field(key: str, value: Any) -> Any:
    """Check and canonicalise one field value; raises PreprocessFieldError."""
    if key == "resize":
        return None if value is None else _positive_int(key, value)
    if key == "center_crop":
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                reason = f"must be one size or [height, width], got {value!r}"
                raise PreprocessFieldError(key, reason)
            return (_positive_int(key, value[0]), _positive_int(key, value[1]))
        return _positive_int(key, value)
    if key == "scale":
        number = _number(key, value)
        if number <= 0:
            raise PreprocessFieldError(key, f"must be a positive number, got {value!r}")
        return number
    if key in ("mean", "std"):
        items = value if isinstance(value, (list, tuple)) else (value,)
        if not items:
            raise PreprocessFieldError(key, "must not be empty")
        numbers = tuple(_number(key, v) for v in items)
        if key == "std" and any(v == 0 for v in numbers):
            raise PreprocessFieldError(key, f"must not contain 0, got {list(numbers)}")
        return numbers
    if key in ("channel_order", "layout"):
        allowed = ("RGB", "BGR") if key == "channel_order" else ("NCHW", "NHWC")
        if isinstance(value, str) and value.upper() in allowed:
            return value.upper()
        raise PreprocessFieldError(key, f"must be one of {', '.join(allowed)}, got {value!r}")
    if key == "grayscale":
        if not isinstance(value, (bool, np.bool_)):
            raise PreprocessFieldError(key, f"must be true or false, got {value!r}")
        return bool(value)
    raise PreprocessFieldError(key, "unknown option")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise PreprocessFieldError(key, f"must be a positive integer, got {value!r}")
    return int(value)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PreprocessFieldError(key, f"must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise PreprocessFieldError(key, f"must be a finite number, got {value!r}")
    return number


FIELD_NAMES = frozenset(f.name for f in fields(Preprocess))

PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(resize=256, center_crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    # The pretrained CIFAR-10 ResNets use 32x32 RGB, pixel/255, ImageNet mean/std.
    "cifar10": Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


def get_preset(name: str) -> Preprocess:
    """The named preset; OnnxcompError listing the known ones if there is none."""
    try:
        return PRESETS[name.lower()]
    except (KeyError, AttributeError):
        raise OnnxcompError(
            f"unknown preprocessing preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None


def load_preprocess_config(path: str | Path) -> Preprocess:
    """Read a JSON or TOML preprocessing file: field names plus an optional `preset` base."""
    path = Path(path)
    data = _read_config(path)
    unknown = sorted(set(data) - FIELD_NAMES - {"preset"})
    if unknown:
        raise OnnxcompError(
            f"{path}: unknown key '{unknown[0]}'; allowed keys: preset, "
            f"{', '.join(sorted(FIELD_NAMES))}"
        )
    base = Preprocess()
    if "preset" in data:
        preset = data.pop("preset")
        if not isinstance(preset, str) or preset.lower() not in PRESETS:
            raise OnnxcompError(
                f"{path}: key 'preset': unknown preset {preset!r}; "
                f"known presets: {', '.join(sorted(PRESETS))}"
            )
        base = PRESETS[preset.lower()]
    try:
        return dataclasses.replace(base, **data)
    except PreprocessFieldError as exc:
        raise OnnxcompError(f"{path}: key '{exc.key}': {exc.reason}") from None


def _read_config(path: Path) -> dict[str, Any]:
    """Parse the file into a dict; one-line OnnxcompError on any problem."""
    if not path.is_file():
        raise OnnxcompError(f"{path}: preprocessing config file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib  # lazy: only Python >= 3.11 has it (we support 3.10)

            data = tomllib.loads(text)
        else:
            raise OnnxcompError(
                f"{path}: unsupported preprocessing config type '{suffix}'; use .json or .toml"
            )
    except ImportError:
        raise OnnxcompError(
            f"{path}: TOML configs need Python 3.11 or newer; use a .json file instead"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, TOMLDecodeError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OnnxcompError(f"{path}: cannot parse preprocessing config: {reason}") from None
    if not isinstance(data, dict):
        raise OnnxcompError(f"{path}: preprocessing config must be a table/object of keys")
    return data
