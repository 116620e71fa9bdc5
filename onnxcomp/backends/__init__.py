"""onnxcomp.backends."""
