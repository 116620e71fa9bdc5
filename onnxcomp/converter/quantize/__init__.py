"""Weight and activation quantization: int8 QDQ (``--int8``: calibrators, QDQ placement,
rounding, mixed precision) and INT4 weights (``--int4-weights``)."""

from onnxcomp.converter.quantize.int4 import Int4Config, Int4WeightsPass
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig, QuantizeInt8Pass

__all__ = ["Int4Config", "Int4WeightsPass", "QuantizeConfig", "QuantizeInt8Pass"]
