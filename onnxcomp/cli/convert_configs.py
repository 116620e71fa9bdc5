"""``convert``'s flags turned into the typed configs of the pipeline, before anything is read.

Every config is built here, and so validated (configs check their values when they are built),
before the model is loaded or any data is read: a wrong option fails at once, in one line. The
checks that involve several options (``--int8`` needs ``--calib``, ``--prune`` or
``--prune-macs`` ...) are here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onnxcomp.backends.ort import SessionConfig
from onnxcomp.cli.configs import data_options, preprocess, session_config
from onnxcomp.cli.convert_options import ConvertFlags
from onnxcomp.cli.options import PruneMethod
from onnxcomp.converter.binarize import BinarizeConfig
from onnxcomp.converter.lowrank import LowRankConfig
from onnxcomp.converter.pipeline import PipelineOptions
from onnxcomp.converter.prune import PruneConfig
from onnxcomp.converter.quantize import Int4Config
from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
from onnxcomp.converter.share import ShareConfig
from onnxcomp.converter.sparsify import SparsityConfig
from onnxcomp.converter.verify import VerifyOptions
from onnxcomp.data import Preprocess
from onnxcomp.data.batches import DataOptions
from onnxcomp.errors import OptionError


@dataclass(frozen=True)
class ConvertJob:
    """What ``convert`` runs: where it writes, the passes, the data, the checks."""

    output: Path
    pipeline: PipelineOptions
    verify: VerifyOptions | None
    calibration: DataOptions | None
    session: SessionConfig
    sparse_initializers: bool = False


def convert_job(flags: ConvertFlags) -> ConvertJob:
    """All of ``convert``'s configs, checked; raises :class:`OptionError` on a wrong option."""
    pre = preprocess(flags.inputs)
    quantize = quantize_config(flags)
    verify = verify_options(flags, pre)
    lowrank = lowrank_config(flags)
    prune = prune_config(flags)
    pipeline = PipelineOptions(
        cleanup=flags.cleanup,
        fold_batchnorm=flags.fold_batchnorm,
        prune=prune,
        lowrank=lowrank,
        equalize=flags.equalize.value if flags.equalize else None,
        int8=quantize,
        binarize=binarize_config(flags),
        sparsity=sparsity_config(flags),
        sharing=share_config(flags),
        int4=int4_config(flags),
        target_opset=flags.target_opset,
    )
    return ConvertJob(
        output=flags.output or flags.model.with_name(flags.model.stem + ".onnxcomp.onnx"),
        pipeline=pipeline,
        verify=verify,
        calibration=calibration_data(flags, pre),
        session=session_config(flags.session),
        sparse_initializers=flags.sparse_initializers,
    )


def calibration_data(flags: ConvertFlags, pre: Preprocess | None) -> DataOptions | None:
    """``--calib``: at most ``--calib-size`` samples, in batches of at least 32."""
    if flags.calib is None:
        return None
    return DataOptions(
        data=flags.calib,
        preprocess=pre,
        limit=flags.calib_size,
        batch_size=max(flags.inputs.batch_size, 32),
    )


def quantize_config(flags: ConvertFlags) -> QuantizeConfig | None:
    """``--int8`` and its options."""
    if not flags.int8:
        return None
    if flags.calib is None and flags.calib_cache is None:
        raise OptionError("--int8 needs calibration data: add --calib DIR (or --calib-cache)")
    return QuantizeConfig(
        calibration=flags.calibration.value,
        percentile=flags.percentile,
        target=flags.target.value,
        activation_type=flags.activation_type.value if flags.activation_type else None,
        per_channel=not flags.per_tensor,
        reduce_range=flags.reduce_range,
        calib_cache=flags.calib_cache,
        exclude_nodes=tuple(flags.exclude or ()),
        max_drop=flags.max_drop,
        weight_rounding=flags.weight_rounding.value,
        bias_correction=flags.bias_correction,
    )


def binarize_config(flags: ConvertFlags) -> BinarizeConfig | None:
    """``--binarize`` and its options."""
    if flags.binarize is None:
        if flags.binarize_exclude or flags.binarize_first_last:
            raise OptionError("--binarize-exclude and --binarize-first-last need --binarize")
        return None
    if flags.binarize.value == "full" and flags.calib is None:
        raise OptionError(
            "--binarize full needs calibration data for its activation scales: add --calib DIR"
        )
    return BinarizeConfig(
        mode=flags.binarize.value,
        exclude=tuple(flags.binarize_exclude or ()),
        first_last=flags.binarize_first_last,
    )


def sparsity_config(flags: ConvertFlags) -> SparsityConfig | None:
    """``--sparsity`` and its scope."""
    if flags.sparsity is None:
        return None
    return SparsityConfig(
        sparsity=flags.sparsity,
        scope=flags.sparsity_scope.value,
        first_layer=flags.compress_first_layer,
    )


def share_config(flags: ConvertFlags) -> ShareConfig | None:
    """``--weight-sharing K``."""
    if flags.weight_sharing is None:
        return None
    return ShareConfig(clusters=flags.weight_sharing, first_layer=flags.compress_first_layer)


def int4_config(flags: ConvertFlags) -> Int4Config | None:
    """``--int4-weights`` with its rounding."""
    if not flags.int4_weights:
        if flags.int4_first_last:
            raise OptionError("--int4-first-last needs --int4-weights")
        return None
    config = Int4Config(rounding=flags.weight_rounding.value, first_last=flags.int4_first_last)
    if config.rounding == "gptq" and flags.calib is None:
        raise OptionError(
            "--int4-weights --weight-rounding gptq reads calibration data: add --calib DIR"
        )
    return config


def verify_options(flags: ConvertFlags, pre: Preprocess | None) -> VerifyOptions | None:
    """``--verify`` on ``--data``; with ``--int8`` and no ``--data``, on the calibration
    samples (``--calib-size`` of them unless ``--limit`` says otherwise)."""
    if not flags.verify:
        return None
    inputs = flags.inputs
    on_calibration = inputs.data is None and flags.int8 and flags.calib is not None
    limit = inputs.limit
    if on_calibration and limit is None:
        limit = flags.calib_size
    return data_options(
        inputs,
        pre,
        VerifyOptions,
        data=flags.calib if on_calibration else inputs.data,
        limit=limit,
        dim_default=flags.dim_default,
        tolerance=flags.tolerance,
    )


def lowrank_config(flags: ConvertFlags) -> LowRankConfig | None:
    """``--lowrank`` and its options."""
    if not flags.lowrank:
        return None
    if not 0.0 < flags.rank_energy <= 1.0:
        raise OptionError(f"--rank-energy {flags.rank_energy}: give a fraction in (0, 1]")
    if flags.rank_error is not None and not 0.0 < flags.rank_error < 1.0:
        raise OptionError(f"--rank-error {flags.rank_error}: give a fraction in (0, 1)")
    if (flags.rank_error is not None or flags.lowrank_refit) and flags.calib is None:
        raise OptionError("--rank-error and --lowrank-refit need calibration data: add --calib DIR")
    return LowRankConfig(
        rank_energy=flags.rank_energy,
        output_error=flags.rank_error,
        refit=flags.lowrank_refit,
        measure_latency=flags.lowrank_latency,
    )


def prune_config(flags: ConvertFlags) -> PruneConfig | None:
    """``--prune`` (a ratio) or ``--prune-macs`` (MACs to keep), and their options."""
    if flags.prune is not None and flags.prune_macs is not None:
        raise OptionError("give either --prune (a ratio) or --prune-macs (MACs to keep)")
    if flags.prune is None and flags.prune_macs is None:
        return None
    if flags.prune_method is PruneMethod.thinet and flags.calib is None:
        raise OptionError("--prune-method thinet needs calibration data: add --calib DIR")
    if flags.prune_macs is not None and flags.calib is None:
        raise OptionError(
            "--prune-macs needs calibration data for its sensitivity scan: add --calib DIR"
        )
    return PruneConfig(
        ratio=flags.prune,
        macs=flags.prune_macs,
        method=flags.prune_method.value,
        min_channels=flags.prune_min_channels,
        multiple=flags.prune_multiple,
        latency=flags.prune_latency.value if flags.prune_latency is not None else None,
        exclude=tuple(flags.prune_exclude or ()),
        overrides=tuple(layer_ratio(item) for item in flags.prune_layer or ()),
    )


def layer_ratio(item: str) -> tuple[str, float]:
    """--prune-layer PATTERN=RATIO."""
    pattern, sep, ratio = item.rpartition("=")
    try:
        value = float(ratio)
    except ValueError:
        value = -1.0
    if not sep or not pattern or not 0.0 <= value < 1.0:
        raise OptionError(
            f"--prune-layer {item!r}: give PATTERN=RATIO with a ratio in [0, 1), "
            "e.g. --prune-layer 'layer1.*=0.3'"
        )
    return pattern, value
