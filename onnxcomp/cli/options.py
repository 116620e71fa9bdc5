"""Options shared by several commands, declared once as Typer ``Annotated`` aliases.

Groups: the model argument and ``--debug``; the ONNX Runtime session (``--provider``,
``--allow-cpu-fallback``, ``--threads``); the data and preprocessing options that ``convert``,
``compare`` and ``debug`` all take; ``--json``. Options with a fixed set of values are ``str``
enums, so Typer lists the values in ``--help`` and refuses any other value while parsing.

Only Typer is imported here: ``--help`` must not load onnx or ONNX Runtime. The functions that
turn these values into typed configs are in :mod:`onnxcomp.cli.configs`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar, get_type_hints

import typer

# --- fixed sets of values -------------------------------------------------------------------
# The library's own lists (backends.targets, CALIBRATORS, prune.criteria.IMPORTANCE) live in modules
# that import onnx; tests/cli/test_cli_options.py checks that these stay the same.


def choices(name: str, *values: str) -> type[Enum]:
    """A str Enum Typer offers as a fixed set of values (shown in --help, others refused)."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


ActivationType = choices("ActivationType", "uint8", "int8")
Target = choices("Target", "x86", "x86-vnni", "x86-avx2", "arm", "tensorrt")
Calibration = choices("Calibration", "minmax", "percentile", "entropy", "mse", "dfp")
PruneMethod = choices("PruneMethod", "l1", "thinet")
WeightRounding = choices("WeightRounding", "nearest", "gptq", "adaround")
Equalize = choices("Equalize", "exact", "relu6")
Binarize = choices("Binarize", "weights", "full")
PruneLatency = choices("PruneLatency", "int8", "fp32")
SparsityScope = choices("SparsityScope", "layer", "global")
# deploy's: onnxcomp.deploy.TARGETS and deploy.artifact's PLATFORMS and IO_DTYPES
# (tests/cli/test_cli_deploy.py checks these)
DeployTarget = choices("DeployTarget", "ort", "tflite")
Platform = choices("Platform", "arm", "amd64")
IoDtype = choices("IoDtype", "float32", "int8", "uint8")


# --- model, debug, output format ------------------------------------------------------------

ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", show_default=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
DimDefaultOpt = Annotated[
    int, typer.Option("--dim-default", help="Value for dynamic dims other than batch.", min=1)
]

# --- ONNX Runtime session -------------------------------------------------------------------

ProviderOpt = Annotated[
    str, typer.Option("--provider", help="Execution provider: cpu, cuda or tensorrt.")
]
FallbackOpt = Annotated[
    bool, typer.Option("--allow-cpu-fallback", help="Run on CPU if the provider is missing.")
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="ONNX Runtime intra-op threads.", min=1)
]

# --- data and preprocessing -----------------------------------------------------------------

DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Sample data: an image folder (ImageFolder layout gives labels), .npy or .npz.",
    ),
]
PresetOpt = Annotated[
    str | None, typer.Option("--preset", help="Image preprocessing preset: imagenet, cifar10.")
]
PreprocessConfigOpt = Annotated[
    Path | None,
    typer.Option("--preprocess-config", help="JSON or TOML file with preprocessing settings."),
]
ResizeOpt = Annotated[int | None, typer.Option("--resize", help="Resize shorter side.", min=1)]
CropOpt = Annotated[int | None, typer.Option("--crop", help="Center crop size.", min=1)]
MeanOpt = Annotated[
    str | None, typer.Option("--mean", help="Per-channel mean after scaling, e.g. 0.5,0.5,0.5")
]
StdOpt = Annotated[str | None, typer.Option("--std", help="Per-channel std, e.g. 0.5,0.5,0.5")]
ScaleOpt = Annotated[float | None, typer.Option("--scale", help="Pixel scale (1/255).")]
BgrOpt = Annotated[bool | None, typer.Option("--bgr/--rgb", help="Channel order.")]
LayoutOpt = Annotated[str | None, typer.Option("--layout", help="NCHW or NHWC.")]
GrayOpt = Annotated[bool | None, typer.Option("--grayscale", help="One-channel images.")]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", help="Use at most N data samples (seeded).", min=1)
]
SamplesOpt = Annotated[
    int, typer.Option("--samples", help="Random samples when no --data is given.", min=1)
]
BatchSizeOpt = Annotated[
    int,
    typer.Option(
        "--batch-size", help="Samples per batch (a model that fixes its batch uses its own).", min=1
    ),
]


@dataclasses.dataclass(frozen=True)
class PreprocessFlags:
    """Image preprocessing (``None``: not given); convert's data group and the training
    commands share it."""

    preset: PresetOpt = None
    preprocess_config: PreprocessConfigOpt = None
    resize: ResizeOpt = None
    crop: CropOpt = None
    mean: MeanOpt = None
    std: StdOpt = None
    scale: ScaleOpt = None
    bgr: BgrOpt = None
    layout: LayoutOpt = None
    grayscale: GrayOpt = None


@dataclasses.dataclass(frozen=True)
class DataFlags(PreprocessFlags):
    """Where samples come from, and their preprocessing (``None``: not given)."""

    data: DataOpt = None
    limit: LimitOpt = None
    samples: SamplesOpt = 16
    batch_size: BatchSizeOpt = 8


@dataclasses.dataclass(frozen=True)
class SessionFlags:
    """How to run ONNX Runtime."""

    provider: ProviderOpt = "cpu"
    allow_cpu_fallback: FallbackOpt = False
    threads: ThreadsOpt = None


# --- commands whose options are the fields of a dataclass -----------------------------------

Flags = TypeVar("Flags")


def _parameters(flags_type: type) -> list[tuple[str | None, inspect.Parameter]]:
    """The command parameters for the fields of ``flags_type``, in order; a field that is itself
    a dataclass (an option group) gives its own fields, paired with the group's field name."""
    hints = get_type_hints(flags_type, include_extras=True)
    found: list[tuple[str | None, inspect.Parameter]] = []
    for field in dataclasses.fields(flags_type):
        hint = hints[field.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            found += [(field.name, parameter) for _, parameter in _parameters(hint)]
            continue
        default = field.default
        parameter = inspect.Parameter(
            field.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=inspect.Parameter.empty if default is dataclasses.MISSING else default,
            annotation=hint,
        )
        found.append((None, parameter))
    return found


def flags_command(flags_type: type[Flags]) -> Callable[[Callable[[Flags], None]], Callable]:
    """Decorator: a Typer command whose options are the fields of the dataclass ``flags_type``
    (annotated with the aliases above; a dataclass-typed field is an option group such as
    :class:`DataFlags`, its fields become options), calling the decorated function with one
    ``flags_type`` instance. Typer reads a command's options from its signature: this gives it
    the fields as one."""
    parameters = _parameters(flags_type)
    groups = {group for group, _ in parameters if group is not None}
    group_types = get_type_hints(flags_type)

    def decorate(run: Callable[[Flags], None]) -> Callable:
        def command(**values) -> None:
            members = {group: {} for group in groups}
            for group, parameter in parameters:
                if group is not None:
                    members[group][parameter.name] = values.pop(parameter.name)
            grouped = {group: group_types[group](**given) for group, given in members.items()}
            run(flags_type(**values, **grouped))

        command.__name__ = run.__name__
        command.__qualname__ = run.__qualname__
        command.__doc__ = run.__doc__
        command.__module__ = run.__module__
        command.__signature__ = inspect.Signature([p for _, p in parameters])
        command.__annotations__ = {p.name: p.annotation for _, p in parameters}
        return command

    return decorate
