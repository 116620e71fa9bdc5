"""The explicit geometry of a 2-D convolution and its im2col patches, written once.

:func:`conv_geometry` resolves a Conv node's strides, dilations and pads (``auto_pad``
included) against its input height and width; :func:`patches_at` gathers the im2col rows of
a padded batch at chosen output positions. Low-rank, pruning and GPTQ statistics use both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcomp.core.graph import attr_ints


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D Conv's explicit geometry: (height, width) pairs, pads as (top, left, bottom, right)."""

    in_hw: tuple[int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]

    def out_size(self, axis: int) -> int:
        extent = self.dilations[axis] * (self.kernel[axis] - 1) + 1
        padded = self.in_hw[axis] + self.pads[axis] + self.pads[axis + 2]
        return (padded - extent) // self.strides[axis] + 1

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.out_size(0), self.out_size(1)

    def at_input(self, in_hw: Sequence[int]) -> ConvGeometry:
        """The same convolution on an input of another height and width."""
        return dataclasses.replace(self, in_hw=(int(in_hw[0]), int(in_hw[1])))

    def pad(self, images: np.ndarray) -> np.ndarray:
        """An (N, C, H, W) batch with this geometry's zero padding."""
        top, left, bottom, right = self.pads
        return np.pad(images, ((0, 0), (0, 0), (top, bottom), (left, right)))


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    """(begin, end) pads of auto_pad SAME_UPPER / SAME_LOWER on one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def conv_geometry(node: ir.Node, kernel: Sequence[int]) -> ConvGeometry | str:
    """The explicit geometry of a 2-D Conv, or why it cannot be known."""
    kernel = (int(kernel[0]), int(kernel[1]))
    shape = node.inputs[0].shape
    if shape is None or shape.rank() != 4 or not (shape.is_static(2) and shape.is_static(3)):
        return "its input height and width are not known (fix the input dims)"
    in_hw = (int(shape[2]), int(shape[3]))
    strides = tuple(attr_ints(node, "strides", [1, 1]))  # type: ignore[arg-type]
    dilations = tuple(attr_ints(node, "dilations", [1, 1]))  # type: ignore[arg-type]
    auto_pad = node.attributes.get("auto_pad")
    mode = auto_pad.as_string() if auto_pad is not None else "NOTSET"
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        (t, b), (left, r) = (
            _same_pads(in_hw[a], kernel[a], strides[a], dilations[a], mode == "SAME_UPPER")
            for a in (0, 1)
        )
        pads = (t, left, b, r)
    elif mode == "VALID":
        pads = (0, 0, 0, 0)
    else:
        pads = tuple(attr_ints(node, "pads", [0, 0, 0, 0]))  # type: ignore[arg-type]
    return ConvGeometry(in_hw, kernel, strides[:2], dilations[:2], pads[:4])  # type: ignore[arg-type]


def patches_at(
    padded: np.ndarray, geometry: ConvGeometry, image: np.ndarray, flat: np.ndarray
) -> np.ndarray:
    """im2col rows (samples, C kh kw) of a padded (N, C, H, W) batch at the output positions
    ``flat`` (row-major over the output) of the images ``image``."""
    g = geometry
    oy, ox = np.divmod(flat, g.out_hw[1])
    kh, kw = g.kernel
    rows = oy[:, None] * g.strides[0] + np.arange(kh) * g.dilations[0]
    cols = ox[:, None] * g.strides[1] + np.arange(kw) * g.dilations[1]
    channels = np.arange(padded.shape[1])
    patch = padded[
        image[:, None, None, None],
        channels[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]  # (samples, C, kh, kw)
    return patch.reshape(len(flat), -1)
