"""Model-input batches: from the user's data (streamed) or random inputs that fit the model.

Batch size: a model whose inputs fix the batch to N (``core.inputs.fixed_batch``) gets batches
of N samples, whatever ``DataOptions.batch_size`` says; the last batch holds what is left (fewer
than N), and the backends pad it to N and drop the padded rows' outputs
(``backends.base.FixedBatch``), so every sample counts exactly once. A symbolic batch gets
``batch_size`` samples per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcomp.core.inputs import InputSpec, batched_inputs, fixed_batch, random_feeds
from onnxcomp.data.preprocess import Preprocess
from onnxcomp.data.readers import open_data_source
from onnxcomp.errors import OnnxcompError

Feeds = dict[str, np.ndarray]
ARRAY_SUFFIXES = (".npy", ".npz")


def check_feeds_fit(specs: Sequence[InputSpec], feeds: Feeds, source: str) -> None:
    """Raise a one-line error when data does not fit the model's inputs (the batch axis aside:
    a fixed batch is met by batching, see the module docstring)."""
    for spec in specs:
        array = feeds.get(spec.name)
        if array is None:
            raise OnnxcompError(f"{source}: gives no data for model input '{spec.name}'")
        fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int) and d > 0]
        bad = len(array.shape) != len(spec.shape) or any(
            array.shape[i] != d for i, d in fixed if i > 0
        )
        if not bad:
            continue
        if Path(source).suffix.lower() in ARRAY_SUFFIXES:
            fix = (
                "arrays are used as stored (--resize/--crop apply to images only): save them "
                "at the input's shape, samples on the first axis"
            )
        else:
            fix = (
                "set --resize/--crop (or --preset) and --layout NCHW|NHWC (or --grayscale) "
                "so the images match"
            )
        raise OnnxcompError(
            f"{source}: samples of shape {tuple(array.shape[1:])} do not fit input "
            f"{spec.describe()}; {fix}"
        )


def batch_size_for(specs: Sequence[InputSpec], requested: int) -> int:
    """Samples per batch: the model's fixed batch, else ``requested``."""
    return fixed_batch(specs) or requested


def batch_note(size: int | None) -> str | None:
    """The line reports print when the model fixes the batch to ``size`` (None: symbolic)."""
    if size is None:
        return None
    note = (
        f"batch fixed to {size} by the model: calibration and verification run {size} "
        f"sample{'s' if size > 1 else ''} at a time"
    )
    if size > 1:
        note += (
            " (a last, incomplete batch is padded by repeating its samples; the padded rows "
            "are left out of every statistic and metric)"
        )
    return note


def random_batches(
    specs: Sequence[InputSpec], samples: int, batch_size: int, dim_default: int, seed: int = 0
) -> Iterator[tuple[Feeds, None]]:
    """Random feeds, exactly ``samples`` in all, in batches of ``batch_size_for`` samples."""
    step = batch_size_for(specs, batch_size)
    batched = batched_inputs((spec.name, spec.shape) for spec in specs)
    done, index = 0, 0
    while done < samples:
        rows = min(step, samples - done)
        feeds = random_feeds(specs, step, dim_default, seed=seed + index)
        if rows < step:
            feeds = {k: v[:rows] if k in batched else v for k, v in feeds.items()}
        yield feeds, None
        done += rows
        index += 1


@dataclass(frozen=True)
class DataOptions:
    """Where samples come from (the user's data, else random inputs) and how many.

    ``batch_size`` applies to models with a symbolic batch; a fixed batch is used as it is.
    """

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
    """Batches of samples from the data (streamed) or random ones; a description; a count.

    Every batch has the model's fixed batch size, or ``options.batch_size`` when the batch is
    symbolic; only the last may be smaller. The data's shape is checked at the first batch.
    """
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
        for batch in source.batches(batch_size_for(specs, options.batch_size)):
            feeds = {
                spec.name: batch.inputs[spec.name].astype(spec.dtype, copy=False)
                for spec in specs
                if spec.name in batch.inputs
            }
            check_feeds_fit(specs, feeds, str(options.data))
            yield feeds, batch.labels

    return batches(), source.describe(), source.num_samples
