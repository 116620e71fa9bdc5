"""Re-inserted BatchNorm: train BN-folded convolutions as conv + BatchNorm, fold back after.

onnxcomp's float outputs have every BatchNorm folded into its Conv. SGD on folded weights
diverges at learning rates that train the same network with BatchNorm (the per-filter scales
differ by orders of magnitude; on a pruned ResNet-56 the largest |grad|/|w| was 18 and KD at
lr 1e-3 went to NaN in 4 steps). `reinsert_batchnorm(module, batches)` re-parameterises each
eligible Conv ``y = W * x + b`` of an `OnnxModule`, in place:

1. each output filter and its bias are divided by the filter's L2 norm ``n_c`` (in place: the
   same ``nn.Parameter`` objects, so gradient hooks others registered survive and zeros stay
   zero); a filter with ``n_c <= MIN_NORM`` (dead) keeps ``n_c = 1``;
2. a train-mode BatchNorm (`ReinsertedBatchNorm`, eps `EPSILON`, torch momentum `MOMENTUM`)
   follows the conv, with running mean/var = the per-channel statistics of the normalised conv
   output on ``batches``, ``gamma = n_c * sqrt(var + eps)`` and ``beta`` = the mean of the
   original output: in ``eval()`` the module computes exactly what it did before.

`fold_batchnorm(module)` writes ``W = v * gamma / sqrt(rv + eps)`` and
``b = (b_v - rm) * gamma / sqrt(rv + eps) + beta`` back into the same weight and bias
parameters, removes the BatchNorm modules and restores the original steps, so that
`export_onnx()` writes the original graph (same nodes, names and initializers).

A Conv is left alone (`plan_reinsertion` says why) when its weight is not a plain trainable
float parameter (QDQ/int8 or binarized weights, frozen, or with a torch parametrization such as
a codebook), it has no bias initializer (none is added: the graph would change), its weight or
bias is shared with another node, or its output is already read by a BatchNormalization.
ConvTranspose is not re-parameterised. Re-insertion is deterministic given the batches, so a
resumed run re-inserts (same structure) and then loads its checkpoint over every value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from onnxcomp.errors import OnnxcompError

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.utils import parametrize
except ImportError:  # pragma: no cover - exercised only without torch
    raise OnnxcompError("onnxcomp.training needs torch: pip install 'onnxcomp[torch]'") from None

from onnxcomp.training.importer import OnnxModule, _Step

EPSILON = 1e-5
MOMENTUM = 0.1  # torch's convention: running = 0.9 * running + 0.1 * batch
MIN_NORM = 1e-12
_STATE = "_bn_reinsert"  # attribute of the OnnxModule: the original steps and the BN keys


class ReinsertedBatchNorm(nn.Module):
    """The BatchNorm re-inserted after a folded Conv (a step of `OnnxModule`: takes and returns
    tuples). ``weight``/``bias`` are gamma/beta; the running statistics are buffers."""

    def __init__(self, conv: str, mean, var, gamma, beta) -> None:
        super().__init__()
        self.conv = conv
        self.weight = nn.Parameter(torch.as_tensor(gamma, dtype=torch.float32).clone())
        self.bias = nn.Parameter(torch.as_tensor(beta, dtype=torch.float32).clone())
        self.register_buffer("running_mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("running_var", torch.as_tensor(var, dtype=torch.float32).clone())

    def forward(self, inputs):
        x = inputs[0]
        y = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight.to(x.dtype),
            self.bias.to(x.dtype), self.training, MOMENTUM, EPSILON,
        )  # fmt: skip
        return (y,)


@dataclass(frozen=True)
class Plan:
    """Which Conv steps can be re-parameterised (their indices in the module's steps) and why
    the others cannot (label -> reason)."""

    steps: tuple[int, ...]
    skipped: dict[str, str]


def _op_types(module: OnnxModule) -> list[str]:
    """The op type of each original step (steps are built one per node, in graph order)."""
    return [node.op_type for node in module._proto.graph.node]


def _plain_parameter(module: OnnxModule, name: str | None) -> str | None:
    """Why the initializer ``name`` is not a plain trainable float parameter, or None."""
    key = module._keys.get(name) if name else None
    if key is None or key not in module.params:
        return "is not a float initializer (QDQ or computed)"
    if name in module._qweights:
        return "is an integer or binarized weight"
    if parametrize.is_parametrized(module.params, key):
        return "has a torch parametrization (e.g. a codebook)"
    value = module.params[key]
    if not value.requires_grad or not value.is_floating_point():
        return "is not trainable"
    return None


def plan_reinsertion(module: OnnxModule) -> Plan:
    """The Conv steps `reinsert_batchnorm` would re-parameterise, and the skipped ones."""
    steps = getattr(module, _STATE)[0] if hasattr(module, _STATE) else module._steps
    types = _op_types(module)
    uses: dict[str, list[int]] = {}
    for index, step in enumerate(steps):
        for name in step.inputs:
            if name:
                uses.setdefault(name, []).append(index)
    chosen: list[int] = []
    skipped: dict[str, str] = {}
    for index, step in enumerate(steps):
        if types[index] != "Conv":
            continue
        bias = step.inputs[2] if len(step.inputs) > 2 else None
        why = None
        if not bias:
            why = "no bias initializer"
        else:
            for role, name in (("weight", step.inputs[1]), ("bias", bias)):
                reason = _plain_parameter(module, name)
                if reason is None and len(uses.get(name, ())) > 1:
                    reason = "is shared with another node"
                if reason is not None:
                    why = f"its {role} '{name}' {reason}"
                    break
        readers = uses.get(step.outputs[0], ())
        if why is None and any(types[r] == "BatchNormalization" for r in readers):
            why = "its output is already read by a BatchNormalization"
        if why is None:
            chosen.append(index)
        else:
            skipped[step.label] = why
    return Plan(tuple(chosen), skipped)


def _statistics(
    module: OnnxModule, names: list[str], batches: Iterable[Mapping]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and population variance (float64) of the tensors ``names`` over the
    batches, the module in eval mode."""
    sums: dict[str, list] = {}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for feeds in batches:
                tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in feeds.items()}
                device = next(iter(module.params.values())).device
                tensors = {k: v.to(device) for k, v in tensors.items()}
                out = module.run(tensors, names)
                for name in names:
                    y = out[name].double()
                    axes = [0, *range(2, y.dim())]
                    count = y.numel() // y.shape[1]
                    moments = [count, y.sum(axes), (y * y).sum(axes)]
                    if name in sums:
                        sums[name] = [a + b for a, b in zip(sums[name], moments, strict=True)]
                    else:
                        sums[name] = moments
    finally:
        module.train(was_training)
    if not sums:
        raise OnnxcompError("training: BatchNorm re-insertion needs at least one batch of data")
    stats = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        stats[name] = (mean.cpu().numpy(), var.cpu().numpy())
    return stats


def reinsert_batchnorm(module: OnnxModule, batches: Iterable[Mapping]) -> list[str]:
    """Re-parameterise the eligible Convs of ``module`` in place (module docstring); returns
    their labels. ``batches`` are feeds (input name -> array or tensor) for the statistics."""
    if hasattr(module, _STATE):
        raise OnnxcompError("training: BatchNorm is already re-inserted; fold it back first")
    plan = plan_reinsertion(module)
    if not plan.steps:
        return []
    original = list(module._steps)
    convs = [original[i] for i in plan.steps]
    stats = _statistics(module, [s.outputs[0] for s in convs], batches)
    replaced: dict[int, list[_Step]] = {}
    keys: list[tuple[str, int]] = []
    for index, conv in zip(plan.steps, convs, strict=True):
        weight = module.params[module._keys[conv.inputs[1]]]
        bias = module.params[module._keys[conv.inputs[2]]]
        with torch.no_grad():
            norm = weight.detach().double().flatten(1).norm(dim=1)
            norm = torch.where(norm > MIN_NORM, norm, torch.ones_like(norm))
            shape = [-1] + [1] * (weight.dim() - 1)
            weight.copy_((weight.double() / norm.view(shape)).to(weight.dtype))
            bias.copy_((bias.double() / norm).to(bias.dtype))
        n = norm.cpu().numpy()
        mean, var = stats[conv.outputs[0]]
        norm_mean, norm_var = mean / n, var / (n * n)
        gamma = n * np.sqrt(norm_var + EPSILON)
        bn = ReinsertedBatchNorm(conv.label, norm_mean, norm_var, gamma, mean).to(weight.device)
        bn.train(module.training)
        key = module._key(conv.outputs[0] + "_reinserted_bn", module.nodes)
        module.nodes[key] = bn
        keys.append((key, index))
        hidden = conv.outputs[0] + "::before_reinserted_bn"
        replaced[index] = [
            replace(conv, outputs=(hidden, *conv.outputs[1:])),
            _Step(f"{conv.label} BatchNorm", "module", None, key, (hidden,), conv.outputs[:1]),
        ]
    module._steps = [s for i, step in enumerate(original) for s in replaced.get(i, [step])]
    setattr(module, _STATE, (original, keys))
    return [c.label for c in convs]


def reinserted(module: OnnxModule) -> list[str]:
    """The labels of the Convs currently trained with a re-inserted BatchNorm."""
    if not hasattr(module, _STATE):
        return []
    return [module.nodes[key].conv for key, _ in getattr(module, _STATE)[1]]


def weight_scales(module: OnnxModule) -> dict[str, torch.Tensor]:
    """Per re-parameterised Conv weight (by initializer name), the per-output-channel factor
    ``gamma / sqrt(rv + eps)`` that the fold will multiply it by (detached): the weight the
    exported model holds is ``v * factor``. Empty when nothing is re-inserted."""
    if not hasattr(module, _STATE):
        return {}
    original, keys = getattr(module, _STATE)
    scales = {}
    for key, index in keys:
        bn = module.nodes[key]
        with torch.no_grad():
            scales[original[index].inputs[1]] = bn.weight / torch.sqrt(bn.running_var + EPSILON)
    return scales


def fold_batchnorm(module: OnnxModule) -> list[str]:
    """Fold every re-inserted BatchNorm back into its Conv's weight and bias (in place, the same
    parameters) and restore the original steps; returns the Convs' labels."""
    if not hasattr(module, _STATE):
        return []
    original, keys = getattr(module, _STATE)
    labels = []
    for key, index in keys:
        bn, conv = module.nodes[key], original[index]
        weight_key, bias_key = module._keys[conv.inputs[1]], module._keys[conv.inputs[2]]
        for k in (weight_key, bias_key):
            if parametrize.is_parametrized(module.params, k):
                raise OnnxcompError(
                    f"training: {bn.conv}: its weight or bias got a torch parametrization after "
                    "BatchNorm re-insertion; apply constraints before re-inserting BatchNorm"
                )
        weight, bias = module.params[weight_key], module.params[bias_key]
        with torch.no_grad():
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + EPSILON)
            shift = bn.bias.double() - bn.running_mean.double() * scale
            shape = [-1] + [1] * (weight.dim() - 1)
            weight.copy_((weight.double() * scale.view(shape)).to(weight.dtype))
            bias.copy_((bias.double() * scale + shift).to(bias.dtype))
        del module.nodes[key]
        labels.append(bn.conv)
    module._steps = list(original)
    delattr(module, _STATE)
    return labels
