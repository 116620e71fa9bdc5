"""Lossless clean-up passes: constant folding, Dropout, BatchNorm folding."""

from onnxcomp.converter.cleanup.cleanup_pass import CleanupPass
from onnxcomp.converter.cleanup.fold_batchnorm import FoldBatchNormPass

__all__ = ["CleanupPass", "FoldBatchNormPass"]
