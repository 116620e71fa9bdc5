"""How long ONNX Runtime's convolution kernels take at a given geometry: a NetAdapt-style
lookup (Yang et al. 2018), measured on this machine and cached on disk.

A :class:`ConvGeometry` is one convolution (channels in and out, kernel, stride, padding,
input size, batch). :class:`KernelLatency` builds a one-node model of it, in float (``fp32``:
a Conv) or as onnxcomp's int8 emits it (``int8``: uint8 activations, int8 per-channel
weights, DequantizeLinear -> Conv -> QuantizeLinear, which ONNX Runtime fuses into
QLinearConv), times it with a :data:`Timer` and keeps the median seconds in a JSON file keyed
by ONNX Runtime's version, this CPU (model name and flags), the thread count, the precision
and the geometry: a second run on the same machine measures nothing.

Pruning uses it to choose channel counts the kernels run fast; low-rank uses :func:`ort_timer`
to time a layer against its factorized chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.backends.base import SessionConfig
from onnxcomp.backends.ort import create_session
from onnxcomp.errors import OnnxcompError, OptionError

Timer = Callable[[onnx.ModelProto, dict[str, np.ndarray]], float]
PRECISIONS = ("fp32", "int8")
CACHE_ENV = "ONNXCOMP_CACHE_DIR"


def ort_timer(
    session_config: SessionConfig | None = None,
    runs: int = 200,
    warmup: int = 10,
    quantile: float = 0.5,
) -> Timer:
    """A timer: the ``quantile`` (0.5: the median) of the seconds of one ONNX Runtime run of
    a model on its feeds. A low quantile is steadier on a machine others load."""

    def measure(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        session = create_session(model.SerializeToString(), session_config or SessionConfig())
        for _ in range(warmup):
            session.run(None, feeds)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        return float(np.quantile(times, quantile))

    return measure


@dataclass(frozen=True)
class ConvGeometry:
    """One 2-D convolution: NCHW input ``batch x in_channels x height x width``, square
    ``kernel`` and ``stride``, symmetric ``pad``, ``group`` 1."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    pad: int
    height: int
    width: int
    batch: int = 1

    def __post_init__(self) -> None:
        if min(astuple(self)[:4]) < 1 or self.pad < 0 or min(self.height, self.width) < 1:
            raise OptionError(f"conv geometry {self}: channels, kernel, stride, size must be >= 1")

    @property
    def out_size(self) -> tuple[int, int]:
        h = (self.height + 2 * self.pad - self.kernel) // self.stride + 1
        w = (self.width + 2 * self.pad - self.kernel) // self.stride + 1
        return h, w

    @property
    def macs(self) -> int:
        h, w = self.out_size
        return self.batch * self.out_channels * h * w * self.in_channels * self.kernel**2

    def key(self) -> str:
        return "x".join(str(v) for v in astuple(self))


def conv_model(
    geometry: ConvGeometry, precision: str, seed: int = 0
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-convolution model of ``geometry`` and random feeds.

    ``fp32``: a float Conv. ``int8``: uint8 input -> DequantizeLinear -> Conv (weights int8
    per output channel through DequantizeLinear, int32 bias) -> QuantizeLinear uint8, the
    pattern ONNX Runtime's CPU optimizer fuses into QLinearConv.
    """
    if precision not in PRECISIONS:
        raise OptionError(f"kernel latency precision {precision!r}: choose one of {PRECISIONS}")
    g = geometry
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(g.out_channels, g.in_channels, g.kernel, g.kernel)).astype(np.float32)
    bias = rng.normal(size=g.out_channels).astype(np.float32)
    shape = [g.batch, g.in_channels, g.height, g.width]
    out_shape = [g.batch, g.out_channels, *g.out_size]
    conv_attrs = {"kernel_shape": [g.kernel] * 2, "strides": [g.stride] * 2, "pads": [g.pad] * 4}
    if precision == "fp32":
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **conv_attrs)]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]
        x_type = y_type = TensorProto.FLOAT
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
    else:
        # 7-bit weights, as onnxcomp emits them without VNNI (same kernels, no saturation).
        w_scale = (np.abs(w).reshape(g.out_channels, -1).max(axis=1) / 63).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -63, 63).astype(np.int8)
        x_scale = np.float32(0.02)
        b_q = np.round(bias / (w_scale * x_scale)).astype(np.int32)
        inits = [
            numpy_helper.from_array(w_q, "w_q"),
            numpy_helper.from_array(w_scale, "w_scale"),
            numpy_helper.from_array(np.zeros(g.out_channels, np.int8), "w_zero"),
            numpy_helper.from_array(b_q, "b_q"),
            numpy_helper.from_array(w_scale * x_scale, "b_scale"),
            numpy_helper.from_array(np.zeros(g.out_channels, np.int32), "b_zero"),
            numpy_helper.from_array(np.array(x_scale), "x_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
            numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "y_zero"),
        ]
        nodes = [
            helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zero"], ["xf"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
            helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"], axis=0),
            helper.make_node("Conv", ["xf", "w", "b"], ["yf"], **conv_attrs),
            helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zero"], ["y"]),
        ]
        x_type = y_type = TensorProto.UINT8
        feeds = {"x": rng.integers(0, 256, size=shape, dtype=np.uint8)}
    graph = helper.make_graph(
        nodes,
        "kernel_latency",
        [helper.make_tensor_value_info("x", x_type, shape)],
        [helper.make_tensor_value_info("y", y_type, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, feeds


def machine_key(threads: int | None) -> str:
    """ONNX Runtime's version, this CPU (model name and feature flags, hashed) and the
    thread count: measurements are only reused where all three are the same."""
    import onnxruntime

    from onnxcomp.backends.targets import cpu_flags

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    digest = hashlib.sha1((model + " " + " ".join(sorted(cpu_flags()))).encode()).hexdigest()
    return f"ort{onnxruntime.__version__}|cpu{digest[:12]}|threads{threads or 0}"


def default_cache_path() -> Path:
    """``$ONNXCOMP_CACHE_DIR/kernel_latency.json``, else under ``~/.cache/onnxcomp``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "onnxcomp"
    return Path(root) / "kernel_latency.json"


class KernelLatency:
    """Measured seconds of a convolution at a geometry and precision, cached on disk.

    ``cache_path`` None keeps the measurements in memory only. ``timer`` defaults to
    :func:`ort_timer` (the fastest of ``runs`` runs) on ``threads`` intra-op threads (the
    count the model will run with: the kernels scale differently with threads); new
    geometries are timed in ``rounds`` round-robin rounds and the fastest round is kept, so
    a burst of load from other processes spoils one round of a few geometries, not a count.
    """

    def __init__(
        self,
        cache_path: Path | None = None,
        threads: int | None = 2,
        timer: Timer | None = None,
        runs: int = 10,
        rounds: int = 3,
    ) -> None:
        self.cache_path = cache_path
        self.threads = threads
        self.rounds = max(1, rounds)
        config = SessionConfig(intra_op_threads=threads, inter_op_threads=1)
        self.timer = timer or ort_timer(config, runs=runs, warmup=2, quantile=0.0)
        self.prefix = machine_key(threads)
        self.measured = 0  # how many geometries this object timed (not found in the cache)
        self._entries: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        if self.cache_path is None or not self.cache_path.exists():
            return {}
        try:
            data = json.loads(self.cache_path.read_text())
        except (OSError, ValueError) as error:
            raise OnnxcompError(
                f"{self.cache_path}: not a kernel latency cache ({error}); delete it to "
                "measure again"
            ) from error
        return {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write(self) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = self._read()  # another process may have added entries meanwhile
        on_disk.update(self._entries)
        temp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(on_disk, indent=0, sort_keys=True))
        temp.replace(self.cache_path)

    def seconds(self, geometry: ConvGeometry, precision: str) -> float:
        """The median seconds of one run of ``geometry`` in ``precision``."""
        return self.many([geometry], precision)[0]

    def many(self, geometries: list[ConvGeometry], precision: str) -> list[float]:
        """:meth:`seconds` of each geometry (the new ones timed together, in rounds); the
        cache file is written once at the end."""
        if precision not in PRECISIONS:
            raise OptionError(f"kernel latency precision {precision!r}: choose one of {PRECISIONS}")
        keys = [f"{self.prefix}|{precision}|{g.key()}" for g in geometries]
        todo = {k: g for k, g in zip(keys, geometries, strict=True) if k not in self._entries}
        if todo:
            models = {key: conv_model(geometry, precision) for key, geometry in todo.items()}
            best = dict.fromkeys(todo, float("inf"))
            for _ in range(self.rounds):  # round-robin: a burst of load hits one round only
                for key, (model, feeds) in models.items():
                    best[key] = min(best[key], self.timer(model, feeds))
            self._entries.update(best)
            self.measured += len(todo)
            self._write()
        return [self._entries[key] for key in keys]
