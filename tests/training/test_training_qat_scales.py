"""LSQ steps under a high learning rate: the trained QDQ model still runs in ONNX Runtime with
its fused integer kernels, and every exported scale stays within MAX_STEP_RATIO of the PTQ one.

A raw (linear) step moved by SGD crossed zero and landed on the 1e-12 floor; ONNX Runtime then
refused the model at QLinearGlobalAveragePool ("parameter out of computation range": MLAS needs
x_scale / y_scale / (H * W) in [2^-32, 256)).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from int8_models import minmax_ranges, quantize, small_cnn  # noqa: E402

from onnxcomp.training.fake_quant import MAX_STEP_RATIO  # noqa: E402
from onnxcomp.training.importer import import_onnx  # noqa: E402

torch.set_num_threads(1)


def optimized_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """ONNX Runtime with all graph optimizations: DQ -> GlobalAveragePool -> Q becomes
    QLinearGlobalAveragePool, DQ -> Conv -> Q becomes QLinearConv."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def scales(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64)
        for t in model.graph.initializer
        if t.name.endswith("scale") and "quantized_scale" not in t.name  # int32 bias scales
    }


def test_high_step_lr_keeps_scales_bounded_and_the_model_runnable():
    float_model = small_cnn(seed=3)
    rng = np.random.default_rng(0)
    calib = rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    qdq = quantize(float_model, minmax_ranges(float_model, calib))
    feeds = {"input": rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)}
    target = torch.from_numpy(optimized_session(float_model).run(None, feeds)[0])
    module = import_onnx(ir.from_proto(qdq)).train()
    groups = [
        {"params": module.params.parameters(), "lr": 0.01},
        {"params": module.quants.parameters(), "lr": 1e4},  # far too high on purpose
    ]
    optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    for _ in range(8):
        optimizer.zero_grad()
        loss = (module(torch.from_numpy(feeds["input"]))[0] - target).square().mean()
        loss.backward()
        optimizer.step()
    trained = ir.to_proto(module.eval().export_onnx())

    outputs = optimized_session(trained).run(None, feeds)[0]  # the fused kernels accept it
    assert np.isfinite(outputs).all()
    before, after = scales(qdq), scales(trained)
    assert set(before) == set(after) and len(before) >= 6
    ratios = np.concatenate([(after[n] / before[n]).ravel() for n in before])
    assert (ratios >= 1 / MAX_STEP_RATIO * (1 - 1e-5)).all()
    assert (ratios <= MAX_STEP_RATIO * (1 + 1e-5)).all()
    assert np.abs(np.log(ratios)).max() > 0.1  # the steps did learn
