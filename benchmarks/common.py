"""Shared helpers for benchmark scripts: data preparation, subprocess isolation, peak RSS,
one-session-at-a-time latency, int8 conversions timed in a worker (onnxcomp or
onnxruntime.quantization), machine description and markdown output.

Kept light to import (numpy and the standard library): worker subprocesses import this module,
and whatever it imports counts in their peak RSS.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BENCH_OUT = ROOT / "bench_out"
RESULT_MARK = "@@RESULT@@ "


# --------------------------------------------------------------------------- memory, workers


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: the high-water mark of the process's
    own address space. ``getrusage``'s ``ru_maxrss`` is not used there because Linux carries it
    across ``fork`` + ``exec``: a fresh worker would report its parent's peak whenever that is
    higher. Elsewhere ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def emit_result(result: dict) -> None:
    """Print a worker's result as one marked JSON line (read by :func:`run_worker`)."""
    print(RESULT_MARK + json.dumps(result), flush=True)


@dataclass
class WorkerOutcome:
    """What a worker subprocess reported, or why it failed."""

    result: dict | None
    error: str | None
    wall_s: float


def run_worker(script: Path, args: dict, timeout_s: float = 1800.0) -> WorkerOutcome:
    """Run ``script --worker JSON`` in a fresh interpreter; parse its :func:`emit_result` line."""
    command = [sys.executable, str(script), "--worker", json.dumps(args)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return WorkerOutcome(None, f"timed out after {timeout_s:.0f} s", timeout_s)
    wall = time.perf_counter() - start
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return WorkerOutcome(json.loads(line[len(RESULT_MARK) :]), None, wall)
    tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    if done.returncode < 0:
        tail = f"killed by signal {-done.returncode} (out of memory?); {tail}"
    return WorkerOutcome(None, tail[:300], wall)


def worker_main(raw: str, jobs: dict[str, Callable[[dict], dict]]) -> None:
    """Entry point of a worker process: run the job named in the JSON ``raw``, print its result."""
    args = json.loads(raw)
    emit_result(jobs[args["job"]](args))


def worker_result(script: Path, args: dict, timeout_s: float = 1800.0) -> dict:
    """:func:`run_worker`'s result, or ``{"error": why}``."""
    outcome = run_worker(script, args, timeout_s)
    return outcome.result if outcome.result is not None else {"error": outcome.error}


# --------------------------------------------------------------------------- data


def extract_cifar(archive: Path, target: Path) -> Path:
    """Extract a CIFAR-10 JPEG archive (``split/<class>/N.jpg``) once; returns ``target/split``."""
    marker = target / f".{archive.name}.done"
    with tarfile.open(archive, "r:gz") as tar:
        if marker.exists():
            first = next(m for m in tar if m.isfile())
            return target / first.name.split("/")[0]
        split = None
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or ".." in parts:
                continue
            split = parts[0]
            out = target.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is not None:
                out.write_bytes(source.read())
    if split is None:
        raise RuntimeError(f"{archive}: no split/<class>/<file> members found")
    marker.touch()
    return target / split


def prepare_arrays(
    folder: Path, npz: Path, limit: int | None, seed: int = 0, preset: str = "cifar10"
) -> Path:
    """Read ``folder`` with onnxcomp's reader (preset, seeded balanced ``limit``) into ``npz``.

    The file holds ``input`` (float32 NCHW) and ``labels`` (int64), stored uncompressed so that
    readers can memory-map it. Reused when it exists.
    """
    if npz.exists():
        return npz
    from onnxcomp.data import get_preset, open_data_source

    source = open_data_source(
        folder, ["input"], preprocess=get_preset(preset), limit=limit, seed=seed
    )
    inputs, labels = [], []
    for batch in source.batches(256):
        inputs.append(batch.inputs["input"].astype(np.float32))
        labels.append(batch.labels)
    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz.with_name(npz.stem + ".tmp.npz")
    np.savez(tmp, input=np.concatenate(inputs), labels=np.concatenate(labels))
    os.replace(tmp, npz)
    return npz


def subset_arrays(source: Path, npz: Path, count: int) -> Path:
    """The first ``count`` samples of ``source`` (a balanced pick stays balanced) as ``npz``."""
    if npz.exists():
        return npz
    with np.load(source) as data:
        tmp = npz.with_name(npz.stem + ".tmp.npz")
        np.savez(tmp, input=data["input"][:count], labels=data["labels"][:count])
    os.replace(tmp, npz)
    return npz


# --------------------------------------------------------------------------- latency


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_one(
    path: Path, feeds: dict[str, np.ndarray], threads: int, seconds: float, min_runs: int = 5
) -> float:
    """Median latency (ms) of ``path``: a fresh session, warmed up, timed, then destroyed."""
    session = _session(path, threads)
    try:
        warm_end = time.perf_counter() + seconds / 4
        for _ in range(2):
            session.run(None, feeds)
        while time.perf_counter() < warm_end:
            session.run(None, feeds)
        samples: list[float] = []
        end = time.perf_counter() + seconds
        while len(samples) < min_runs or time.perf_counter() < end:
            t0 = time.perf_counter_ns()
            session.run(None, feeds)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
        return float(np.median(samples))
    finally:
        del session
        gc.collect()


def latency_rounds(
    paths: Sequence[Path],
    feeds: dict[str, np.ndarray],
    threads: int,
    rounds: int,
    seconds: float,
) -> list[list[float]]:
    """Median latency per round for each model; only one ORT session is alive at a time.

    The order of the models rotates each round so drift on a shared machine hits all alike.
    """
    per_model: list[list[float]] = [[] for _ in paths]
    for r in range(rounds):
        order = list(range(len(paths)))
        shift = r % len(order)
        for index in order[shift:] + order[:shift]:
            per_model[index].append(time_one(paths[index], feeds, threads, seconds))
    return per_model


def latency_job(args: dict, threads: int) -> dict:
    """Worker side of :func:`latency_in_worker`: the first ``batch`` images of ``data``."""
    with np.load(args["data"]) as data:
        feeds = {"input": np.ascontiguousarray(data["input"][: args["batch"]])}
    paths = [Path(p) for p in args["models"]]
    return {"rounds_ms": latency_rounds(paths, feeds, threads, args["rounds"], args["seconds"])}


def latency_in_worker(
    script: Path,
    models: list[Path],
    data: Path,
    batch: int,
    rounds: int,
    seconds: float,
    timeout_s: float = 1800.0,
) -> dict:
    """Median latency (ms) of each model at one batch size, measured in a fresh subprocess
    (``script``'s job "latency", see :func:`latency_job`); or ``{"error": why}``."""
    args = {
        "job": "latency",
        "models": [str(p) for p in models],
        "data": str(data),
        "batch": batch,
        "rounds": rounds,
        "seconds": seconds,
    }
    result = worker_result(script, args, timeout_s)
    if "error" in result:
        return result
    return {
        str(p): {"median_ms": float(np.median(r)), "rounds_ms": r}
        for p, r in zip(models, result["rounds_ms"], strict=True)
    }


# --------------------------------------------------------------------------- int8 conversions


@dataclass(frozen=True)
class OrtStatic:
    """``onnxruntime.quantization.quantize_static`` settings: QDQ format, int8 weights."""

    method: str  # CalibrationMethod name: MinMax, Entropy, Percentile
    activation: str  # "uint8" (U8S8) | "int8" (S8S8)
    per_channel: bool = True
    # MinMax keeps every batch's outputs by default: reduce the ranges every few batches instead
    # (same ranges, bounded memory), see :func:`minmax_flush`
    flush_minmax: bool = False


def minmax_flush(images: int, batch: int) -> dict:
    """``CalibMaxIntermediateOutputs``: reduce every k batches, k >= 2 not dividing the batch
    count (ORT 1.32 fails with "No data is collected" when the last flush leaves nothing)."""
    batches = -(-images // batch)
    k = next((k for k in range(2, batches) if batches % k), None)
    return {} if k is None else {"CalibMaxIntermediateOutputs": k}


def _ort_quantize(model: Path, output: Path, array: np.ndarray, batch: int, how: OrtStatic):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class ArrayReader(CalibrationDataReader):
        """Batches of the same preprocessed array onnxcomp reads."""

        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict | None:
            if self.start >= len(array):
                return None
            part = array[self.start : self.start + batch]
            self.start += batch
            return {"input": np.ascontiguousarray(part)}

        def rewind(self) -> None:
            self.start = 0

    flush = how.flush_minmax and how.method == "MinMax"
    quantize_static(
        str(model),
        str(output),
        ArrayReader(),
        quant_format=QuantFormat.QDQ,
        per_channel=how.per_channel,
        activation_type=QuantType.QUInt8 if how.activation == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, how.method),
        extra_options=minmax_flush(len(array), batch) if flush else {},
    )


def quantize_job(model: Path, output: Path, calib: Path, batch: int, how) -> dict:
    """Calibrate and convert one model (inside a fresh worker process), in batches of ``batch``
    of the ``input`` array of ``calib``: with onnxcomp when ``how`` is a ``PipelineOptions``,
    with onnxruntime.quantization when it is an :class:`OrtStatic`.

    Returns the wall time and peak RSS of the conversion, the peak RSS once the tool is imported
    (``import_rss``), the output's size and onnxcomp's seconds per pass (``{}`` for ORT).
    """
    output.unlink(missing_ok=True)
    if isinstance(how, OrtStatic):
        import onnxruntime.quantization  # noqa: F401  (counted in import_rss, not in seconds)
    else:
        from onnxcomp.converter.convert import convert
        from onnxcomp.data.batches import DataOptions
    import_rss = peak_rss_bytes()
    start = time.perf_counter()
    if isinstance(how, OrtStatic):
        with np.load(calib) as data:
            array = data["input"]
        _ort_quantize(model, output, array, batch, how)
        passes = {}
    else:
        data = DataOptions(data=calib, batch_size=batch)
        report = convert(model, output, how, verify=None, calibration=data)
        passes = {r.name: r.seconds for r in report.records}
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss": peak_rss_bytes(),
        "import_rss": import_rss,
        "bytes": output.stat().st_size,
        "pass_seconds": passes,
    }


# --------------------------------------------------------------------------- description


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed versions of the named distributions ('-' when absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return versions


def cpu_description() -> dict:
    """CPU model, logical cores, VNNI support, and the load average now."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    vnni = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "int8_features": vnni,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
    }


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


# --------------------------------------------------------------------------- markdown


CIFAR_TRAIN = BENCH_OUT / "cifar10" / "train"


@dataclass
class TimedJob:
    """A training job's report, its wall time and the load average before and after."""

    report: object
    seconds: float
    load_before: list[float]
    load_after: list[float]


def timed_training_job(
    student, teacher: Path, options, images: int | None, train: Path = CIFAR_TRAIN
) -> TimedJob:
    """`onnxcomp finetune`'s job (`run_job`) on ``images`` balanced CIFAR-10 training JPEGs
    (the cifar10 preprocessing preset), timed."""
    from onnxcomp.data import get_preset
    from onnxcomp.training.job import DataSpec, run_job

    data = DataSpec(path=train, preprocess=get_preset("cifar10"), limit=images)
    load, start = load_average(), time.perf_counter()
    report = run_job(student, teacher, data, options)
    return TimedJob(report, time.perf_counter() - start, load, load_average())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_section(path: Path, name: str, body: str) -> None:
    """Write ``body`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``.

    The section is appended (markers included) when the markers are missing.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def mib(n_bytes: float | None) -> str:
    """Bytes as MiB with no decimals ('-' for None)."""
    return "-" if n_bytes is None else f"{n_bytes / 2**20:,.0f}"
