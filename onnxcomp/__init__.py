"""onnxcomp: compress trained ONNX models and prove they still work."""

__version__ = "0.1.0"
