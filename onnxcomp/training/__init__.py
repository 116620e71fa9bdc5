"""onnxcomp.training."""
