"""Lossless clean-up passes: constant folding, Dropout, BatchNorm folding."""
