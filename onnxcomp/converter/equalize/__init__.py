"""Cross-layer equalization (``--equalize exact|relu6``)."""

from onnxcomp.converter.equalize.equalize_pass import (
    EqualizeConfig,
    EqualizePass,
    EqualizeRelu6Pass,
)

__all__ = ["EqualizeConfig", "EqualizePass", "EqualizeRelu6Pass"]
