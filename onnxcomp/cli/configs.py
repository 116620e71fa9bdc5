"""The shared option groups turned into typed configs: preprocessing, data, session.

Imports onnx and ONNX Runtime (through the config classes): the commands import this module at
the top of their function, not at module level, so that ``--help`` stays fast.
"""

from __future__ import annotations

from typing import TypeVar

from onnxcomp.backends.ort import SessionConfig
from onnxcomp.cli.options import DataFlags, PreprocessFlags, SessionFlags
from onnxcomp.data import Preprocess, get_preset, load_preprocess_config
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError

Options = TypeVar("Options", bound=DataOptions)


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"{flag} '{text}': expected comma-separated numbers") from None


def preprocess(flags: PreprocessFlags) -> Preprocess | None:
    """The preset or config file, with the single options given on top; ``None`` when none of
    them is given."""
    if flags.preprocess_config:
        base = load_preprocess_config(flags.preprocess_config)
    else:
        base = get_preset(flags.preset) if flags.preset else None
    overrides = {
        "resize": flags.resize,
        "center_crop": flags.crop,
        "mean": _floats(flags.mean, "--mean"),
        "std": _floats(flags.std, "--std"),
        "scale": flags.scale,
        "channel_order": None if flags.bgr is None else ("BGR" if flags.bgr else "RGB"),
        "layout": flags.layout.upper() if flags.layout else None,
        "grayscale": flags.grayscale,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if base is None and not overrides:
        return None
    return (base or Preprocess()).with_overrides(**overrides)


def data_options(
    flags: DataFlags, pre: Preprocess | None, kind: type[Options] = DataOptions, **given
) -> Options:
    """The samples to run: ``--data`` (at most ``--limit``), else ``--samples`` random ones.

    ``kind``: :class:`DataOptions` or a subclass (``VerifyOptions``); ``given``: its other
    fields (``dim_default``, ``tolerance``), or fields that replace the flags' values.
    """
    values = {
        "data": flags.data,
        "preprocess": pre,
        "limit": flags.limit,
        "samples": flags.samples,
        "batch_size": flags.batch_size,
    }
    return kind(**(values | given))


def session_config(flags: SessionFlags, **extra) -> SessionConfig:
    """The ONNX Runtime session; ``extra``: further :class:`SessionConfig` fields."""
    return SessionConfig(
        provider=flags.provider,
        allow_cpu_fallback=flags.allow_cpu_fallback,
        intra_op_threads=flags.threads,
        **extra,
    )
