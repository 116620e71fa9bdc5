"""TFLite models (``.tflite``) in ai-edge-litert's interpreter, as a :class:`Backend`.

ai-edge-litert is the ``tflite`` extra; without it creating a session is a one-line error.
Threads: ``SessionConfig.intra_op_threads`` (2 when unset, the figure our benchmarks use).
A feed with another batch than the model's runs in chunks of the model's batch (the last one
padded, its padded rows dropped): XNNPACK cannot always resize a converted graph, and a phone
runs the file at the batch it was written for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.backends.base import ModelSource, SessionConfig
from onnxcomp.core.inputs import InputSpec
from onnxcomp.errors import OnnxcompError

DEFAULT_THREADS = 2
INSTALL_HINT = "pip install 'onnxcomp[tflite]'"


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise OnnxcompError(
            f"running .tflite models needs ai-edge-litert ({error}): {INSTALL_HINT}"
        ) from error
    return Interpreter


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return (text or type(error).__name__)[:400]


class TfliteSession:
    """One interpreter; inputs and outputs by tensor name, in the model's order."""

    def __init__(self, interpreter: Any, source: str) -> None:
        self.interpreter = interpreter
        self.source = source
        self.inputs = interpreter.get_input_details()
        self.outputs = interpreter.get_output_details()

    @property
    def input_names(self) -> list[str]:
        return [d["name"] for d in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [d["name"] for d in self.outputs]

    @property
    def providers(self) -> tuple[str, ...]:
        return ("TFLiteInterpreter",)

    def input_specs(self) -> list[InputSpec]:
        specs = []
        for d in self.inputs:
            signature = d.get("shape_signature", d["shape"])
            shape = tuple(None if s < 0 else int(s) for s in signature)
            specs.append(InputSpec(d["name"], np.dtype(d["dtype"]), shape))
        return specs

    def _set(self, feeds: Mapping[str, np.ndarray]) -> None:
        for d in self.inputs:
            value = np.ascontiguousarray(feeds[d["name"]], dtype=d["dtype"])
            self.interpreter.set_tensor(d["index"], value)

    def _model_batch(self) -> int:
        shape = self.inputs[0]["shape"]
        return int(shape[0]) if len(shape) else 1

    def _chunks(self, feeds: Mapping[str, np.ndarray]) -> list[tuple[dict[str, np.ndarray], int]]:
        """Feeds cut into chunks of the model's batch: (chunk feeds, rows that are real)."""
        missing = [d["name"] for d in self.inputs if d["name"] not in feeds]
        if missing:
            raise OnnxcompError(f"{self.source}: no feed for input(s) {', '.join(missing)}")
        batch = self._model_batch()
        total = len(feeds[self.inputs[0]["name"]])
        if total == batch:
            return [(dict(feeds), batch)]
        chunks = []
        for start in range(0, total, batch):
            chunk, real = {}, min(batch, total - start)
            for name, value in feeds.items():
                part = np.asarray(value)[start : start + batch]
                if real < batch:
                    pad = np.repeat(part[-1:], batch - real, axis=0)
                    part = np.concatenate([part, pad])
                chunk[name] = part
            chunks.append((chunk, real))
        return chunks

    def _invoke(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self._set(feeds)
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(d["index"]).copy() for d in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            parts = [(self._invoke(chunk), real) for chunk, real in self._chunks(feeds)]
        except OnnxcompError:
            raise
        except (RuntimeError, ValueError) as error:
            raise OnnxcompError(
                f"TFLite failed to run {self.source}: {_one_line(error)}"
            ) from error
        if len(parts) == 1 and parts[0][1] == self._model_batch():
            return parts[0][0]
        return [
            np.concatenate([outputs[i][:real] for outputs, real in parts])
            for i in range(len(self.outputs))
        ]

    def runner(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
        chunks = self._chunks(feeds)
        if len(chunks) == 1:
            self._set(chunks[0][0])
            return self.interpreter.invoke

        def run_all() -> None:
            for chunk, _ in chunks:
                self._set(chunk)
                self.interpreter.invoke()

        return run_all


class TfliteBackend:
    """ai-edge-litert's TFLite interpreter (CPU; XNNPACK where it applies)."""

    name = "tflite"

    def create_session(self, model: ModelSource, config: SessionConfig) -> TfliteSession:
        interpreter_class = _interpreter_class()
        threads = config.intra_op_threads or DEFAULT_THREADS
        if threads < 0:
            raise OnnxcompError(f"intra_op_threads must be >= 0, got {threads}")
        if config.provider not in ("cpu", "CPUExecutionProvider"):
            raise OnnxcompError(
                f"the TFLite backend runs on CPU only, not {config.provider}; drop --provider"
            )
        if isinstance(model, bytes):
            kwargs: dict[str, Any] = {"model_content": model}
            source = "the in-memory model"
        elif isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_file():
                raise OnnxcompError(f"model file '{path}' does not exist; check the path")
            kwargs, source = {"model_path": str(path)}, f"'{path}'"
        else:
            raise OnnxcompError("the TFLite backend takes a .tflite path or its bytes")
        try:
            interpreter = interpreter_class(num_threads=threads, **kwargs)
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as error:
            raise OnnxcompError(
                f"TFLite could not load {source}: {_one_line(error)}; check that it is a "
                "complete .tflite file"
            ) from error
        return TfliteSession(interpreter, source)

    def input_specs(self, path: Path) -> list[InputSpec]:
        """The model's inputs (a -1 in the shape signature becomes a dynamic dimension)."""
        return self.create_session(path, SessionConfig()).input_specs()


TFLITE = TfliteBackend()
