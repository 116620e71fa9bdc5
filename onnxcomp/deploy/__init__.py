"""Deployment: a model onnxcomp made (or any ONNX model) turned into an artifact a device runs.

- :mod:`~onnxcomp.deploy.targets`: the target registry (``ort``, ``tflite``): a name -> a writer
  ``write(model, out_dir, options) -> Artifact`` and the backend that runs the artifact.
- :mod:`~onnxcomp.deploy.ort_mobile`: the ORT-format (``.ort``) writer, through ONNX Runtime's
  own converter, with its ``required_operators.config`` for a reduced build.
- :mod:`~onnxcomp.deploy.manifest`: ``manifest.json`` (inputs, layouts, preprocessing, outputs,
  labels, ops, sizes, checksums) and the sample inputs with their expected outputs.
- :mod:`~onnxcomp.deploy.job`: the job: check, write into a temporary folder beside the output,
  verify the artifact against the source ``.onnx``, rename into place.

``deploy`` takes the model as it is: quantize first with ``onnxcomp convert --int8`` (the
``tflite`` target writes a full-int8 file from that QDQ model).
"""

from onnxcomp.deploy.job import DeployOptions, DeployReport, deploy
from onnxcomp.deploy.targets import TARGETS, Artifact, WriteOptions

__all__ = ["TARGETS", "Artifact", "DeployOptions", "DeployReport", "WriteOptions", "deploy"]
