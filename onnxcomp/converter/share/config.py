"""``--weight-sharing K`` as a typed config, checked when built."""

from __future__ import annotations

from dataclasses import dataclass

from onnxcomp.core.ops import SHARED_MARK
from onnxcomp.errors import OptionError

# SHARED_MARK: the metadata key the pass writes: JSON {weight initializer name: K}. The archive
# (``onnxcomp/storage/``) recomputes the codebook and indices from the weight's unique values.
__all__ = ["MAX_CLUSTERS", "MIN_CLUSTERS", "SHARED_MARK", "ShareConfig"]
MIN_CLUSTERS, MAX_CLUSTERS = 2, 256


@dataclass(frozen=True)
class ShareConfig:
    """``clusters``: K, the codebook size per layer (2..256, so an index fits in a byte).
    ``iterations``: the most Lloyd iterations (they stop earlier when assignments settle).
    ``first_layer``: share the first weighted layer's weights too (kept as they are by default).
    """

    clusters: int
    iterations: int = 50
    first_layer: bool = False

    def __post_init__(self) -> None:
        if not MIN_CLUSTERS <= self.clusters <= MAX_CLUSTERS:
            raise OptionError(
                f"--weight-sharing {self.clusters}: give a codebook size K from "
                f"{MIN_CLUSTERS} to {MAX_CLUSTERS}"
            )
        if self.iterations < 1:
            raise OptionError(f"weight-sharing iterations {self.iterations}: give at least 1")
