"""Lossless graph cleanup, built from onnx-ir's and onnxscript's passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript import optimizer, rewriter
from onnxscript.rewriter.rules import common as rules

from onnxcomp.converter.base import CompressionPass, PassRecord, Skipped
from onnxcomp.core.graph import fold_constant_of_shape

# Arithmetic no-ops (x*1, x+0, x-0, x/1) and Transposes with the identity permutation.
_NO_OP_RULES = rewriter.RewriteRuleSet(
    [
        *rules.mul_by_1_rule.commute(),
        *rules.add_0_rule.commute(),
        rules.sub_0_rule,
        rules.div_by_1_rule,
        rules.no_op_transpose_rule,
    ]
)


def _dropout_is_inference(node: ir.Node) -> tuple[bool, str]:
    """Whether a Dropout is the identity at inference, and if not, why."""
    if len(node.outputs) > 1 and node.outputs[1].is_graph_output():
        return False, "its mask output is a graph output"
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return False, "its mask output is used"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        training = node.inputs[2].const_value
        if training is None:
            return False, "training_mode is not a constant"
        if bool(np.asarray(training.numpy()).item()):
            return False, "training_mode is true"
    return True, ""


class CleanupPass(CompressionPass):
    """Lossless cleanup of an exported graph.

    Rules, in order:

    1. Dropout in inference mode becomes Identity. Not when its mask output is used or
       when training_mode is true or not a constant (reported as skipped).
    2. Constant folding (onnxscript's folder): nodes whose inputs are all constants are
       computed once and replaced by initializers (ConstantOfShape too, within the folder's
       size limit); Constant nodes become initializers.
    3. Arithmetic no-ops (x*1, x+0, x-0, x/1, identity Transpose) become Identity.
    4. Identity nodes are removed (onnx-ir): an Identity from a graph input to a graph
       output is kept, since removing it would rename an interface tensor.
    5. Dead nodes and unused initializers are removed (onnx-ir); graph inputs and outputs
       are never touched.
    6. Initializers also listed as graph inputs (old exporters) stop being inputs, when the
       IR version allows it (4 and up).
    """

    name = "cleanup"
    lossless = True

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        graph = model.graph
        initializers_before = len(graph.initializers)
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
                continue
            ok, reason = _dropout_is_inference(node)
            if not ok:
                record.skipped.append(Skipped(node.name or "Dropout", reason))
                continue
            identity = ir.Node("", "Identity", [node.inputs[0]], name=node.name)
            node.graph.insert_before(node, identity)
            old = node.outputs[0]
            ir.convenience.replace_all_uses_with(
                old, identity.outputs[0], replace_graph_outputs=True
            )
            identity.outputs[0].name = old.name
            identity.outputs[0].type, identity.outputs[0].shape = old.type, old.shape
            node.graph.remove(node, safe=True)
        folded = optimizer.fold_constants(
            model, onnx_shape_inference=True, should_fold=fold_constant_of_shape
        )
        if folded.modified:
            record.changes.append("folded constant subgraphs into initializers")
        rewriter.RewritePass(_NO_OP_RULES)(model)
        if model.ir_version >= 4:
            ir_passes.RemoveInitializersFromInputsPass()(model)
        ir.passes.Sequential(
            ir_passes.IdentityEliminationPass(),
            ir_passes.RemoveUnusedNodesPass(),
            ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            ir_passes.RemoveUnusedOpsetsPass(),
        )(model)
        for value in graph.initializers.values():  # onnxscript's bookkeeping, not model data
            for key in [k for k in value.metadata_props if k.startswith("pkg.onnxscript.")]:
                del value.metadata_props[key]
        removed = initializers_before - len(graph.initializers)
        if removed > 0:
            record.changes.append(f"removed {removed} unused initializers")
