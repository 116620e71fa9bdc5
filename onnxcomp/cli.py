"""The ``onnxcomp`` command line (Typer for arguments, Rich for tables and progress)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from onnxcomp import __version__
from onnxcomp.errors import OnnxcompError

app = typer.Typer(
    name="onnxcomp",
    help="Compress trained ONNX models and prove they still work.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@dataclass
class _State:
    debug: bool = False


STATE = _State()

# --- shared options -------------------------------------------------------------------------

ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", show_default=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
ProviderOpt = Annotated[
    str, typer.Option("--provider", help="Execution provider: cpu, cuda or tensorrt.")
]
FallbackOpt = Annotated[
    bool, typer.Option("--allow-cpu-fallback", help="Run on CPU if the provider is missing.")
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="ONNX Runtime intra-op threads.", min=1)
]
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
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Samples per batch.", min=1)]
DimDefaultOpt = Annotated[
    int, typer.Option("--dim-default", help="Value for dynamic dims other than batch.", min=1)
]


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OnnxcompError(f"{flag} '{text}': expected comma-separated numbers") from None


def _preprocess(
    preset: str | None,
    config: Path | None,
    resize: int | None,
    crop: int | None,
    mean: str | None,
    std: str | None,
    scale: float | None,
    bgr: bool | None,
    layout: str | None,
    grayscale: bool | None,
):
    from onnxcomp.data import Preprocess, get_preset, load_preprocess_config

    base = load_preprocess_config(config) if config else (get_preset(preset) if preset else None)
    overrides = {
        "resize": resize,
        "center_crop": crop,
        "mean": _floats(mean, "--mean"),
        "std": _floats(std, "--std"),
        "scale": scale,
        "channel_order": None if bgr is None else ("BGR" if bgr else "RGB"),
        "layout": layout.upper() if layout else None,
        "grayscale": grayscale,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if base is None and not overrides:
        return None
    return (base or Preprocess()).with_overrides(**overrides)


def _session_config(provider: str, fallback: bool, threads: int | None, **extra):
    from onnxcomp.backends.ort import SessionConfig

    return SessionConfig(
        provider=provider, allow_cpu_fallback=fallback, intra_op_threads=threads, **extra
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


def _set_debug(debug: bool) -> None:
    STATE.debug = STATE.debug or debug


# --- commands -------------------------------------------------------------------------------


@app.callback()
def _root(
    debug: DebugOpt = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)
    ] = False,
) -> None:
    """Compress trained ONNX models and prove they still work."""
    _set_debug(debug)
    if version:
        console.print(f"onnxcomp {__version__}")
        raise typer.Exit()


def _layer_ratio(item: str) -> tuple[str, float]:
    """--prune-layer PATTERN=RATIO."""
    pattern, sep, ratio = item.rpartition("=")
    try:
        value = float(ratio)
    except ValueError:
        value = -1.0
    if not sep or not pattern or not 0.0 <= value < 1.0:
        raise OnnxcompError(
            f"--prune-layer {item!r}: give PATTERN=RATIO with a ratio in [0, 1), "
            "e.g. --prune-layer 'layer1.*=0.3'"
        )
    return pattern, value


@app.command()
def inspect(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    batch: Annotated[int, typer.Option("--batch", help="Batch size for MAC counts.", min=1)] = 1,
    dim_default: DimDefaultOpt = 1,
    top: Annotated[int, typer.Option("--top", help="Layers to list by MACs.", min=1)] = 20,
    debug: DebugOpt = False,
) -> None:
    """Show what a model is: opset, inputs, op histogram, parameters, size and MACs."""
    _set_debug(debug)
    from onnxcomp.core.analysis import summarize
    from onnxcomp.core.io import check_model, read_proto
    from onnxcomp.report import render_summary

    proto = read_proto(model)
    check_model(model, proto)
    summary = summarize(proto, path=model, batch=batch, dim_default=dim_default)
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        render_summary(summary, console, top=top)


@app.command()
def convert(
    model: ModelArg,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Output file (default: <model>.onnxcomp.onnx)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Allow the output to replace the input.")
    ] = False,
    cleanup: Annotated[
        bool, typer.Option("--cleanup/--no-cleanup", help="Constant folding, dead code.")
    ] = True,
    fold_batchnorm: Annotated[
        bool, typer.Option("--fold-batchnorm/--no-fold-batchnorm", help="Fold BatchNorm.")
    ] = True,
    target_opset: Annotated[
        int | None, typer.Option("--target-opset", help="Convert to this opset first.", min=7)
    ] = None,
    prune: Annotated[
        float | None,
        typer.Option("--prune", help="Fraction of channels to remove per prunable layer pair."),
    ] = None,
    prune_method: Annotated[
        str, typer.Option("--prune-method", help="l1 (data-free) or thinet (needs --calib).")
    ] = "l1",
    prune_macs: Annotated[
        float | None,
        typer.Option(
            "--prune-macs",
            help="Instead of --prune: fraction of MACs to keep, per-group amounts from a "
            "sensitivity scan on --calib.",
        ),
    ] = None,
    prune_min_channels: Annotated[
        int, typer.Option("--prune-min-channels", help="Never keep fewer channels.", min=1)
    ] = 4,
    prune_multiple: Annotated[
        int,
        typer.Option(
            "--prune-multiple",
            help="Keep channel counts that are multiples of this, strictly (16 suits ONNX "
            "Runtime on AVX-512, 8 on AVX2): its fast NCHWc convolutions only take whole "
            "vectors. A group with fewer than twice as many channels stays whole.",
            min=1,
        ),
    ] = 8,
    prune_exclude: Annotated[
        list[str] | None,
        typer.Option("--prune-exclude", help="Layer name (shell pattern) not to prune; repeat."),
    ] = None,
    prune_layer: Annotated[
        list[str] | None,
        typer.Option(
            "--prune-layer",
            help="PATTERN=RATIO: fraction to remove from the channels of matching layers; repeat.",
        ),
    ] = None,
    lowrank: Annotated[
        bool, typer.Option("--lowrank", help="Factorize Gemm/MatMul/Conv (SVD, Tucker-2).")
    ] = False,
    rank_energy: Annotated[
        float,
        typer.Option("--rank-energy", help="Singular-value energy kept by --lowrank.", min=0.0),
    ] = 0.9,
    rank_error: Annotated[
        float | None,
        typer.Option(
            "--rank-error",
            help="--lowrank rank per layer: the smallest whose relative output error on --calib "
            "is within this (replaces --rank-energy).",
        ),
    ] = None,
    lowrank_refit: Annotated[
        bool,
        typer.Option("--lowrank-refit", help="Fit the --lowrank factors to --calib activations."),
    ] = False,
    lowrank_latency: Annotated[
        bool,
        typer.Option(
            "--lowrank-latency",
            help="Keep a factorization only where ONNX Runtime runs it faster than the layer.",
        ),
    ] = False,
    equalize: Annotated[
        str | None,
        typer.Option(
            "--equalize",
            help="Cross-layer equalization: exact (through ReLU), or relu6 (ReLU6 -> ReLU first, "
            "lossy).",
        ),
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Quantize to int8 (QDQ).")] = False,
    calib: Annotated[
        Path | None,
        typer.Option("--calib", help="Calibration data: image folder, .npy or .npz."),
    ] = None,
    calib_size: Annotated[
        int, typer.Option("--calib-size", help="Calibration samples (seeded, balanced).", min=1)
    ] = 512,
    calibration: Annotated[
        str,
        typer.Option(
            "--calibration", help="Range method: minmax, percentile, entropy, mse or dfp."
        ),
    ] = "mse",
    percentile: Annotated[
        float, typer.Option("--percentile", help="Percentile for --calibration percentile.")
    ] = 99.99,
    calib_cache: Annotated[
        Path | None,
        typer.Option("--calib-cache", help="Calibration table: written, and reused if present."),
    ] = None,
    target: Annotated[
        str, typer.Option("--target", help="Hardware: x86 (U8S8), arm, tensorrt (S8S8).")
    ] = "x86",
    activation_type: Annotated[
        str | None, typer.Option("--activation-type", help="uint8 or int8 (default: target's).")
    ] = None,
    per_tensor: Annotated[
        bool, typer.Option("--per-tensor", help="Per-tensor weight scales.")
    ] = False,
    reduce_range: Annotated[
        bool, typer.Option("--reduce-range", help="7-bit weights (old CPUs without VNNI).")
    ] = False,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Node to keep in float (repeatable).")
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            help="Keep the most sensitive layers in float until accuracy (with labels, else "
            "top-1 agreement) drops by at most this many points, measured on --data.",
            min=0.0,
        ),
    ] = None,
    weight_rounding: Annotated[
        str, typer.Option("--weight-rounding", help="nearest, or gptq (error-compensating).")
    ] = "nearest",
    bias_correction: Annotated[
        bool, typer.Option("--bias-correction", help="Correct the int8 weight error's bias.")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare with the original.")
    ] = True,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Max relative error of lossless passes.")
    ] = 1e-4,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write the report as JSON here.")
    ] = None,
    data: DataOpt = None,
    preset: PresetOpt = None,
    preprocess_config: PreprocessConfigOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    scale: ScaleOpt = None,
    bgr: BgrOpt = None,
    layout: LayoutOpt = None,
    grayscale: GrayOpt = None,
    limit: LimitOpt = None,
    samples: SamplesOpt = 16,
    batch_size: BatchSizeOpt = 8,
    dim_default: DimDefaultOpt = 1,
    provider: ProviderOpt = "cpu",
    allow_cpu_fallback: FallbackOpt = False,
    threads: ThreadsOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run the compression passes, verify the result against the original, save it."""
    _set_debug(debug)
    from onnxcomp.converter.convert import ConvertHooks
    from onnxcomp.converter.convert import convert as run_convert
    from onnxcomp.converter.lowrank.lowrank_pass import LowRankConfig
    from onnxcomp.converter.pipeline import PipelineOptions
    from onnxcomp.converter.prune.prune_pass import PruneConfig
    from onnxcomp.converter.quantize.quantize_pass import QuantizeConfig
    from onnxcomp.converter.verify import VerifyOptions
    from onnxcomp.data.batches import DataOptions
    from onnxcomp.report import human_bytes, render_fidelity, render_passes

    output = output or model.with_name(model.stem + ".onnxcomp.onnx")
    pre = _preprocess(
        preset, preprocess_config, resize, crop, mean, std, scale, bgr, layout, grayscale
    )
    if int8 and calib is None and calib_cache is None:
        raise OnnxcompError("--int8 needs calibration data: add --calib DIR (or --calib-cache)")
    calibration_data = (
        DataOptions(data=calib, preprocess=pre, limit=calib_size, batch_size=max(batch_size, 32))
        if calib is not None
        else None
    )
    quantize = (
        QuantizeConfig(
            calibration=calibration,
            percentile=percentile,
            target=target,
            activation_type=activation_type,
            per_channel=not per_tensor,
            reduce_range=reduce_range,
            calib_cache=calib_cache,
            exclude_nodes=tuple(exclude or ()),
            max_drop=max_drop,
            weight_rounding=weight_rounding,
            bias_correction=bias_correction,
        )
        if int8
        else None
    )
    verify_data = data if data is not None or not int8 else calib
    if verify_data is calib and calib is not None and limit is None:
        limit = calib_size
    verify_options = (
        VerifyOptions(
            data=verify_data,
            preprocess=pre,
            limit=limit,
            samples=samples,
            batch_size=batch_size,
            dim_default=dim_default,
            tolerance=tolerance,
        )
        if verify
        else None
    )
    if lowrank and not 0.0 < rank_energy <= 1.0:
        raise OnnxcompError(f"--rank-energy {rank_energy}: give a fraction in (0, 1]")
    if lowrank and rank_error is not None and not 0.0 < rank_error < 1.0:
        raise OnnxcompError(f"--rank-error {rank_error}: give a fraction in (0, 1)")
    if lowrank and (rank_error is not None or lowrank_refit) and calib is None:
        raise OnnxcompError(
            "--rank-error and --lowrank-refit need calibration data: add --calib DIR"
        )
    if prune is not None and prune_macs is not None:
        raise OnnxcompError("give either --prune (a ratio) or --prune-macs (MACs to keep)")
    pruning = prune is not None or prune_macs is not None
    if pruning and prune_method == "thinet" and calib is None:
        raise OnnxcompError("--prune-method thinet needs calibration data: add --calib DIR")
    if prune_macs is not None and calib is None:
        raise OnnxcompError(
            "--prune-macs needs calibration data for its sensitivity scan: add --calib DIR"
        )
    prune_config = (
        PruneConfig(
            ratio=prune,
            macs=prune_macs,
            method=prune_method,
            min_channels=prune_min_channels,
            multiple=prune_multiple,
            exclude=tuple(prune_exclude or ()),
            overrides=tuple(_layer_ratio(item) for item in prune_layer or ()),
        )
        if pruning
        else None
    )
    options = PipelineOptions(
        cleanup=cleanup,
        fold_batchnorm=fold_batchnorm,
        prune=prune_config,
        lowrank=LowRankConfig(
            rank_energy=rank_energy,
            output_error=rank_error,
            refit=lowrank_refit,
            measure_latency=lowrank_latency,
        )
        if lowrank
        else None,
        equalize=equalize,
        int8=quantize,
        target_opset=target_opset,
    )
    with _progress() as progress:
        task = progress.add_task("passes", total=None)

        def on_pass(name: str) -> None:
            progress.update(task, description=f"pass: {name}", total=None, completed=0)

        def on_task(description: str, total: int | None) -> None:
            progress.update(task, description=description, total=total, completed=0)

        def on_advance(n: int) -> None:
            progress.advance(task, n)

        result = run_convert(
            model,
            output,
            options,
            verify_options,
            _session_config(provider, allow_cpu_fallback, threads),
            force=force,
            hooks=ConvertHooks(on_pass, on_task, on_advance),
            calibration=calibration_data,
        )
    render_passes(result.records, console)
    if result.fidelity is not None:
        render_fidelity(result.fidelity, console)
    else:
        console.print("[yellow]verification skipped (--no-verify)[/]")
    console.print(
        f"wrote {result.output_path}: {human_bytes(result.output_bytes)} "
        f"(was {human_bytes(result.input_bytes)}) in {result.seconds:.1f}s"
    )
    if report:
        report.write_text(json.dumps(result.to_dict(), indent=2))


@app.command()
def compare(
    model_a: ModelArg,
    model_b: ModelArg,
    data: DataOpt = None,
    preset: PresetOpt = None,
    preprocess_config: PreprocessConfigOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    scale: ScaleOpt = None,
    bgr: BgrOpt = None,
    layout: LayoutOpt = None,
    grayscale: GrayOpt = None,
    limit: LimitOpt = None,
    samples: SamplesOpt = 16,
    batch_size: BatchSizeOpt = 8,
    dim_default: DimDefaultOpt = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    provider: ProviderOpt = "cpu",
    allow_cpu_fallback: FallbackOpt = False,
    threads: ThreadsOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Fidelity of B against A on the same inputs, and accuracy of each on labelled data."""
    _set_debug(debug)
    from onnxcomp.converter.verify import VerifyOptions, verify_files
    from onnxcomp.core.io import check_model
    from onnxcomp.report import render_fidelity

    for path in (model_a, model_b):
        check_model(path)
    pre = _preprocess(
        preset, preprocess_config, resize, crop, mean, std, scale, bgr, layout, grayscale
    )
    options = VerifyOptions(
        data=data,
        preprocess=pre,
        limit=limit,
        samples=samples,
        batch_size=batch_size,
        dim_default=dim_default,
    )
    with _progress() as progress:
        task = progress.add_task("comparing", total=None)
        fidelity = verify_files(
            model_a,
            model_b,
            options,
            _session_config(provider, allow_cpu_fallback, threads),
            on_batch=lambda n: progress.advance(task, n),
            on_start=lambda count: progress.update(task, total=count),
        )
    if as_json:
        print(json.dumps(fidelity.to_dict(), indent=2))
    else:
        render_fidelity(fidelity, console, names=(model_a.name, model_b.name))


@app.command()
def debug(
    fp32_model: ModelArg,
    int8_model: ModelArg,
    data: DataOpt = None,
    preset: PresetOpt = None,
    preprocess_config: PreprocessConfigOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    scale: ScaleOpt = None,
    bgr: BgrOpt = None,
    layout: LayoutOpt = None,
    grayscale: GrayOpt = None,
    limit: LimitOpt = None,
    samples: SamplesOpt = 16,
    batch_size: BatchSizeOpt = 32,
    top: Annotated[int, typer.Option("--top", help="Layers to list.", min=1)] = 25,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    debug_flag: DebugOpt = False,
) -> None:
    """Per-layer SQNR of weights and activations of an int8 model, worst first."""
    _set_debug(debug_flag)
    from onnxcomp.converter.debug import debug_models, render_debug
    from onnxcomp.core.io import check_model
    from onnxcomp.data.batches import DataOptions

    for path in (fp32_model, int8_model):
        check_model(path)
    pre = _preprocess(
        preset, preprocess_config, resize, crop, mean, std, scale, bgr, layout, grayscale
    )
    options = DataOptions(
        data=data, preprocess=pre, limit=limit, samples=samples, batch_size=batch_size
    )
    with _progress() as progress:
        task = progress.add_task("debugging", total=None)
        report = debug_models(
            fp32_model, int8_model, options, on_batch=lambda n: progress.advance(task, n)
        )
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_debug(report, console, top=top)


@app.command()
def bench(
    model: ModelArg,
    compare_with: Annotated[
        Path | None, typer.Option("--compare", help="Second model, run interleaved.")
    ] = None,
    batch: Annotated[int, typer.Option("--batch", help="Batch size.", min=1)] = 1,
    threads: ThreadsOpt = None,
    provider: ProviderOpt = "cpu",
    allow_cpu_fallback: FallbackOpt = False,
    warmup: Annotated[int, typer.Option("--warmup", help="Warm-up runs.", min=0)] = 10,
    iterations: Annotated[
        int | None, typer.Option("--iterations", help="Timed runs (default: by --time).")
    ] = None,
    min_time: Annotated[float, typer.Option("--time", help="Seconds of timed runs.")] = 2.0,
    dim_default: DimDefaultOpt = 1,
    save_optimized: Annotated[
        Path | None,
        typer.Option("--save-optimized", help="Save ONNX Runtime's optimized graph here."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Latency (p50/p90/p99), throughput and memory; with --compare, the speed ratio."""
    _set_debug(debug)
    from dataclasses import asdict

    from onnxcomp.backends.bench import benchmark, render_bench
    from onnxcomp.core.io import check_model

    models = [model] + ([compare_with] if compare_with else [])
    for path in models:
        check_model(path)
    config = _session_config(
        provider,
        allow_cpu_fallback,
        threads,
        optimized_model_path=str(save_optimized) if save_optimized else None,
    )
    with _progress() as progress:
        task = progress.add_task("benchmark", total=1.0)
        results = benchmark(
            models,
            config,
            batch=batch,
            dim_default=dim_default,
            warmup=warmup,
            iterations=iterations,
            min_time_s=min_time,
            progress=lambda d, f: progress.update(task, description=d, completed=f),
        )
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        render_bench(results, console)


@app.command()
def export(
    factory: Annotated[
        str, typer.Argument(help="Python callable returning a torch.nn.Module: 'pkg.mod:fn'.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx file.")],
    input_shape: Annotated[
        str, typer.Option("--input-shape", help="Example input shape, e.g. 1,3,32,32.")
    ] = "1,3,32,32",
    state_dict: Annotated[
        Path | None, typer.Option("--state-dict", help="torch checkpoint to load first.")
    ] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.", min=7)] = 17,
    keep_batchnorm: Annotated[
        bool, typer.Option("--keep-batchnorm", help="Keep BatchNormalization nodes.")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Export a torch.nn.Module with deployment defaults (eval mode, dynamic batch, one file)."""
    _set_debug(debug)
    import importlib

    from onnxcomp.export import export_torch

    module_name, _, attr = factory.partition(":")
    if not attr:
        raise OnnxcompError(f"'{factory}': expected 'package.module:callable'")
    try:
        module = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError) as exc:
        raise OnnxcompError(f"'{factory}': cannot import it: {exc}") from exc
    if state_dict is not None:
        import torch

        if not state_dict.is_file():
            raise OnnxcompError(f"{state_dict}: no such file")
        state = torch.load(state_dict, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        module.load_state_dict(state)
    try:
        shape = tuple(int(d) for d in input_shape.split(","))
    except ValueError:
        raise OnnxcompError(f"--input-shape '{input_shape}': expected e.g. 1,3,32,32") from None
    path = export_torch(
        module, output, input_shape=shape, opset=opset, keep_batchnorm=keep_batchnorm
    )
    console.print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line for bad input (exit 2); tracebacks only with --debug."""
    STATE.debug = False
    from onnxcomp.backends.ort import check_runtime_install

    warning = check_runtime_install()
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    try:
        app(args=argv, prog_name="onnxcomp")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OnnxcompError as exc:
        if STATE.debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:
        if STATE.debug:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
            "(run again with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
