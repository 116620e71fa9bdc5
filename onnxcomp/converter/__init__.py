"""onnxcomp.converter."""
