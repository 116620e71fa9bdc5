"""A layer the low-rank pass may factorize: its weight, MACs, matrix form or conv geometry,
the target its ranks are chosen for, and its candidates."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxcomp.converter.lowrank.candidates import (
    CONV_METHODS,
    Attributes,
    Candidate,
    conv_svd,
    matrix_svd,
)
from onnxcomp.converter.lowrank.decompose import Target
from onnxcomp.core.geometry import ConvGeometry, conv_geometry
from onnxcomp.core.graph import attr_int, input_at, is_constant
from onnxcomp.core.macs import conv_macs, gemm_macs, matmul_macs


@dataclass
class MatrixForm:
    """A Gemm or MatMul as y = x M (+ C): M is K x N, ``rows`` the rows of x per sample.

    ``stored_transposed``: the weight is M^T (Gemm transB=1); ``input_transposed``: x is
    given as x^T (Gemm transA=1). ``attributes``: those of the two layers of the chain.
    """

    matrix: np.ndarray
    rows: int
    stored_transposed: bool
    input_transposed: bool
    attributes: list[Attributes]
    macs: int


@dataclass
class Layer:
    """A layer that may be factorized: its node, weight, current MACs and what the candidates
    need (the matrix form of a Gemm/MatMul or the geometry of a Conv, the input Gram)."""

    node: ir.Node
    name: str
    weight: ir.Value
    array: np.ndarray
    macs: int
    input_dims: list[int] | None
    form: MatrixForm | None = None
    geometry: ConvGeometry | None = None
    methods: tuple[str, ...] = ("svd",)
    target: Target = field(default_factory=lambda: Target(1.0))
    basis: str = ""
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def features(self) -> int:
        """The side of the layer's input Gram matrix (K, or C kh kw of a Conv)."""
        if self.form is not None:
            return self.form.matrix.shape[0]
        return math.prod(self.array.shape[1:])

    @property
    def label(self) -> str:
        return f"{self.node.op_type} '{self.name}'"


def _static_product(shape: ir.Shape | None, dims: slice) -> int:
    """The product of the known dims of ``shape`` in ``dims``; symbolic or unknown count as 1."""
    if shape is None:
        return 1
    return math.prod(int(d) if isinstance(d, int) else 1 for d in list(shape)[dims])


def weight_problem(node: ir.Node, label: str) -> str | None:
    """Why the node's weight (input 1) cannot be factorized, or None."""
    weight = input_at(node, 1)
    if weight is None or not is_constant(weight):
        return f"the weight of {label} is not a constant initializer"
    users = len(weight.uses())
    if users > 1:
        return f"the weight '{weight.name}' of {label} is shared by {users} uses"
    if not np.issubdtype(weight.const_value.dtype.numpy(), np.floating):
        return f"the weight of {label} is not floating point"
    return None


def matrix_form(node: ir.Node, weight: np.ndarray) -> MatrixForm:
    """The matrix form of a Gemm or MatMul and its MACs.

    Gemm becomes Gemm(x, A) then Gemm(h, B, C) with alpha and beta on the second; MatMul
    becomes MatMul(MatMul(x, A), B).
    """
    shape = node.inputs[0].shape
    if node.op_type == "MatMul":
        rows = _static_product(shape, slice(None, -1))
        macs = matmul_macs((rows, weight.shape[0]), weight.shape)
        return MatrixForm(weight, rows, False, False, [{}, {}], macs)
    trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
    rows = _static_product(shape, slice(1, 2) if trans_a else slice(0, 1))
    first: Attributes = {"transA": trans_a, "transB": trans_b}
    second: Attributes = {"transB": trans_b}
    for name in ("alpha", "beta"):
        if name in node.attributes:
            second[name] = node.attributes[name].as_float()
    matrix = weight.T if trans_b else weight
    macs = gemm_macs((rows, matrix.shape[0]), weight.shape, False, bool(trans_b))
    return MatrixForm(matrix, rows, bool(trans_b), bool(trans_a), [first, second], macs)


def input_dims(value: ir.Value | None) -> list[int] | None:
    """The dims of a layer's input with symbolic ones (the batch) set to 1, or None."""
    shape = value.shape if value is not None else None
    if shape is None:
        return None
    return [int(d) if isinstance(d, int) else 1 for d in shape]


def candidates(layer: Layer) -> list[Candidate]:
    """Every enabled way to factorize the layer, with ranks and factors per its target."""
    target = layer.target
    if layer.form is not None:
        form = layer.form
        return [matrix_svd(form.matrix, form.rows, target, form.stored_transposed, form.attributes)]
    geometry = layer.geometry
    assert geometry is not None
    if geometry.kernel == (1, 1):
        return [conv_svd(layer.array, geometry, target)]
    return [CONV_METHODS[m](layer.array, geometry, target) for m in layer.methods]


def layer_of(
    node: ir.Node, name: str, methods: tuple[str, ...], exclude: tuple[str, ...]
) -> tuple[Layer | None, str | None]:
    """The layer (candidates not yet built) with the enabled ``methods``, or why it is left
    alone."""
    label = f"{node.op_type} '{name}'"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
        return None, f"{label} is excluded"
    problem = weight_problem(node, label)
    if problem:
        return None, problem
    weight = node.inputs[1]
    array = np.asarray(weight.const_value.numpy(), np.float64)  # type: ignore[union-attr]
    if not np.any(array):
        return None, f"the weight of {label} is all zeros"
    dims = input_dims(node.inputs[0])
    if node.op_type == "Conv":
        return _conv_layer(node, name, label, weight, array, methods)
    if array.ndim != 2:
        return None, f"the weight of {label} is not 2-D"
    if "svd" not in methods:
        return None, f"{label} needs method 'svd', which is not enabled"
    form = matrix_form(node, array)
    return Layer(node, name, weight, array, form.macs, dims, form=form), None  # type: ignore[arg-type]


def _conv_layer(
    node: ir.Node,
    name: str,
    label: str,
    weight: ir.Value,
    array: np.ndarray,
    enabled: tuple[str, ...],
) -> tuple[Layer | None, str | None]:
    group = attr_int(node, "group", 1)
    if group != 1:
        kind = "depthwise" if array.ndim > 1 and array.shape[1] == 1 else "grouped"
        return None, f"{label} is a {kind} convolution (group={group})"
    if array.ndim != 4:
        return None, f"{label} is not a 2-D convolution"
    kernel = (array.shape[2], array.shape[3])
    geometry = conv_geometry(node, kernel)
    if isinstance(geometry, str):
        return None, f"{label}: {geometry}"
    ho, wo = geometry.out_hw
    macs = conv_macs((1, array.shape[0], ho, wo), array.shape)
    if kernel == (1, 1):
        if "svd" not in enabled:
            return None, f"{label} (1x1) needs method 'svd', which is not enabled"
        methods: tuple[str, ...] = ("svd",)
    else:
        methods = tuple(m for m in enabled if m in CONV_METHODS)
        if not methods:
            return None, f"{label} needs method 'spatial' or 'tucker2', neither is enabled"
    dims = input_dims(node.inputs[0])
    layer = Layer(node, name, weight, array, macs, dims, geometry=geometry, methods=methods)
    return layer, None
