"""Settings of the low-rank pass, checked when they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnxcomp.errors import OptionError

METHODS = ("svd", "spatial", "tucker2")


@dataclass(frozen=True)
class LowRankConfig:
    """Settings of the low-rank pass.

    ``rank_energy``: fraction of the weight's squared singular values to keep, in (0, 1].
    ``min_macs_saving``: the fraction of a layer's MACs a factorization must save (a negative
    value lets MACs grow, which only makes sense for tests). ``methods``: which of
    ``svd`` (Gemm, MatMul, 1x1 Conv), ``spatial`` and ``tucker2`` (k x k Conv) may be used.
    ``exclude``: node names (shell patterns, ``fnmatch``) to leave alone.

    Data-driven (need ``PassContext.calibration``; without it the ranks come from
    ``rank_energy`` and the record says so): ``output_error``, the largest relative output
    error per layer, in (0, 1), which then replaces ``rank_energy``; ``refit``, data-aware
    factors; ``patches_per_image``, Conv input patches sampled per image for the statistics;
    ``max_gram_features``, the largest Gram matrix side (C kh kw of a Conv) collected.

    ``measure_latency``: time each factorization against its layer in ONNX Runtime (batch 1,
    median of ``latency_runs``) and keep it only if it takes at most 1 - ``latency_margin`` of
    the layer's time.
    """

    rank_energy: float = 0.9
    min_macs_saving: float = 0.1
    methods: tuple[str, ...] = METHODS
    exclude: tuple[str, ...] = ()
    output_error: float | None = None
    refit: bool = False
    patches_per_image: int = 128
    max_gram_features: int = 4608
    measure_latency: bool = False
    latency_margin: float = 0.05
    latency_runs: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.rank_energy <= 1.0:
            raise OptionError(f"--rank-energy {self.rank_energy}: give a fraction in (0, 1]")
        if self.min_macs_saving >= 1.0:
            raise OptionError(f"min_macs_saving must be below 1, got {self.min_macs_saving}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise OptionError(
                f"low-rank methods must be a non-empty subset of {METHODS}, got {self.methods}"
            )
        if self.output_error is not None and not 0.0 < self.output_error < 1.0:
            raise OptionError(f"--rank-error {self.output_error}: give a fraction in (0, 1)")
        if self.patches_per_image < 1 or self.max_gram_features < 1 or self.latency_runs < 1:
            raise OptionError(
                "patches_per_image, max_gram_features and latency_runs must be at least 1"
            )
        if not 0.0 <= self.latency_margin < 1.0:
            raise OptionError(f"latency_margin must be in [0, 1), got {self.latency_margin}")

    def requires_data(self) -> str | None:
        """The option that makes the pass read calibration data, or None."""
        if self.output_error is not None:
            return "--rank-error"
        return "--lowrank-refit" if self.refit else None

    @property
    def error_budget(self) -> float:
        """The largest relative weight error allowed: sqrt(1 - rank_energy)."""
        return math.sqrt(1.0 - self.rank_energy)

    @property
    def needs_data(self) -> bool:
        """Whether the pass wants input statistics from calibration data."""
        return self.output_error is not None or self.refit
