"""The options of ``onnxcomp convert``, as the fields of :class:`ConvertFlags`.

Grouped as the passes run: output, cleanup, pruning, low-rank, equalization, int8, verification;
then the shared data and session groups. :mod:`onnxcomp.cli.convert` builds the typed configs
from them. Only Typer is imported here (``--help`` stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from onnxcomp.cli.options import (
    ActivationType,
    Binarize,
    Calibration,
    DataFlags,
    DebugOpt,
    DimDefaultOpt,
    Equalize,
    ModelArg,
    PruneLatency,
    PruneMethod,
    SessionFlags,
    SparsityScope,
    Target,
    WeightRounding,
)


@dataclass(frozen=True)
class ConvertFlags:
    """Everything ``onnxcomp convert`` is told."""

    model: ModelArg
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Output file (default: <model>.onnxcomp.onnx)."),
    ] = None
    force: Annotated[
        bool, typer.Option("--force", help="Allow the output to replace the input.")
    ] = False
    # --- cleanup ---
    cleanup: Annotated[
        bool, typer.Option("--cleanup/--no-cleanup", help="Constant folding, dead code.")
    ] = True
    fold_batchnorm: Annotated[
        bool, typer.Option("--fold-batchnorm/--no-fold-batchnorm", help="Fold BatchNorm.")
    ] = True
    target_opset: Annotated[
        int | None, typer.Option("--target-opset", help="Convert to this opset first.", min=7)
    ] = None
    # --- pruning ---
    prune: Annotated[
        float | None,
        typer.Option("--prune", help="Fraction of channels to remove per prunable layer pair."),
    ] = None
    prune_method: Annotated[
        PruneMethod,
        typer.Option("--prune-method", help="l1 (data-free) or thinet (needs --calib)."),
    ] = PruneMethod.l1
    prune_macs: Annotated[
        float | None,
        typer.Option(
            "--prune-macs",
            help="Instead of --prune: fraction of MACs to keep, per-group amounts from a "
            "sensitivity scan on --calib.",
        ),
    ] = None
    prune_min_channels: Annotated[
        int, typer.Option("--prune-min-channels", help="Never keep fewer channels.", min=1)
    ] = 4
    prune_multiple: Annotated[
        int,
        typer.Option(
            "--prune-multiple",
            help="Keep channel counts that are multiples of this, strictly (16 suits ONNX "
            "Runtime on AVX-512, 8 on AVX2): its fast NCHWc convolutions only take whole "
            "vectors. A group with fewer than twice as many channels stays whole.",
            min=1,
        ),
    ] = 8
    prune_latency: Annotated[
        PruneLatency | None,
        typer.Option(
            "--prune-latency",
            help="Keep only channel counts (multiples of --prune-multiple) that the int8 or "
            "fp32 convolutions of this machine run faster than any larger count: each pruned "
            "layer is timed in ONNX Runtime at the candidate counts, cached on disk "
            "($ONNXCOMP_CACHE_DIR or ~/.cache/onnxcomp).",
        ),
    ] = None
    prune_exclude: Annotated[
        list[str] | None,
        typer.Option("--prune-exclude", help="Layer name (shell pattern) not to prune; repeat."),
    ] = None
    prune_layer: Annotated[
        list[str] | None,
        typer.Option(
            "--prune-layer",
            help="PATTERN=RATIO: fraction to remove from the channels of matching layers; repeat.",
        ),
    ] = None
    # --- low-rank ---
    lowrank: Annotated[
        bool, typer.Option("--lowrank", help="Factorize Gemm/MatMul/Conv (SVD, Tucker-2).")
    ] = False
    rank_energy: Annotated[
        float,
        typer.Option("--rank-energy", help="Singular-value energy kept by --lowrank.", min=0.0),
    ] = 0.9
    rank_error: Annotated[
        float | None,
        typer.Option(
            "--rank-error",
            help="--lowrank rank per layer: the smallest whose relative output error on --calib "
            "is within this (replaces --rank-energy).",
        ),
    ] = None
    lowrank_refit: Annotated[
        bool,
        typer.Option("--lowrank-refit", help="Fit the --lowrank factors to --calib activations."),
    ] = False
    lowrank_latency: Annotated[
        bool,
        typer.Option(
            "--lowrank-latency",
            help="Keep a factorization only where ONNX Runtime runs it faster than the layer.",
        ),
    ] = False
    # --- equalization ---
    equalize: Annotated[
        Equalize | None,
        typer.Option(
            "--equalize",
            help="Cross-layer equalization: exact (through ReLU), or relu6 (ReLU6 -> ReLU first, "
            "lossy).",
        ),
    ] = None
    # --- binarization ---
    binarize: Annotated[
        Binarize | None,
        typer.Option(
            "--binarize",
            help="1-bit weights (sign x per-channel mean |W|, BWN); full: activations too "
            "(Sign, needs --calib). With --calib the activations are uint8 QDQ, which ONNX "
            "Runtime runs as QLinearConv. Train back with onnxcomp finetune.",
        ),
    ] = None
    binarize_exclude: Annotated[
        list[str] | None,
        typer.Option("--binarize-exclude", help="Layer name (shell pattern) kept float; repeat."),
    ] = None
    binarize_first_last: Annotated[
        bool,
        typer.Option(
            "--binarize-first-last",
            help="Binarize the first and last layers too (float by default).",
        ),
    ] = False
    # --- Deep Compression: magnitude pruning, weight sharing ---
    sparsity: Annotated[
        float | None,
        typer.Option(
            "--sparsity",
            help="Fraction of Conv/Gemm/MatMul weights set to zero, smallest |w| first "
            "(unstructured: a size feature, ONNX Runtime runs the dense zeroed weights).",
        ),
    ] = None
    sparsity_scope: Annotated[
        SparsityScope,
        typer.Option(
            "--sparsity-scope",
            help="layer: the fraction in every layer; global: one |w| threshold for the model.",
        ),
    ] = SparsityScope.layer
    weight_sharing: Annotated[
        int | None,
        typer.Option(
            "--weight-sharing",
            help="K (2-256): each layer's weights replaced by a k-means codebook of K values "
            "(zeros of --sparsity kept); the model stays float, the archive stores indices.",
        ),
    ] = None
    sparse_initializers: Annotated[
        bool,
        typer.Option(
            "--sparse-initializers",
            help="Write float weights with more than 2/3 zeros (e.g. after --sparsity) as ONNX "
            "sparse_initializer: values + int64 indices, smaller on disk; ONNX Runtime "
            "densifies them when it loads the model. Says so in one line when none is.",
        ),
    ] = False
    compress_first_layer: Annotated[
        bool,
        typer.Option(
            "--compress-first-layer",
            help="Apply --sparsity and --weight-sharing to the first layer too (left as it "
            "is by default).",
        ),
    ] = False
    # --- int4 weights ---
    int4_weights: Annotated[
        bool,
        typer.Option(
            "--int4-weights",
            help="Conv/Gemm weights as INT4 per output channel behind DequantizeLinear "
            "(opset 21), activations float; --weight-rounding nearest or gptq (needs --calib). "
            "A size feature: ONNX Runtime keeps the DequantizeLinear and runs a float conv "
            "(dequantized on every run: slower than fp32, not faster). First and last layers "
            "stay float. Not deployable as .ort.",
        ),
    ] = False
    int4_first_last: Annotated[
        bool,
        typer.Option(
            "--int4-first-last", help="With --int4-weights, quantize the first and last layers."
        ),
    ] = False
    # --- int8 ---
    int8: Annotated[bool, typer.Option("--int8", help="Quantize to int8 (QDQ).")] = False
    calib: Annotated[
        Path | None,
        typer.Option("--calib", help="Calibration data: image folder, .npy or .npz."),
    ] = None
    calib_size: Annotated[
        int, typer.Option("--calib-size", help="Calibration samples (seeded, balanced).", min=1)
    ] = 512
    calibration: Annotated[
        Calibration,
        typer.Option(
            "--calibration", help="Range method: minmax, percentile, entropy, mse or dfp."
        ),
    ] = Calibration.mse
    percentile: Annotated[
        float, typer.Option("--percentile", help="Percentile for --calibration percentile.")
    ] = 99.99
    calib_cache: Annotated[
        Path | None,
        typer.Option("--calib-cache", help="Calibration table: written, and reused if present."),
    ] = None
    target: Annotated[
        Target,
        typer.Option(
            "--target",
            help="Hardware: x86 (U8S8; 7-bit weights when this CPU has no VNNI), x86-vnni, "
            "x86-avx2, arm (U8S8), tensorrt (S8S8).",
        ),
    ] = Target.x86
    activation_type: Annotated[
        ActivationType | None,
        typer.Option("--activation-type", help="uint8 or int8 (default: target's)."),
    ] = None
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="Per-tensor weight scales.")] = (
        False
    )
    reduce_range: Annotated[
        bool | None,
        typer.Option(
            "--reduce-range/--no-reduce-range",
            help="7-bit weights (default: the target's choice; x86: when this CPU has no VNNI).",
        ),
    ] = None
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Node to keep in float (repeatable).")
    ] = None
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            help="Keep the most sensitive layers in float until accuracy (with labels, else "
            "top-1 agreement) drops by at most this many points, measured on --data.",
            min=0.0,
        ),
    ] = None
    weight_rounding: Annotated[
        WeightRounding,
        typer.Option(
            "--weight-rounding",
            help="nearest; gptq (error-compensating); adaround (learned up/down rounding, "
            "Nagel et al. 2020: 1,000 Adam steps per layer on the calibration inputs' Gram "
            "matrix: about 1.5 min for ResNet-20, 6 min for ResNet-56 on 2 cores; needs the "
            "torch extra). --int4-weights takes nearest or gptq.",
        ),
    ] = WeightRounding.nearest
    bias_correction: Annotated[
        bool | None,
        typer.Option(
            "--bias-correction/--no-bias-correction",
            help="Correct the int8 weight error's bias (default: on for models with depthwise "
            "convolutions).",
        ),
    ] = None
    # --- verification and report ---
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare with the original.")
    ] = True
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Max relative error of lossless passes.")
    ] = 1e-4
    report: Annotated[
        Path | None, typer.Option("--report", help="Write the report as JSON here.")
    ] = None
    # --- shared groups ---
    inputs: DataFlags = field(default_factory=DataFlags)
    dim_default: DimDefaultOpt = 1
    session: SessionFlags = field(default_factory=SessionFlags)
    debug: DebugOpt = False
