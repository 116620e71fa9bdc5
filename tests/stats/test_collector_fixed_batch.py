"""Statistics of a fixed-batch model: every one of 10 samples counted exactly once, though the
model runs batches of exactly its batch (the last one padded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from int8_models import small_cnn, with_symbolic_batch

from onnxcomp.backends.ort import create_session
from onnxcomp.core.proto import with_outputs
from onnxcomp.data.batches import DataOptions
from onnxcomp.stats import collector
from onnxcomp.stats.request import StatisticsRequest, collect

SAMPLES = np.random.default_rng(11).normal(size=(10, 3, 8, 8)).astype(np.float32)
TENSORS = ("r1", "c2", "logits")


class Rows:
    """An observer that keeps every value it is given."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] = []

    def update(self, values: np.ndarray) -> None:
        self.values.append(np.array(values))


def per_sample(tensors) -> dict[str, np.ndarray]:
    """The tensors of each sample run alone (a symbolic-batch copy), stacked."""
    model = with_outputs(with_symbolic_batch(small_cnn()), list(tensors))
    session = create_session(model.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    runs = [dict(zip(names, session.run(None, {"input": s[None]}), strict=True)) for s in SAMPLES]
    return {t: np.concatenate([r[t] for r in runs]) for t in tensors}


@pytest.mark.parametrize(("batch", "runs"), [(1, [1] * 10), (4, [4, 4, 2]), ("N", [10])])
def test_each_sample_counted_once(tmp_path: Path, monkeypatch, batch, runs):
    path = tmp_path / "calib.npz"
    np.savez(path, input=SAMPLES)
    rows = Rows()
    request = StatisticsRequest(histograms=TENSORS, channel_means=TENSORS, observers={"r1": [rows]})
    seen: list[int] = []
    real_run = collector.run

    def spy(session, feeds, names=None, batch=None):
        seen.append(feeds["input"].shape[0])
        return real_run(session, feeds, names, batch)

    monkeypatch.setattr(collector, "run", spy)
    model = ir.from_proto(small_cnn(batch=batch))
    stats = collect(model, request, DataOptions(data=path, batch_size=32)).statistics
    assert seen == runs  # batches of exactly the fixed batch (the last: what is left)
    assert stats.samples == 10
    expected = per_sample(TENSORS)
    for name in TENSORS:
        values = expected[name]
        hist = stats.histograms[name]
        assert hist.count == values.size
        assert (hist.min, hist.max) == (float(values.min()), float(values.max()))
        # The histogram against numpy's on the same 10 samples, at the width it ended with.
        edges = hist.edges
        positive = np.histogram(values[values >= 0], edges)[0]
        negative = np.histogram(-values[values < 0], edges)[0]
        assert positive.sum() + negative.sum() == hist.count
        moved = np.abs(hist.positive - positive).sum() + np.abs(hist.negative - negative).sum()
        assert moved <= 2  # only float rounding at bin edges may move a value
        axes = tuple(i for i in range(values.ndim) if i != 1)
        np.testing.assert_allclose(
            stats.channel_means[name].mean, values.mean(axis=axes), atol=1e-5
        )
    np.testing.assert_allclose(np.concatenate(rows.values), expected["r1"], rtol=1e-5, atol=1e-6)
