"""int8 quantization: calibrators, QDQ placement, rounding, mixed precision."""
