"""--sparsity and --weight-sharing from the command line: wrong values refused before any
work, and a run writing the metadata keys the archive reads."""

from __future__ import annotations

import json

import onnx
import pytest
from graphs import conv_bn
from test_cli_fail_fast import refused, workdir  # noqa: F401 (the fixture)

from onnxcomp.cli import main


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sparsity", "1.0"], "--sparsity 1.0"),
        (["--sparsity", "-0.2"], "--sparsity -0.2"),
        (["--weight-sharing", "1"], "--weight-sharing 1"),
        (["--weight-sharing", "300"], "--weight-sharing 300"),
        (["--sparsity", "0.5", "--sparsity-scope", "channel"], "--sparsity-scope"),
        (["--weight-sharing", "16", "--int8", "--calib", "CALIB"], "--int8"),
    ],
)
def test_wrong_values_are_refused_in_one_line(capsys, workdir, args, needle):  # noqa: F811
    assert needle in refused(capsys, workdir, *args)


def test_convert_writes_the_metadata_keys(tmp_path):
    onnx.save(conv_bn(cin=8, cout=16), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    code = main(
        ["convert", str(tmp_path / "m.onnx"), "-o", str(out), "--sparsity", "0.5",
         "--weight-sharing", "8", "--compress-first-layer"]
    )  # fmt: skip
    assert code == 0
    marks = {p.key: p.value for p in onnx.load(out).metadata_props}
    (name,) = json.loads(marks["onnxcomp.shared"])
    assert json.loads(marks["onnxcomp.shared"]) == {name: 8}
    assert json.loads(marks["onnxcomp.sparsity"]) == {name: 0.5}


def test_sparse_initializers_flag_writes_them_and_says_so(tmp_path, capsys):
    onnx.save(conv_bn(cin=8, cout=16), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    code = main(
        ["convert", str(tmp_path / "m.onnx"), "-o", str(out), "--sparsity", "0.9",
         "--compress-first-layer", "--sparse-initializers"]
    )  # fmt: skip
    assert code == 0
    assert len(onnx.load(out).graph.sparse_initializer) == 1
    assert "1 weight(s) stored as ONNX sparse_initializer" in " ".join(
        capsys.readouterr().out.split()
    )
