"""ONNX Runtime sessions: provider selection, clear errors and install checks.

:class:`OrtBackend` (``ORT``) is ONNX Runtime behind :class:`onnxcomp.backends.base.Backend`;
``create_session`` and ``run`` give the raw ``InferenceSession`` to code written for ORT.

ModelProto inputs are serialized in memory, which protobuf limits to 2 GB: for larger models
(weights in external data files) pass the model's path instead, so ONNX Runtime reads the
external data itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp.backends.base import FixedBatch, ModelSource, OptimizationLevel, SessionConfig
from onnxcomp.errors import OnnxcompError

__all__ = [
    "ORT",
    "PROVIDERS",
    "OptimizationLevel",
    "OrtBackend",
    "OrtSession",
    "SessionConfig",
    "check_runtime_install",
    "condense_message",
    "create_session",
    "resolve_provider",
    "run",
    "session_batch",
]

logger = logging.getLogger(__name__)

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

_OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Distributions that all install the same ``onnxruntime`` module and overwrite each other.
_RUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
)

_PROTOBUF_LIMIT = 2**31 - 1
_MAX_MESSAGE_CHARS = 400


def resolve_provider(name: str) -> str:
    """The full ORT provider name for a short name (``cuda``) or a full one."""
    key = name.strip()
    if key.lower() in PROVIDERS:
        return PROVIDERS[key.lower()]
    for full in PROVIDERS.values():
        if key.lower() == full.lower():
            return full
    known = ", ".join(f"{short} ({full})" for short, full in PROVIDERS.items())
    raise OnnxcompError(f"unknown execution provider '{name}'; choose one of: {known}")


def condense_message(error: BaseException) -> str:
    """ORT's (often multi-line) exception message as one short line."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or type(error).__name__
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    return text


def _is_ort_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("onnxruntime")


def check_runtime_install() -> str | None:
    """A warning when several ONNX Runtime distributions are installed (they break each other)."""
    installed = []
    for dist in _RUNTIME_DISTRIBUTIONS:
        try:
            installed.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    if len(installed) < 2:
        return None
    return (
        f"several ONNX Runtime distributions are installed ({', '.join(installed)}); they "
        "provide the same 'onnxruntime' module and overwrite each other's files. Uninstall all "
        "of them, then install only one (e.g. `pip install onnxruntime-gpu` for GPU)"
    )


def _unavailable_message(provider: str, available: list[str], reason: str) -> str:
    fix = (
        "install the GPU build with `pip install onnxcomp[gpu]` (onnxruntime-gpu replaces "
        "onnxruntime: `pip uninstall onnxruntime` first)"
    )
    if provider == PROVIDERS["tensorrt"]:
        fix += " and the TensorRT libraries"
    message = (
        f"execution provider {provider} {reason} (available: {', '.join(available)}); "
        f"{fix}, or pass --allow-cpu-fallback to run on CPU"
    )
    clash = check_runtime_install()
    if clash:
        message += f"; note: {clash}"
    return message


def _session_options(config: SessionConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    for label, value in (
        ("intra_op_threads", config.intra_op_threads),
        ("inter_op_threads", config.inter_op_threads),
    ):
        if value is not None and value < 0:
            raise OnnxcompError(f"{label} must be >= 0 (0 = ONNX Runtime's default), got {value}")
    if config.intra_op_threads is not None:
        options.intra_op_num_threads = config.intra_op_threads
    if config.inter_op_threads is not None:
        options.inter_op_num_threads = config.inter_op_threads
    if config.optimization_level not in _OPTIMIZATION_LEVELS:
        levels = ", ".join(_OPTIMIZATION_LEVELS)
        raise OnnxcompError(
            f"unknown optimization level '{config.optimization_level}'; choose one of: {levels}"
        )
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[config.optimization_level]
    if not config.allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if config.optimized_model_path:
        Path(config.optimized_model_path).parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(config.optimized_model_path)
    options.enable_profiling = config.enable_profiling
    options.log_severity_level = config.log_severity
    return options


def _provider_list(provider: str, available: list[str]) -> list[str]:
    """The requested provider first, then the ones ORT should use for unsupported nodes."""
    chain = [provider]
    if provider == PROVIDERS["tensorrt"] and PROVIDERS["cuda"] in available:
        chain.append(PROVIDERS["cuda"])
    if provider != PROVIDERS["cpu"]:
        chain.append(PROVIDERS["cpu"])
    return chain


def _model_source(model: ModelSource) -> str | bytes:
    if isinstance(model, onnx.ModelProto):
        size = model.ByteSize()
        if size > _PROTOBUF_LIMIT:
            raise OnnxcompError(
                f"the in-memory model is {size / 2**30:.1f} GiB, over protobuf's 2 GB limit; "
                "save it with external data and pass its path instead"
            )
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    path = Path(model)
    if not path.is_file():
        raise OnnxcompError(f"model file '{path}' does not exist; check the path")
    return str(path)


def _describe(model: ModelSource) -> str:
    return f"'{model}'" if isinstance(model, (str, Path)) else "the in-memory model"


def create_session(
    model: ModelSource, config: SessionConfig = SessionConfig()
) -> ort.InferenceSession:
    """An InferenceSession on the requested provider, or a one-line OnnxcompError.

    With ``allow_cpu_fallback`` a missing provider logs a warning and the session runs on CPU.
    """
    provider = resolve_provider(config.provider)
    available = list(ort.get_available_providers())
    if provider not in available:
        if not config.allow_cpu_fallback:
            raise OnnxcompError(_unavailable_message(provider, available, "is not available"))
        logger.warning("%s is not available; falling back to CPUExecutionProvider", provider)
        provider = PROVIDERS["cpu"]
    options = _session_options(config)
    source = _model_source(model)
    try:
        session = ort.InferenceSession(
            source, sess_options=options, providers=_provider_list(provider, available)
        )
    except Exception as error:
        if isinstance(error, MemoryError):
            raise
        raise OnnxcompError(
            f"ONNX Runtime could not load {_describe(model)}: {condense_message(error)}"
        ) from error
    active = session.get_providers()
    if provider not in active:
        reason = (
            f"was requested but ONNX Runtime fell back to {', '.join(active)} "
            "(its CUDA/cuDNN/TensorRT libraries likely failed to load: check their versions "
            "match onnxruntime-gpu's requirements)"
        )
        if not config.allow_cpu_fallback:
            raise OnnxcompError(_unavailable_message(provider, available, reason))
        logger.warning("%s %s; running on CPU", provider, reason)
    return session


def session_batch(session: ort.InferenceSession) -> FixedBatch | None:
    """The batch ``session``'s model fixes (see :class:`FixedBatch`), None when symbolic."""
    return FixedBatch.of([(i.name, tuple(i.shape or ())) for i in session.get_inputs()])


def run(
    session: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    output_names: list[str] | None = None,
    batch: FixedBatch | None = None,
) -> list[np.ndarray]:
    """The outputs of one run (all, in graph order, or ``output_names``); ORT errors become
    OnnxcompError. A model with a fixed batch takes fewer samples: they are padded and the
    outputs trimmed (:class:`FixedBatch`); ``batch`` saves reading it from the session."""
    batch = batch or session_batch(session)

    def call(given: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(session.run(output_names, dict(given)))
        except Exception as error:
            if not _is_ort_error(error):
                raise
            raise OnnxcompError(f"ONNX Runtime failed to run: {condense_message(error)}") from error

    return call(feeds) if batch is None else batch.run(call, feeds)


class OrtSession:
    """An ``InferenceSession`` as a :class:`onnxcomp.backends.base.Session`."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.batch = session_batch(session)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self.session.get_providers())

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return run(self.session, feeds, batch=self.batch)

    def runner(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        return partial(self.session.run, None, feeds)


class OrtBackend:
    """ONNX Runtime, on the execution provider a :class:`SessionConfig` names."""

    name = "onnxruntime"

    def create_session(self, model: ModelSource, config: SessionConfig) -> OrtSession:
        return OrtSession(create_session(model, config))


ORT = OrtBackend()
