"""onnxcomp.converter.passes."""
