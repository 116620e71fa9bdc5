"""Op types that say what a model already is (quantized, binarized), shared by every pass."""

from __future__ import annotations

import json
from collections.abc import Collection

import onnx_ir as ir

from onnxcomp.errors import OnnxcompError

QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
        "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QGemm",
    }
)  # fmt: skip
BINARIZED_OPS = frozenset({"Sign"})
# The metadata key onnxcomp's binarize pass writes: {"mode": ..., "weights": [initializer names]}.
BINARIZED_MARK = "onnxcomp.binarized"
# The metadata keys of --sparsity (JSON {weight initializer name: fraction of zeros}) and
# --weight-sharing (JSON {weight initializer name: K}); the training module keeps both.
SPARSITY_MARK = "onnxcomp.sparsity"
SHARED_MARK = "onnxcomp.shared"


def read_mark(model: ir.Model, key: str) -> dict:
    """The JSON object an onnxcomp pass left in the model's metadata under ``key`` ({} when
    absent or not an object); text that is not JSON is a one-line OnnxcompError."""
    text = model.metadata_props.get(key)
    if not text:
        return {}
    try:
        mark = json.loads(text)
    except json.JSONDecodeError:
        raise OnnxcompError(
            f"the metadata '{key}' is not JSON ({text[:40]!r}); it was not written by "
            "onnxcomp convert: remove it or convert the model again"
        ) from None
    return mark if isinstance(mark, dict) else {}


def first_node_of(model: ir.Model, op_types: frozenset[str]) -> ir.Node | None:
    """The first node (subgraphs included) of one of ``op_types``, or None."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in op_types:
            return node
    return None


def float_model_problem(model: ir.Model, technique: str, before: str) -> str | None:
    """Why a technique that needs a float model cannot run on this one, or None.

    ``technique`` names it ("pruning"), ``before`` says what to do ("prune before --int8").
    """
    if model.metadata_props.get(BINARIZED_MARK):
        return (
            f"{technique} needs a float model, this one is binarized ({BINARIZED_MARK} in its "
            f"metadata): {before} binarizing"
        )
    node = first_node_of(model, QUANTIZED_OPS)
    if node is not None:
        return (
            f"{technique} needs a float model, this one is quantized ({node.op_type} found): "
            f"{before} quantizing"
        )
    node = first_node_of(model, BINARIZED_OPS)
    if node is not None:
        return (
            f"{technique} needs a float model, this one looks binarized ({node.op_type} "
            f"'{node.name}' found): {before} binarizing"
        )
    return None


def float_layers_problem(
    model: ir.Model, technique: str, before: str, op_types: Collection[str], missing: str
) -> str | None:
    """:func:`float_model_problem`, or ``missing`` when the main graph has no node of
    ``op_types`` (the layers the technique changes), or None."""
    problem = float_model_problem(model, technique, before)
    if problem is None and not any(n.op_type in op_types for n in model.graph):
        return missing
    return problem
