"""Binarization (``--binarize weights|full``): BWN / XNOR-Net sign weights with per-channel
scales, optionally binary activations."""

from onnxcomp.converter.binarize.binarize_pass import BinarizePass
from onnxcomp.converter.binarize.config import BINARIZED_MARK, BinarizeConfig

__all__ = ["BINARIZED_MARK", "BinarizeConfig", "BinarizePass"]
