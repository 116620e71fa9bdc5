"""Errors that reach the user as one clear line."""

from __future__ import annotations


class OnnxcompError(Exception):
    """Bad input or an impossible request: printed as one line (no traceback), exit code 2.

    The message says which file, what is wrong and what to do.
    """


class VerificationError(OnnxcompError):
    """A lossless pass changed the model's outputs beyond tolerance."""


class OptionError(OnnxcompError):
    """An option value, or a pass's precondition (calibration data, a model that is not yet
    quantized, a target that supports the scheme...), is wrong. Raised before any pass runs
    and before any data pass, so a mistyped option fails at once."""
