"""onnxcomp.data: read images or arrays and stream them as model-input batches."""

from __future__ import annotations

from onnxcomp.data.preprocess import (
    PRESETS,
    Preprocess,
    PreprocessFieldError,
    get_preset,
    load_preprocess_config,
)
from onnxcomp.data.readers import (
    IMAGE_EXTENSIONS,
    ArraySource,
    Batch,
    DataSource,
    ImageSource,
    open_data_source,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "PRESETS",
    "ArraySource",
    "Batch",
    "DataSource",
    "ImageSource",
    "Preprocess",
    "PreprocessFieldError",
    "get_preset",
    "load_preprocess_config",
    "open_data_source",
]
