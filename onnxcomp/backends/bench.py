"""``onnxcomp bench``: latency, throughput and memory of models on the same random inputs.

Timed runs are interleaved (A, B, A, B, ...) so machine noise hits every model equally.

Memory: ``memory_growth_bytes`` is the growth of the process RSS from just before a model's
session is created to the highest RSS sampled while it is created and warmed up (weights,
ORT's arenas, pre-packed kernels). Sessions are created one after another and all stay alive,
so a later model can reuse memory freed by an earlier one and read a little low, while the
first one also pays ONNX Runtime's one-time start-up (a few MiB); treat it as
an estimate for comparing models, not an exact footprint. ``process_peak_rss_bytes`` is the
whole process's peak RSS (``getrusage``'s ``ru_maxrss``) at the end of the benchmark: Python,
onnx, every session and the inputs together.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import psutil
from rich.console import Console
from rich.table import Table

from onnxcomp.backends.base import Backend, Session, SessionConfig, time_ms
from onnxcomp.backends.registry import backend_for_path
from onnxcomp.core.inputs import InputSpec, fixed_batch, input_specs, random_feeds
from onnxcomp.errors import OnnxcompError

MIN_ITERATIONS = 10
BLOCK_S = 0.2
_PROGRESS_INTERVAL_S = 0.1
_SETUP_SHARE = 0.1  # share of the progress bar given to loading and warm-up

ProgressCallback = Callable[[str, float], None]
"""Called with a description and the fraction of the benchmark done (0.0 … 1.0)."""


@dataclass(frozen=True)
class BenchResult:
    """Timings of one model; latencies in milliseconds, throughput in samples per second."""

    model: str
    providers: tuple[str, ...]
    batch: int
    iterations: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    throughput: float
    memory_growth_bytes: int
    process_peak_rss_bytes: int
    notes: tuple[str, ...] = ()


def compare_ratio(base: BenchResult, other: BenchResult) -> float:
    """Speed-up of ``other`` over ``base`` by median latency (> 1: ``other`` is faster)."""
    if other.latency_p50_ms <= 0:
        return float("inf")
    return base.latency_p50_ms / other.latency_p50_ms


def process_peak_rss() -> int:
    """The process's peak resident set size in bytes."""
    try:
        import resource
    except ImportError:  # Windows
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _load_specs(path: Path, backend: Backend) -> list[InputSpec]:
    if not path.is_file():
        raise OnnxcompError(f"model file '{path}' does not exist; check the path")
    reader = getattr(backend, "input_specs", None)
    if reader is not None:  # a runtime that reads its own format (.tflite)
        return reader(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise OnnxcompError(
            f"cannot read '{path}' as an ONNX model ({type(error).__name__}: {error}); "
            "check that the file is a complete .onnx file"
        ) from error
    return input_specs(model)


def _check_same_inputs(
    paths: Sequence[Path], specs: Sequence[list[InputSpec]], batch: int, dim_default: int
) -> None:
    """Every model must accept the same feeds as the first one."""

    def key(spec_list: list[InputSpec]) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {s.name: (str(s.dtype), s.concrete_shape(batch, dim_default)) for s in spec_list}

    reference = key(specs[0])
    for path, spec_list in zip(paths[1:], specs[1:], strict=True):
        if key(spec_list) != reference:
            mine = "; ".join(s.describe() for s in spec_list)
            theirs = "; ".join(s.describe() for s in specs[0])
            raise OnnxcompError(
                f"'{path}' has different inputs ({mine}) from '{paths[0]}' ({theirs}); "
                "only models with the same input names, dtypes and shapes can be compared"
            )


def _validate(
    models: Sequence[str | Path],
    batch: int,
    warmup: int,
    iterations: int | None,
    min_time_s: float,
) -> None:
    if not models:
        raise OnnxcompError("no model to benchmark; pass at least one .onnx file")
    if batch < 1:
        raise OnnxcompError(f"batch must be at least 1, got {batch}")
    if warmup < 0:
        raise OnnxcompError(f"warmup must be 0 or more, got {warmup}")
    if iterations is not None and iterations < 1:
        raise OnnxcompError(f"iterations must be at least 1, got {iterations}")
    if min_time_s < 0:
        raise OnnxcompError(f"min_time_s must be 0 or more, got {min_time_s}")


def _timed_fraction(
    rounds: int, elapsed: float, iterations: int | None, min_time_s: float
) -> float:
    if iterations is not None:
        return rounds / iterations
    by_time = elapsed / min_time_s if min_time_s > 0 else 1.0
    return min(by_time, rounds / MIN_ITERATIONS)


@dataclass
class _Loaded:
    """A model's session, its timed call and the RSS growth while it was loaded."""

    path: Path
    session: Session
    call: Callable[[], object]
    growth: int
    samples: list[float] = field(default_factory=list)


def _load_all(
    paths: Sequence[Path],
    feeds: dict[str, np.ndarray],
    backend: Backend,
    config: SessionConfig,
    warmup: int,
    report: ProgressCallback,
) -> list[_Loaded]:
    """Create and warm up every model's session in turn, measuring the RSS it adds."""
    process = psutil.Process()
    loaded = []
    for index, path in enumerate(paths):
        report(f"loading {path.name}", _SETUP_SHARE * index / len(paths))
        gc.collect()
        rss_before = process.memory_info().rss
        session = backend.create_session(path, config)
        peak = process.memory_info().rss
        session.run(feeds)  # untimed check: clear error if the model rejects the feeds
        peak = max(peak, process.memory_info().rss)
        call = session.runner(feeds)
        for _ in range(max(warmup - 1, 0)):
            call()
            peak = max(peak, process.memory_info().rss)
        loaded.append(_Loaded(path, session, call, max(peak - rss_before, 0)))
    return loaded


def _time_interleaved(
    loaded: list[_Loaded],
    iterations: int | None,
    min_time_s: float,
    report: ProgressCallback,
) -> None:
    """Time the models in turns of a few runs each until enough rounds are done."""
    blocks = [_block_size(model.call, len(loaded)) for model in loaded]
    start = last_report = time.perf_counter()
    while True:
        for model, block in zip(loaded, blocks, strict=True):
            if iterations is not None:
                block = min(block, iterations - len(model.samples))
            for _ in range(block):
                model.samples.append(time_ms(model.call))
        rounds = min(len(model.samples) for model in loaded)
        now = time.perf_counter()
        if iterations is not None:
            done = rounds >= iterations
        else:
            done = now - start >= min_time_s and rounds >= MIN_ITERATIONS
        if done:
            return
        if now - last_report >= _PROGRESS_INTERVAL_S:
            fraction = _timed_fraction(rounds, now - start, iterations, min_time_s)
            report("timing", _SETUP_SHARE + (1 - _SETUP_SHARE) * fraction)
            last_report = now


def _model_batch(paths: Sequence[Path], specs: Sequence[list[InputSpec]], batch: int) -> int:
    """The batch to time: the one the models fix (they must agree), else ``batch``."""
    fixed = {path: size for path, s in zip(paths, specs, strict=True) if (size := fixed_batch(s))}
    if len(set(fixed.values())) > 1:
        found = ", ".join(f"'{path}' {size}" for path, size in fixed.items())
        raise OnnxcompError(
            f"the models fix different batch sizes ({found}); only models that accept the "
            "same batch can be compared"
        )
    return next(iter(fixed.values()), batch)


def _result(model: _Loaded, batch: int, peak_rss: int, notes: tuple[str, ...] = ()) -> BenchResult:
    p50, p90, p99 = (float(v) for v in np.percentile(model.samples, [50, 90, 99]))
    mean = float(np.mean(model.samples))
    return BenchResult(
        model=str(model.path),
        providers=model.session.providers,
        batch=batch,
        iterations=len(model.samples),
        latency_p50_ms=p50,
        latency_p90_ms=p90,
        latency_p99_ms=p99,
        latency_mean_ms=mean,
        throughput=batch / (mean / 1000) if mean > 0 else float("inf"),
        memory_growth_bytes=model.growth,
        process_peak_rss_bytes=peak_rss,
        notes=notes,
    )


def benchmark(
    models: Sequence[str | Path],
    config: SessionConfig,
    batch: int = 1,
    dim_default: int = 1,
    warmup: int = 10,
    iterations: int | None = None,
    min_time_s: float = 2.0,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    backend: Backend | None = None,
) -> list[BenchResult]:
    """Benchmark ``models`` on the same random feeds, timed runs interleaved.

    A model that fixes its batch is timed at that batch whatever ``batch`` says (the results'
    ``notes`` say so); models that fix different batches cannot be compared.

    Runs exactly ``iterations`` rounds when given, else until ``min_time_s`` has passed and at
    least ``MIN_ITERATIONS`` rounds are done. At least one untimed run per model checks it
    accepts the feeds (errors become OnnxcompError). ``backend`` defaults to the one the
    files' suffix names (``.tflite``: TFLite, else ONNX Runtime); all models share it.
    """
    _validate(models, batch, warmup, iterations, min_time_s)
    if backend is None:
        kinds = {backend_for_path(m).name: backend_for_path(m) for m in models}
        if len(kinds) > 1:
            raise OnnxcompError(
                f"the models need different runtimes ({', '.join(kinds)}); bench .tflite and "
                ".onnx files in separate runs (their inputs differ: NHWC vs NCHW)"
            )
        backend = next(iter(kinds.values()))

    def report(description: str, fraction: float) -> None:
        if progress is not None:
            progress(description, min(max(fraction, 0.0), 1.0))

    paths = [Path(m) for m in models]
    specs = [_load_specs(p, backend) for p in paths]
    requested, batch = batch, _model_batch(paths, specs, batch)
    notes: tuple[str, ...] = ()
    if batch != requested:
        notes = (f"batch fixed to {batch} by the model: timed at batch {batch}, not {requested}",)
    _check_same_inputs(paths, specs, batch, dim_default)
    feeds = random_feeds(specs[0], batch=batch, dim_default=dim_default, seed=seed)
    loaded = _load_all(paths, feeds, backend, config, warmup, report)
    _time_interleaved(loaded, iterations, min_time_s, report)
    report("done", 1.0)
    peak_rss = process_peak_rss()
    return [_result(model, batch, peak_rss, notes) for model in loaded]


def _block_size(call: Callable[[], object], models: int) -> int:
    """Runs per turn when several models are timed in turn.

    ONNX Runtime's idle worker threads spin for a while after a run; with two models
    alternating run by run on a small machine, the idle one's spinning slows the timed one.
    Turns of about BLOCK_S seconds let the idle threads go to sleep, while still
    interleaving the models so that machine noise hits them alike.
    """
    if models == 1:
        return 1
    latency = max(time_ms(call) / 1000, 1e-6)
    return max(1, min(int(BLOCK_S / latency), 1000))


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f}"


def render_bench(results: Sequence[BenchResult], console: Console, baseline_index: int = 0) -> None:
    """A table with one row per model and its speed-up (by p50) over the baseline."""
    if not results:
        console.print("no benchmark results")
        return
    if not 0 <= baseline_index < len(results):
        raise OnnxcompError(
            f"baseline index {baseline_index} is out of range for {len(results)} results"
        )
    base = results[baseline_index]
    provider = base.providers[0] if base.providers else "unknown provider"
    table = Table(title=f"Benchmark (batch {base.batch}, {provider})", title_justify="left")
    table.add_column("model", overflow="fold")
    for column in ("runs", "p50 ms", "p90 ms", "p99 ms", "items/s", "+MiB", "speed-up"):
        table.add_column(column, justify="right", no_wrap=True)
    for index, result in enumerate(results):
        ratio = "base" if index == baseline_index else f"{compare_ratio(base, result):.2f}x"
        table.add_row(
            Path(result.model).name,
            str(result.iterations),
            f"{result.latency_p50_ms:.3f}",
            f"{result.latency_p90_ms:.3f}",
            f"{result.latency_p99_ms:.3f}",
            f"{result.throughput:,.0f}",
            _mib(result.memory_growth_bytes),
            ratio,
        )
    table.caption = (
        "speed-up: base p50 / model p50. +MiB: RSS growth while creating and warming up "
        f"the model's session (estimate). Process peak RSS: "
        f"{_mib(max(r.process_peak_rss_bytes for r in results))} MiB"
    )
    console.print(table)
    for note in dict.fromkeys(n for r in results for n in r.notes):
        console.print(f"note: {note}")
