"""The CLI's option groups: choices match the library, groups become options and back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer
from typer.testing import CliRunner

from onnxcomp.cli import app
from onnxcomp.cli.options import (
    ActivationType,
    Calibration,
    DataFlags,
    Equalize,
    ModelArg,
    PruneMethod,
    SessionFlags,
    Target,
    WeightRounding,
    flags_command,
)


def values(choice) -> set[str]:
    return {member.value for member in choice}


def test_choices_are_the_libraries_values():
    from onnxcomp.backends.targets import ACTIVATION_TYPES, TARGETS
    from onnxcomp.converter.prune.criteria import IMPORTANCE
    from onnxcomp.converter.quantize.calibrators import CALIBRATORS
    from onnxcomp.converter.quantize.quantize_pass import WEIGHT_ROUNDINGS

    assert values(PruneMethod) == set(IMPORTANCE)
    assert values(Calibration) == set(CALIBRATORS)
    assert values(Target) == set(TARGETS)
    assert values(ActivationType) == set(ACTIVATION_TYPES)
    assert values(WeightRounding) == set(WEIGHT_ROUNDINGS) == {"nearest", "gptq", "adaround"}
    assert values(Equalize) == {"exact", "relu6"}


@dataclass(frozen=True)
class _Flags:
    model: ModelArg
    inputs: DataFlags = field(default_factory=DataFlags)
    session: SessionFlags = field(default_factory=SessionFlags)


def test_flags_command_groups_options():
    seen = []
    probe = typer.Typer()
    probe.command()(flags_command(_Flags)(seen.append))
    probe.command("other")(lambda: None)  # two commands: the probe is invoked by name
    args = ["append", "m.onnx", "--limit", "3", "--bgr", "--provider", "cuda", "--threads", "2"]
    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 0, result.output
    assert seen == [
        _Flags(
            Path("m.onnx"),
            DataFlags(limit=3, bgr=True),
            SessionFlags(provider="cuda", threads=2),
        )
    ]


def test_help_lists_the_choices():
    result = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    expected = (
        "uint8|int8",
        "l1|thinet",
        "x86|x86-vnni|x86-avx2|arm|tensorrt",
        "nearest|gptq|adaround",
        "exact|relu6",
    )
    for choices in expected:
        assert choices in result.output
    assert "Range method: minmax, percentile, entropy, mse or dfp." in result.output
