"""TFLite flatbuffers written from ONNX without TensorFlow (issue 10).

:func:`write_tflite` lowers an NCHW ONNX graph (float, or onnxcomp's int8 QDQ output) to an
NHWC ``.tflite`` built with the flatbuffer classes ai-edge-litert ships
(``schema_py_generated``). ``flatbuf`` builds the file, ``qdq`` reads the quantization the QDQ
graph carries, ``ops`` lowers each ONNX op, ``writer`` ties them together.
"""

from onnxcomp.deploy.tflite.writer import write_tflite

__all__ = ["write_tflite"]
