"""--int4-weights from the command line: wrong combinations refused in one line before any
work, and a run writing an INT4 model."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from graphs import conv_bn
from test_cli_fail_fast import refused, workdir  # noqa: F401 (the fixture)

from onnxcomp.cli import main
from onnxcomp.deploy.ort_mobile import int4_problem


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--int4-weights", "--int8", "--calib", "CALIB"], "cannot be combined with --int8"),
        (["--int4-weights", "--binarize", "weights"], "with --binarize"),
        (["--int4-weights", "--sparsity", "0.5"], "with --sparsity"),
        (["--int4-weights", "--weight-sharing", "16"], "with --weight-sharing"),
        (["--int4-weights", "--weight-rounding", "adaround"], "--weight-rounding adaround"),
        (["--int4-weights", "--weight-rounding", "gptq"], "add --calib"),
        (["--int4-first-last"], "--int4-first-last needs --int4-weights"),
    ],
)
def test_wrong_combinations_are_refused_in_one_line(capsys, workdir, args, needle):  # noqa: F811
    assert needle in refused(capsys, workdir, *args)


def test_convert_writes_int4_weights(tmp_path):
    onnx.save(conv_bn(cin=8, cout=16), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    code = main(["convert", str(tmp_path / "m.onnx"), "-o", str(out), "--int4-weights",
                 "--int4-first-last"])  # fmt: skip
    assert code == 0
    model = onnx.load(out)
    assert model.opset_import[0].version == 21
    types = {i.name: i.data_type for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(types[n.input[0]] == onnx.TensorProto.INT4 for n in dq)
    # deploy's .ort writer keeps refusing INT4 (the .ort does not load)
    assert "INT4" in (int4_problem(ir.load(out)) or "")
