"""int8 quantization (``--int8``): calibrators, QDQ placement, rounding, mixed precision."""

from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig, QuantizeInt8Pass

__all__ = ["QuantizeConfig", "QuantizeInt8Pass"]
