"""Fold inference-mode BatchNormalization into the preceding linear layer.

Conv, ConvTranspose and Gemm reuse onnxscript's BatchNorm fusion rules, with an extra check
that the BatchNorm really is in inference mode; MatMul (+Add) is our own rule in the same
pattern / check / rewrite style. Every BatchNormalization left in the graph afterwards is
reported with the reason it could not be folded.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase
from onnxscript.rewriter.rules.common import _fuse_batchnorm as onnxscript_bn

from onnxcomp.converter.base import CompressionPass, PassRecord, Skipped
from onnxcomp.core.graph import attr_float, attr_int, input_at, is_constant, only_used_by

FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")


def inference_mode_problem(bn: ir.Node) -> str | None:
    """Why a BatchNormalization is not a fixed per-channel affine map, or None if it is."""
    if attr_int(bn, "training_mode", 0):
        return "training_mode=1 (it normalises with batch statistics)"
    if not attr_int(bn, "spatial", 1):
        return "spatial=0 (per-activation statistics, opset 7-8)"
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return "its running-statistics outputs are used"
    for value in bn.inputs[1:5]:
        if value is None or value.const_value is None:
            name = value.name if value is not None else "?"
            return f"parameter '{name}' is not a constant"
    return None


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """The BatchNorm as y = x * scale + shift per channel, computed in float64."""
    gamma, beta, mean, var = (np.asarray(v.const_value.numpy(), np.float64) for v in bn.inputs[1:5])
    eps = attr_float(bn, "epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


class _InferenceOnly:
    """Mixin: onnxscript's rules plus the check that the BatchNorm is in inference mode."""

    def check(self, context, x, inbound_out, batchnorm_out) -> MatchResult:
        result = super().check(context, x, inbound_out, batchnorm_out)  # type: ignore[misc]
        if not result:
            return result
        problem = inference_mode_problem(batchnorm_out.producer())
        return result.fail(problem) if problem else result

    def rewrite(self, op, x, inbound_out, batchnorm_out):
        """onnxscript's rewrite, keeping the layer's name for the reports."""
        name = inbound_out.producer().name
        value = super().rewrite(op, x, inbound_out, batchnorm_out)  # type: ignore[misc]
        if value.producer() is not None and name:
            value.producer().name = name
        return value


class FoldIntoConv(_InferenceOnly, onnxscript_bn.FuseBatchNormIntoConv):
    """BatchNormalization(Conv(x)) -> Conv(x)."""


class FoldIntoConvTranspose(_InferenceOnly, onnxscript_bn.FuseBatchNormIntoConvTranspose):
    """BatchNormalization(ConvTranspose(x)) -> ConvTranspose(x), grouped too."""


class FoldIntoGemm(_InferenceOnly, onnxscript_bn.FuseBatchNormIntoGemm):
    """BatchNormalization(Gemm(x)) -> Gemm(x), transB 0 or 1."""


def _matmul_problem(x: ir.Value, w: ir.Value, bias: ir.Value | None) -> str | None:
    """Why BatchNorm(MatMul(x, w) [+ bias]) cannot be folded, or None."""
    if x.shape is None or len(x.shape) != 2:
        return "MatMul input is not known to be 2-D, so BatchNorm's axis 1 is not its last axis"
    if not is_constant(w):
        return f"MatMul weight '{w.name}' is not a constant"
    if len(w.const_value.shape) != 2:
        return f"MatMul weight '{w.name}' is not 2-D"
    if bias is not None:
        if not is_constant(bias):
            return f"Add operand '{bias.name}' is not a constant"
        n = w.const_value.shape[1]
        if np.asarray(bias.const_value.numpy()).size not in (1, n):
            return f"Add operand '{bias.name}' does not broadcast along the last axis"
    return None


class _FoldIntoMatMulBase(RewriteRuleClassBase):
    def _fold(self, op, x: ir.Value, w: ir.Value, bias: ir.Value | None, batchnorm_out):
        bn = batchnorm_out.producer()
        scale, shift = _bn_affine(bn)
        weight = w.const_value.numpy()
        new_weight = (weight.astype(np.float64) * scale[None, :]).astype(weight.dtype)
        old_bias = 0.0
        if bias is not None:
            old_bias = np.asarray(bias.const_value.numpy(), np.float64).reshape(-1)
        new_bias = (old_bias * scale + shift).astype(weight.dtype)
        base = bn.name or w.name
        folded_w = op.initializer(ir.tensor(new_weight), name=f"{base}.folded_weight")
        folded_b = op.initializer(ir.tensor(new_bias), name=f"{base}.folded_bias")
        return op.Add(op.MatMul(x, folded_w), folded_b)

    def _check(self, x, w, bias, batchnorm_out) -> MatchResult:
        result = MatchResult()
        problem = inference_mode_problem(batchnorm_out.producer()) or _matmul_problem(x, w, bias)
        return result.fail(problem) if problem else result


class FoldIntoMatMulAdd(_FoldIntoMatMulBase):
    """BatchNormalization(Add(MatMul(x, W), b)) -> Add(MatMul(x, W'), b'), for 2-D x."""

    def pattern(self, op, x, w, bias):
        return op.BatchNormalization(
            op.Add(op.MatMul(x, w), bias), _allow_other_inputs=True, _outputs=["batchnorm_out"]
        )

    def check(self, context, x, w, bias, batchnorm_out) -> MatchResult:
        return self._check(x, w, bias, batchnorm_out)

    def rewrite(self, op, x, w, bias, batchnorm_out):
        return self._fold(op, x, w, bias, batchnorm_out)


class FoldIntoMatMul(_FoldIntoMatMulBase):
    """BatchNormalization(MatMul(x, W)) -> Add(MatMul(x, W'), b'), for 2-D x."""

    def pattern(self, op, x, w):
        return op.BatchNormalization(
            op.MatMul(x, w), _allow_other_inputs=True, _outputs=["batchnorm_out"]
        )

    def check(self, context, x, w, batchnorm_out) -> MatchResult:
        return self._check(x, w, None, batchnorm_out)

    def rewrite(self, op, x, w, batchnorm_out):
        return self._fold(op, x, w, None, batchnorm_out)


FOLD_RULES = RewriteRuleSet(
    [
        FoldIntoConv.rule(),
        FoldIntoConvTranspose.rule(),
        FoldIntoGemm.rule(),
        FoldIntoMatMulAdd.rule(),
        FoldIntoMatMul.rule(),
    ],
    commute=True,
)


def why_not_folded(bn: ir.Node) -> str:
    """The reason a BatchNormalization left in the graph could not be folded."""
    problem = inference_mode_problem(bn)
    if problem:
        return problem
    source = bn.inputs[0]
    producer = source.producer() if source is not None else None
    if producer is None:
        return "its input is a graph input, not the output of a layer with weights"
    label = f"{producer.op_type} '{producer.name}'"
    if producer.op_type not in FOLDABLE_PRODUCERS:
        return f"it follows {label}, which has no weights to fold into"
    others = [user for user, _ in source.uses() if user is not bn]
    if others or source.is_graph_output():
        what = f"{len(others)} other node(s)" if others else "a graph output"
        return f"the output of {label} also feeds {what}; folding would change them"
    weight = input_at(producer, 1)
    if producer.op_type == "Add":
        return f"it follows {label}, which is not a MatMul + constant bias"
    if not is_constant(weight):
        return f"the weight of {label} is not a constant initializer"
    if producer.op_type == "MatMul":
        return _matmul_problem(producer.inputs[0], weight, None) or "pattern did not match"
    if not only_used_by(weight, producer):
        return f"the weight of {label} is shared with other nodes"
    return "the fusion rule's check refused it"


class FoldBatchNormPass(CompressionPass):
    """Fold inference-mode BatchNormalization into the layer before it.

    Rules:

    1. BN(Conv), BN(ConvTranspose) (grouped too) and BN(Gemm) (transB 0 or 1): the weights
       are scaled per output channel and the bias becomes (b - mean) * scale + beta
       (onnxscript's rules; a missing bias is created).
    2. BN(MatMul(x, W)) and BN(Add(MatMul(x, W), b)) with 2-D x: W's columns are scaled and
       the bias is folded as above (new initializers, so a shared W stays intact).
    3. Never folded: BN in training mode, with spatial=0, with non-constant parameters or
       used running-statistics outputs; BN whose producer's output also feeds other nodes
       or a graph output (folding would change them); producer weights that are not
       constant or are shared with other nodes.
    4. Every BN left is reported with its reason.
    """

    name = "fold-batchnorm"
    lossless = True
    min_opset = 9

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        if not any(n.op_type == "BatchNormalization" for n in model.graph):
            record.summary = "no BatchNormalization in the graph"
            return
        ir_passes.ShapeInferencePass()(model)
        count = FOLD_RULES.apply_to_model(model)
        ir.passes.Sequential(ir_passes.RemoveUnusedNodesPass(), ir_passes.TopologicalSortPass())(
            model
        )
        if count:
            record.changes.append(f"folded {count} BatchNormalization node(s)")
            record.summary = f"folded {count} BatchNormalization"
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type == "BatchNormalization":
                record.skipped.append(
                    Skipped(node.name or "BatchNormalization", why_not_folded(node))
                )
        if record.skipped:
            record.summary = f"folded {count}, kept {len(record.skipped)} BatchNormalization"
