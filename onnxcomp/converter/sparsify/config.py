"""``--sparsity`` and its options as a typed config, checked when built."""

from __future__ import annotations

from dataclasses import dataclass

from onnxcomp.core.ops import SPARSITY_MARK
from onnxcomp.errors import OptionError

SCOPES = ("global", "layer")
# SPARSITY_MARK: the metadata key the pass writes: JSON {weight initializer name: fraction of
# zeros}.
__all__ = ["SCOPES", "SPARSITY_MARK", "SparsityConfig"]


@dataclass(frozen=True)
class SparsityConfig:
    """``sparsity``: the fraction of weights set to zero, in [0, 1).

    ``scope``: ``layer`` zeroes that fraction of each layer's weights; ``global`` ranks every
    pruned weight of the model together by |w| (one threshold), so layers with many small
    weights lose more. ``first_layer``: prune the first weighted layer too (kept dense by
    default: it holds few weights and sees the raw input).
    """

    sparsity: float
    scope: str = "layer"
    first_layer: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError(f"--sparsity {self.sparsity}: give a fraction in [0, 1)")
        if self.scope not in SCOPES:
            raise OptionError(f"--sparsity-scope {self.scope!r}: give one of {', '.join(SCOPES)}")
