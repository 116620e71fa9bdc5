"""Settings of the pruning pass, checked when they are made."""

from __future__ import annotations

from dataclasses import dataclass

from onnxcomp.backends.kernel_latency import PRECISIONS
from onnxcomp.converter.prune.criteria import IMPORTANCE
from onnxcomp.errors import OptionError

LATENCY_TARGETS = PRECISIONS  # --prune-latency: the kernels timed
LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


@dataclass(frozen=True)
class PruneConfig:
    """Settings of the pruning pass.

    ``ratio``: fraction of each group's channels to remove, in (0, 1). ``macs``: instead,
    the fraction of MACs to keep, in (0, 1), allocated by a sensitivity scan (needs
    calibration data). ``method``: ``l1`` or ``thinet``. ``min_channels``: never keep fewer
    channels in a group. ``multiple``: kept channel counts are multiples of it, strictly (the
    vector width of the target's convolution kernels: 16 for ONNX Runtime on AVX-512, 8 on
    AVX2; a group with fewer than twice as many channels stays whole).
    ``exclude``: layer names (shell patterns) whose groups stay whole.
    ``overrides``: (pattern, ratio) pairs fixing the ratio of the groups of matching layers.
    ``samples_per_image``: ThiNet samples per image and reading layer; ``max_samples`` caps
    them (reservoir). ``reconstruct``: ThiNet's least-squares step: a reading layer with at
    most ``gram_features`` inputs (C kh kw for a Conv) is refitted whole (weights and bias) on
    the Gram matrix of ``patches_per_image`` sampled input patches per image, any other one
    rescales its kept channels. ``refit_pruned``: then every such layer is refitted, layer by
    layer, on the pruned model's own inputs (:mod:`onnxcomp.converter.prune.refit`), each on
    ``refit_samples`` calibration samples.
    ``sensitivity_samples``
    and ``sensitivity_levels``: images and ratios of the sensitivity scan.
    ``latency``: ``int8`` or ``fp32``: kept counts (multiples of ``multiple``) are further
    restricted to those the target's convolution kernels run fast, measured on this machine at
    batch ``latency_batch`` (:mod:`onnxcomp.converter.prune.latency`); None: not measured.
    """

    ratio: float | None = 0.5
    method: str = "l1"
    macs: float | None = None
    min_channels: int = 4
    multiple: int = 8
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, float], ...] = ()
    samples_per_image: int = 10
    max_samples: int = 20_000
    reconstruct: bool = True
    compensate_bias: bool = True
    gram_features: int = 2304
    patches_per_image: int = 32
    refit_pruned: bool = True
    refit_samples: int = 512
    refit_residual: bool = True
    sensitivity_samples: int = 128
    sensitivity_levels: tuple[float, ...] = LEVELS
    latency: str | None = None
    latency_batch: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.macs is not None:
            if not 0.0 < self.macs < 1.0:
                raise OptionError(f"prune MACs to keep must be in (0, 1), got {self.macs}")
        elif self.ratio is None or not 0.0 < self.ratio < 1.0:
            raise OptionError(f"prune ratio must be in (0, 1), got {self.ratio}")
        if self.method not in IMPORTANCE:
            names = tuple(IMPORTANCE)
            raise OptionError(f"prune method must be one of {names}, got {self.method!r}")
        if self.min_channels < 1:
            raise OptionError(f"min_channels must be at least 1, got {self.min_channels}")
        if self.multiple < 1:
            raise OptionError(f"the channel multiple must be at least 1, got {self.multiple}")
        if self.latency is not None and self.latency not in LATENCY_TARGETS:
            raise OptionError(
                f"--prune-latency {self.latency!r}: choose one of {', '.join(LATENCY_TARGETS)}"
            )
        if self.latency_batch < 1:
            raise OptionError(f"prune latency batch must be at least 1, got {self.latency_batch}")
        counts = (
            self.samples_per_image, self.max_samples, self.sensitivity_samples,
            self.patches_per_image, self.refit_samples, self.gram_features,
        )  # fmt: skip
        if min(counts) < 1:
            raise OptionError("prune sample counts and gram_features must be at least 1")
        for pattern, ratio in self.overrides:
            if not 0.0 <= ratio < 1.0:
                raise OptionError(f"prune ratio for '{pattern}' must be in [0, 1), got {ratio}")
        if not self.sensitivity_levels or not all(0 < r < 1 for r in self.sensitivity_levels):
            raise OptionError("sensitivity levels must be fractions in (0, 1)")

    def requires_data(self) -> str | None:
        """The option that makes the pass read calibration data, or None."""
        if self.macs is not None:
            return "--prune-macs"
        if IMPORTANCE[self.method].needs_data:
            return f"--prune-method {self.method}"
        return None

    def min_keep(self, channels: int) -> int:
        """The fewest channels a group of ``channels`` may keep: ``min_channels`` rounded up
        to a multiple of ``multiple`` (C itself when that is not below C)."""
        step = self.multiple
        return min(channels, step * -(-max(self.min_channels, 1) // step))

    def keep_count(self, channels: int, ratio: float | None = None) -> int:
        """k = round(C * (1 - ratio)) to the nearest multiple of ``multiple``, at least
        :meth:`min_keep`, at most C. The multiple is strict: ONNX Runtime's NCHWc kernels
        only take channel counts that fill whole vectors (16 floats on AVX-512), a count
        off the multiple drops the layer to a slower path."""
        ratio = self.ratio if ratio is None else ratio
        step = self.multiple
        keep = step * round(channels * (1.0 - (ratio or 0.0)) / step)
        return min(max(keep, self.min_keep(channels)), channels)
