"""A model that fixes its batch: the rule that reads it, and runs on fewer samples
(padded by repeating samples, the padded rows' outputs dropped)."""

from __future__ import annotations

import numpy as np
import pytest
from int8_models import small_cnn, with_symbolic_batch

from onnxcomp.backends.base import FixedBatch
from onnxcomp.backends.ort import ORT, SessionConfig, create_session, run, session_batch
from onnxcomp.core.inputs import batch_of_shapes, batched_inputs, fixed_batch, input_specs
from onnxcomp.errors import OnnxcompError

RNG = np.random.default_rng(3)


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ([(1, 3, 8, 8)], 1),
        ([(4, 3, 8, 8)], 4),
        ([("N", 3, 8, 8)], None),
        ([(None, 3, 8, 8)], None),
        ([(), (2, 5)], 2),  # a scalar input is not batched: the next input decides
        ([("N", 3), (7,)], None),  # the first batched input decides: symbolic
        ([(1, 3, 8, 8), (3,)], 1),
    ],
)
def test_batch_rule(shapes, expected):
    assert batch_of_shapes(shapes) == expected


def test_batched_inputs_leave_out_other_fixed_first_dims():
    inputs = [("x", (4, 3, 8, 8)), ("mean", (3,)), ("mask", ("N", 8)), ("s", ())]
    assert batched_inputs(inputs) == {"x", "mask"}
    assert FixedBatch.of(inputs) == FixedBatch(4, frozenset({"x", "mask"}))
    assert FixedBatch.of([("x", ("N", 3))]) is None


def test_fixed_batch_from_specs_and_sessions():
    for batch in (1, 4):
        model = small_cnn(batch=batch)
        assert fixed_batch(input_specs(model)) == batch
        assert session_batch(create_session(model.SerializeToString())).size == batch
    symbolic = small_cnn()
    assert fixed_batch(input_specs(symbolic)) is None
    assert session_batch(create_session(symbolic.SerializeToString())) is None


def test_padding_repeats_samples_and_outputs_keep_the_real_rows():
    seen: list[dict[str, np.ndarray]] = []

    def call(feeds):
        seen.append(dict(feeds))
        x = feeds["x"]
        return [x * 2.0, np.float32(x.sum()).reshape(()), np.zeros((7, 2), np.float32)]

    batch = FixedBatch(4, frozenset({"x"}))
    x = RNG.normal(size=(3, 2)).astype(np.float32)
    scale = np.ones(5, np.float32)
    out = batch.run(call, {"x": x, "scale": scale})
    padded = seen[0]["x"]
    assert padded.shape == (4, 2)
    np.testing.assert_array_equal(padded, x[[0, 1, 2, 0]])  # repeats the real samples
    assert seen[0]["scale"] is scale  # not a batched input: passed as given
    np.testing.assert_array_equal(out[0], x * 2.0)  # padded row dropped
    assert out[1].shape == () and out[2].shape == (7, 2)  # no batch axis: whole
    full = RNG.normal(size=(4, 2)).astype(np.float32)
    out = batch.run(call, {"x": full, "scale": scale})
    assert seen[1]["x"] is full  # a whole batch runs as given
    np.testing.assert_array_equal(out[0], full * 2.0)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_ort_run_matches_per_sample_results(rows):
    fixed = small_cnn(batch=4)
    reference = create_session(with_symbolic_batch(fixed).SerializeToString())
    x = RNG.normal(size=(rows, 3, 8, 8)).astype(np.float32)
    expected = np.concatenate(
        [reference.run(None, {"input": x[i : i + 1]})[0] for i in range(rows)]
    )
    session = create_session(fixed.SerializeToString())
    np.testing.assert_allclose(run(session, {"input": x})[0], expected, rtol=1e-5, atol=1e-6)
    wrapped = ORT.create_session(fixed.SerializeToString(), SessionConfig())
    np.testing.assert_allclose(wrapped.run({"input": x})[0], expected, rtol=1e-5, atol=1e-6)


def test_more_samples_than_the_fixed_batch_is_one_line():
    session = create_session(small_cnn(batch=1).SerializeToString())
    with pytest.raises(OnnxcompError, match=r"ONNX Runtime failed to run: .*Expected: 1") as info:
        run(session, {"input": np.zeros((2, 3, 8, 8), np.float32)})
    assert "\n" not in str(info.value)
