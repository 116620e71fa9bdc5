"""Model input descriptions and sample inputs that respect their shapes and dtypes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnxcomp.errors import OnnxcompError

DEFAULT_DYNAMIC_DIM = 1


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and shape (ints, or a name/None for a dynamic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.shape)

    def concrete_shape(
        self, batch: int | None = None, dim_default: int = DEFAULT_DYNAMIC_DIM
    ) -> tuple[int, ...]:
        """The shape with dynamic dims filled: the first by ``batch``, others by ``dim_default``."""
        dims = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int) and d > 0:
                dims.append(batch if (i == 0 and batch is not None and d == 1) else d)
            elif i == 0 and batch is not None:
                dims.append(batch)
            else:
                dims.append(dim_default)
        return tuple(dims)

    def describe(self) -> str:
        dims = ",".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


Shape = Sequence[int | str | None]


def batch_of_shapes(shapes: Iterable[Shape]) -> int | None:
    """The batch size the model fixes, or None when its batch dimension is symbolic.

    One rule, used wherever samples are batched or run (data, statistics, verification, debug,
    bench): the first dimension of the first input of rank >= 1, when it is a number. Other
    inputs count as batched when their first dimension is that number or symbolic.
    """
    for shape in shapes:
        if len(shape):
            first = shape[0]
            return int(first) if isinstance(first, int) and first > 0 else None
    return None


def batched_inputs(inputs: Iterable[tuple[str, Shape]]) -> set[str]:
    """The inputs that carry samples: first dimension symbolic or the fixed batch."""
    inputs = list(inputs)
    size = batch_of_shapes(shape for _, shape in inputs)
    return {
        name
        for name, shape in inputs
        if len(shape) and (shape[0] == size or not isinstance(shape[0], int) or shape[0] <= 0)
    }


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch size ``specs`` fix (see :func:`batch_of_shapes`), or None when symbolic."""
    return batch_of_shapes(spec.shape for spec in specs)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    initializer_names = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise OnnxcompError(
                f"input '{value.name}' is not a tensor; onnxcomp handles tensor inputs only"
            )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape: list[int | str | None] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
        specs.append(InputSpec(value.name, dtype, tuple(shape)))
    return specs


def random_feeds(
    specs: Sequence[InputSpec],
    batch: int | None = None,
    dim_default: int = DEFAULT_DYNAMIC_DIM,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs: standard normal floats, small non-negative ints, random bools."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = spec.concrete_shape(batch, dim_default)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            feeds[spec.name] = rng.integers(0, 8, size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise OnnxcompError(
                f"input '{spec.name}' has dtype {spec.dtype}, for which onnxcomp cannot make "
                "random samples; pass sample data with --data"
            )
    return feeds
