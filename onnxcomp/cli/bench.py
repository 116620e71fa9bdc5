"""``onnxcomp bench``: latency, throughput and memory, alone or against a second model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from onnxcomp.cli.options import (
    DebugOpt,
    DimDefaultOpt,
    FallbackOpt,
    JsonOpt,
    ModelArg,
    ProviderOpt,
    SessionFlags,
    ThreadsOpt,
)
from onnxcomp.cli.progress import progress_bar
from onnxcomp.cli.root import console, set_debug


def bench(
    model: ModelArg,
    compare_with: Annotated[
        Path | None, typer.Option("--compare", help="Second model, run interleaved.")
    ] = None,
    batch: Annotated[
        int,
        typer.Option("--batch", help="Batch size (a model that fixes its batch: its own).", min=1),
    ] = 1,
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
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Latency (p50/p90/p99), throughput and memory; with --compare, the speed ratio."""
    # Imported here so that --help does not load onnx and ONNX Runtime.
    from onnxcomp.backends.bench import benchmark, render_bench
    from onnxcomp.cli.configs import session_config
    from onnxcomp.core.io import check_model

    set_debug(debug)
    config = session_config(
        SessionFlags(provider, allow_cpu_fallback, threads),
        optimized_model_path=str(save_optimized) if save_optimized else None,
    )
    models = [model] + ([compare_with] if compare_with else [])
    for path in models:
        if path.suffix.lower() != ".tflite":  # .tflite files are checked by their interpreter
            check_model(path)
    with progress_bar("benchmark", total=1.0) as bar:
        results = benchmark(
            models,
            config,
            batch=batch,
            dim_default=dim_default,
            warmup=warmup,
            iterations=iterations,
            min_time_s=min_time,
            progress=bar.show,
        )
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        render_bench(results, console)
