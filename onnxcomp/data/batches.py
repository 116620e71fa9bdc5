"""Model-input batches: from the user's data (streamed) or random inputs that fit the model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcomp.core.inputs import InputSpec, random_feeds
from onnxcomp.data.preprocess import Preprocess
from onnxcomp.data.readers import open_data_source
from onnxcomp.errors import OnnxcompError

Feeds = dict[str, np.ndarray]


def check_feeds_fit(specs: Sequence[InputSpec], feeds: Feeds, source: str) -> None:
    """Raise a clear error when data does not fit the model's inputs."""
    for spec in specs:
        array = feeds.get(spec.name)
        if array is None:
            raise OnnxcompError(f"{source}: gives no data for model input '{spec.name}'")
        fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int) and d > 0]
        bad = len(array.shape) != len(spec.shape) or any(
            array.shape[i] != d for i, d in fixed if i > 0
        )
        if bad:
            raise OnnxcompError(
                f"{source}: samples of shape {tuple(array.shape[1:])} do not fit input "
                f"{spec.describe()}; set --preset or --resize/--crop and --layout NCHW|NHWC "
                "(or --grayscale) so the data matches"
            )


def random_batches(
    specs: Sequence[InputSpec], samples: int, batch_size: int, dim_default: int, seed: int = 0
) -> Iterator[tuple[Feeds, None]]:
    """Random feeds, ``samples`` in all, in batches (fixed batch dims are respected)."""
    fixed_batch = specs and isinstance(specs[0].shape[0], int) and specs[0].shape[0] > 0
    step = int(specs[0].shape[0]) if fixed_batch else batch_size
    done, index = 0, 0
    while done < samples:
        yield random_feeds(specs, step, dim_default, seed=seed + index), None
        done += step
        index += 1


@dataclass(frozen=True)
class DataOptions:
    """Where samples come from (the user's data, else random inputs) and how many."""

    data: Path | None = None
    preprocess: Preprocess | None = None
    limit: int | None = None  # data samples to use (None: all)
    samples: int = 16  # random samples when there is no data
    batch_size: int = 8
    dim_default: int = 1
    seed: int = 0


def sample_batches(
    specs: Sequence[InputSpec], options: DataOptions
) -> tuple[Iterator[tuple[Feeds, np.ndarray | None]], str, int]:
    """Batches of samples from the data (streamed) or random ones; a description; a count."""
    if options.data is None:
        batches = random_batches(
            specs, options.samples, options.batch_size, options.dim_default, options.seed
        )
        return batches, "random inputs", options.samples
    source = open_data_source(
        options.data,
        [s.name for s in specs],
        preprocess=options.preprocess,
        limit=options.limit,
        seed=options.seed,
    )

    def batches() -> Iterator[tuple[Feeds, np.ndarray | None]]:
        for batch in source.batches(options.batch_size):
            feeds = {
                spec.name: batch.inputs[spec.name].astype(spec.dtype, copy=False)
                for spec in specs
                if spec.name in batch.inputs
            }
            check_feeds_fit(specs, feeds, str(options.data))
            yield feeds, batch.labels

    return batches(), source.describe(), source.num_samples
