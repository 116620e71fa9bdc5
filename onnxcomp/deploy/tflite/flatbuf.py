"""A small builder over the TFLite schema classes that ai-edge-litert ships.

Tensors, buffers, operator codes and operators are appended; :meth:`FlatModel.serialize`
packs one subgraph into the bytes of a ``.tflite`` file (file identifier ``TFL3``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxcomp.errors import OnnxcompError

INSTALL_HINT = "pip install 'onnxcomp[tflite]'"


def schema() -> Any:
    """ai-edge-litert's generated TFLite schema module, or a one-line error."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as error:
        raise OnnxcompError(
            f"writing .tflite needs ai-edge-litert ({error}): {INSTALL_HINT}"
        ) from error
    return schema_py_generated


_NUMPY_TYPES = {
    np.dtype(np.float32): "FLOAT32",
    np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
}


@dataclass(frozen=True)
class Quant:
    """Affine quantization: real = scale * (q - zero_point), per tensor or along ``axis``."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    @classmethod
    def per_tensor(cls, scale: float, zero_point: int) -> Quant:
        return cls((float(scale),), (int(zero_point),))

    def same_as(self, other: Quant | None) -> bool:
        return (
            other is not None
            and self.zero_point == other.zero_point
            and np.allclose(self.scale, other.scale, rtol=1e-6, atol=0.0)
        )


class FlatModel:
    """One TFLite subgraph under construction."""

    def __init__(self) -> None:
        self.fb = schema()
        self.buffers = [self.fb.BufferT()]  # buffer 0: the empty buffer, by convention
        self.tensors: list[Any] = []
        self.operators: list[Any] = []
        self.codes: dict[tuple[int, int], int] = {}
        self.code_list: list[Any] = []

    def tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype | type,
        data: np.ndarray | None = None,
        quant: Quant | None = None,
        signature: tuple[int, ...] | None = None,
    ) -> int:
        """Appends a tensor (constant when ``data`` is given); returns its index."""
        t = self.fb.TensorT()
        t.name = name
        t.shape = np.asarray(shape, dtype=np.int32)
        t.type = getattr(self.fb.TensorType, _NUMPY_TYPES[np.dtype(dtype)])
        t.buffer = 0
        if data is not None:
            buffer = self.fb.BufferT()
            raw = np.ascontiguousarray(np.asarray(data, dtype=dtype)).reshape(-1).view(np.uint8)
            buffer.data = raw.copy()
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        if signature is not None and tuple(signature) != tuple(shape):
            t.shapeSignature = np.asarray(signature, dtype=np.int32)
        if quant is not None:
            q = self.fb.QuantizationParametersT()
            q.scale = np.asarray(quant.scale, dtype=np.float32)
            q.zeroPoint = np.asarray(quant.zero_point, dtype=np.int64)
            q.quantizedDimension = quant.axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, name: str, array: np.ndarray, quant: Quant | None = None) -> int:
        array = np.asarray(array)
        return self.tensor(name, tuple(array.shape), array.dtype, data=array, quant=quant)

    def op(
        self,
        code: str,
        inputs: list[int],
        outputs: list[int],
        options: tuple[str, Any] | None = None,
        version: int = 1,
    ) -> None:
        """Appends an operator; ``options`` is (BuiltinOptions member name, options object)."""
        builtin = getattr(self.fb.BuiltinOperator, code)
        key = (builtin, version)
        if key not in self.codes:
            opcode = self.fb.OperatorCodeT()
            opcode.builtinCode = builtin
            opcode.deprecatedBuiltinCode = min(builtin, 127)
            opcode.version = version
            self.codes[key] = len(self.code_list)
            self.code_list.append(opcode)
        operator = self.fb.OperatorT()
        operator.opcodeIndex = self.codes[key]
        operator.inputs = np.asarray(inputs, dtype=np.int32)
        operator.outputs = np.asarray(outputs, dtype=np.int32)
        if options is not None:
            operator.builtinOptionsType = getattr(self.fb.BuiltinOptions, options[0])
            operator.builtinOptions = options[1]
        self.operators.append(operator)

    def options(self, kind: str, **fields: Any) -> tuple[str, Any]:
        """``("Conv2DOptions", Conv2DOptionsT(...))`` with the given fields set."""
        value = getattr(self.fb, f"{kind}T")()
        for key, field_value in fields.items():
            if not hasattr(value, key):
                raise AttributeError(f"{kind} has no field {key}")
            setattr(value, key, field_value)
        return kind, value

    def serialize(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        import flatbuffers

        subgraph = self.fb.SubGraphT()
        subgraph.tensors = self.tensors
        subgraph.operators = self.operators
        subgraph.inputs = np.asarray(inputs, dtype=np.int32)
        subgraph.outputs = np.asarray(outputs, dtype=np.int32)
        subgraph.name = "main"
        model = self.fb.ModelT()
        model.version = 3
        model.description = description
        model.operatorCodes = self.code_list
        model.subgraphs = [subgraph]
        model.buffers = self.buffers
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())
