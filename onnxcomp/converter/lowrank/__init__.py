"""Low-rank factorization of Gemm, MatMul and Conv weights (``--lowrank``)."""

from onnxcomp.converter.lowrank.config import LowRankConfig
from onnxcomp.converter.lowrank.lowrank_pass import LowRankPass

__all__ = ["LowRankConfig", "LowRankPass"]
