"""``--binarize`` and its options as a typed config, checked when built."""

from __future__ import annotations

from dataclasses import dataclass

from onnxcomp.core.ops import BINARIZED_MARK
from onnxcomp.errors import OptionError

MODES = ("weights", "full")
__all__ = ["BINARIZED_MARK", "MODES", "BinarizeConfig"]


@dataclass(frozen=True)
class BinarizeConfig:
    """``mode``: ``weights`` (sign weights x per-channel alpha) or ``full`` (activations too).

    ``exclude``: layer names (shell patterns) kept float. ``first_last``: binarize the first
    and the last weighted layer too (kept float by default, as BWN/XNOR-Net and every binary
    network since do).
    """

    mode: str = "weights"
    exclude: tuple[str, ...] = ()
    first_last: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OptionError(f"--binarize {self.mode!r}: give one of {', '.join(MODES)}")
        empty = [p for p in self.exclude if not p.strip()]
        if empty:
            raise OptionError("--binarize-exclude '': give a layer name or a shell pattern")
