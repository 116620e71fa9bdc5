"""Run a written ``.tflite`` with the source ONNX model's feeds and get its outputs back.

The writer makes 4-D inputs NHWC and, with ``--io-dtype int8|uint8``, integer inputs and
outputs; verification and the manifest's samples speak the ONNX model's language (NCHW float),
so this adapter transposes and (de)quantizes at the edges with the file's own parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


def onnx_layout_runner(session) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """``feeds (ONNX names, NCHW float) -> outputs (NCHW float)`` for a TFLite session."""

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        native = {}
        for detail in session.inputs:
            value = np.asarray(feeds[detail["name"]])
            if value.ndim == 4:
                value = value.transpose(NCHW_TO_NHWC)
            native[detail["name"]] = _quantize(value, detail)
        outputs = session.run(native)
        result = []
        for detail, value in zip(session.outputs, outputs, strict=True):
            value = _dequantize(value, detail)
            result.append(value.transpose(NHWC_TO_NCHW) if value.ndim == 4 else value)
        return result

    return run
