"""Low-rank factorization of Conv, Gemm and MatMul."""
