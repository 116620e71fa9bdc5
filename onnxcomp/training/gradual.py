"""Gradual magnitude pruning while a student trains (Zhu & Gupta 2017, "To prune or not to
prune"): ``finetune --sparsity S`` reaches S step by step instead of pruning once.

`attach_gradual_pruning(module, model, config)` returns a `GradualPruner` whose ``on_step`` the
trainer calls after every optimizer step. Rules:

1. Which weights: `core.layers.own_weight_layers`, the rule of ``convert --sparsity`` (Conv,
   ConvTranspose, Gemm and MatMul weights read by one node; the first layer dense unless
   ``first_layer``). Refused before training (OptionError): a quantized student (int8 QDQ or
   binarized: prune the float model, then quantize), a k-means-shared one (pruning would break
   its codebooks: prune before sharing), a student without a prunable weight.
2. Schedule: with T training steps and R = max(1, round(ramp x T)), the target sparsity after
   step t is ``s_t = S + (s_i - S)(1 - t/R)^3`` for t < R, then S. ``s_i`` is the weights' own
   fraction of zeros when training starts (per layer in ``layer`` scope, overall in ``global``
   scope), at most S.
3. Masks are recomputed after every E-th step of the ramp (E = ceil(R / updates)) and after step
   R: ``layer`` scope zeroes the round(s_t x n) entries of smallest magnitude of each layer,
   ``global`` scope the round(s_t x N) smallest of all candidates together. The magnitude is
   that of the weight the written model holds: a Conv trained with a re-inserted BatchNorm
   (`reparam`) ranks ``v x gamma / sqrt(rv + eps)``. Entries already pruned rank first, so a
   pruned weight is never revived (the masks only grow); ties go by position. A layer that
   starts sparser than S keeps its zeros (noted) and loses no more in layer scope.
4. Pruned weights stay exactly zero: a gradient hook multiplies the gradient by the mask (on
   the same ``nn.Parameter`` objects: BatchNorm re-insertion and its fold scale them in place),
   and after every optimizer step the weights are multiplied by it (momentum from before a
   weight was pruned would move it otherwise).
5. The masks are buffers of the module (submodule ``gradual_masks``), so checkpoints hold them
   and ``--resume`` restores them; the schedule depends on the step alone. Under DDP rank 0's
   masks are broadcast after each update (re-inserted BatchNorm statistics are per process).
6. The written model carries the ``onnxcomp.sparsity`` mark (`mark_sparsity`), so ``pack`` and
   further fine-tunes treat it as sparse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from onnxcomp.core.graph import label
from onnxcomp.core.layers import own_weight_layers
from onnxcomp.core.ops import SHARED_MARK, SPARSITY_MARK, read_mark
from onnxcomp.errors import OnnxcompError, OptionError
from onnxcomp.training.importer import OnnxModule

try:
    import torch
    import torch.distributed as dist
    from torch import nn
except ImportError:  # pragma: no cover - the importer above raises first
    raise OnnxcompError("onnxcomp.training needs torch: pip install 'onnxcomp[torch]'") from None

SCOPES = ("layer", "global")
DEFAULT_RAMP = 0.75
DEFAULT_UPDATES = 20
MODULE_KEY = "gradual_masks"


@dataclass(frozen=True)
class GradualConfig:
    """``--sparsity`` S in [0, 1), ``--sparsity-scope``, ``--sparsity-ramp`` (the fraction of
    the training steps over which the target rises to S, in (0, 1]), ``updates`` (mask
    recomputations over the ramp) and ``--compress-first-layer``; checked when built."""

    sparsity: float
    scope: str = "layer"
    ramp: float = DEFAULT_RAMP
    updates: int = DEFAULT_UPDATES
    first_layer: bool = False

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise OptionError(f"--sparsity {s!r}: give a fraction in [0, 1)")
        if self.scope not in SCOPES:
            raise OptionError(f"--sparsity-scope {self.scope!r}: give one of {', '.join(SCOPES)}")
        r = self.ramp
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise OptionError(f"--sparsity-ramp {r!r}: give a fraction of training in (0, 1]")
        if isinstance(self.updates, bool) or not isinstance(self.updates, int) or self.updates < 1:
            raise OptionError(f"sparsity updates must be a positive integer, got {self.updates!r}")


def target_sparsity(step: int, ramp_steps: int, final: float, initial: float = 0.0) -> float:
    """Rule 2: Zhu & Gupta's cubic schedule after ``step`` steps of a ramp of ``ramp_steps``."""
    if step >= ramp_steps:
        return final
    return final + (initial - final) * (1.0 - step / ramp_steps) ** 3


def schedule_steps(total_steps: int, config: GradualConfig) -> tuple[int, int]:
    """Rules 2-3: (R, E): the ramp's length in steps and the steps between mask updates."""
    ramp = max(1, round(config.ramp * total_steps))
    return ramp, max(1, math.ceil(ramp / config.updates))


class GradualPruner(nn.Module):
    """The masks (buffers ``m0, m1, ...``: 1 kept, 0 pruned) of the weights ``names`` and the
    step hook (module docstring). ``scales()`` gives per-output-channel factors of weights whose
    written value is the parameter times that factor (re-inserted BatchNorm)."""

    def __init__(
        self,
        names: list[str],
        params: list[nn.Parameter],
        config: GradualConfig,
        scales: Callable[[], dict[str, torch.Tensor]] = dict,
    ) -> None:
        super().__init__()
        self.config = config
        self.names = list(names)
        self.weights = list(params)  # a plain list: the parameters stay the student's
        self.scales = scales
        for i, param in enumerate(self.weights):
            self.register_buffer(f"m{i}", (param.detach() != 0).to(param.dtype))
            param.register_hook(lambda grad, key=f"m{i}": grad * self._buffers[key])
        zeros = [int((self.mask(i) == 0).sum()) for i in range(len(self.weights))]
        sizes = [p.numel() for p in self.weights]
        if config.scope == "layer":
            self.initial = [min(z / n, config.sparsity) for z, n in zip(zeros, sizes, strict=True)]
        else:
            overall = min(sum(zeros) / max(1, sum(sizes)), config.sparsity)
            self.initial = [overall] * len(sizes)
        self.beyond = [
            name for name, z, n in zip(self.names, zeros, sizes, strict=True)
            if z / n > config.sparsity
        ]  # fmt: skip

    def mask(self, i: int) -> torch.Tensor:
        return self._buffers[f"m{i}"]

    def on_step(self, step: int, total_steps: int) -> None:
        """Rules 3-4, after optimizer step ``step`` (1-based) of ``total_steps``."""
        ramp, every = schedule_steps(total_steps, self.config)
        if step <= ramp and (step % every == 0 or step == ramp):
            self.update(step, ramp)
        self.apply_masks()

    def apply_masks(self) -> None:
        with torch.no_grad():
            for i, param in enumerate(self.weights):
                param.mul_(self.mask(i))

    def _magnitudes(self) -> list[torch.Tensor]:
        """|written weight| per candidate, flattened; pruned entries -1 (rule 3)."""
        scales = self.scales()
        out = []
        for i, (name, param) in enumerate(zip(self.names, self.weights, strict=True)):
            magnitude = param.detach().abs()
            if name in scales:
                shape = [-1] + [1] * (param.dim() - 1)
                magnitude = magnitude * scales[name].detach().abs().view(shape)
            magnitude = torch.where(self.mask(i) > 0, magnitude, torch.full_like(magnitude, -1))
            out.append(magnitude.flatten())
        return out

    def update(self, step: int, ramp: int) -> None:
        """Rule 3: the masks for the target after ``step`` steps of a ramp of ``ramp``, applied
        to the weights."""
        final = self.config.sparsity
        with torch.no_grad():
            keys = self._magnitudes()
            if self.config.scope == "layer":
                for i, key in enumerate(keys):
                    target = target_sparsity(step, ramp, final, self.initial[i])
                    self._prune(i, _smallest(key, round(target * key.numel())))
            else:
                flat = torch.cat([k.double().cpu() for k in keys])
                target = target_sparsity(step, ramp, final, self.initial[0])
                pruned = _smallest(flat, round(target * flat.numel()))
                start = 0
                for i, key in enumerate(keys):
                    self._prune(i, pruned[start : start + key.numel()].to(key.device))
                    start += key.numel()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for i in range(len(self.weights)):
                    dist.broadcast(self.mask(i), 0)
        self.apply_masks()

    def _prune(self, i: int, pruned: torch.Tensor) -> None:
        mask = self.mask(i)
        mask.mul_((~pruned).view(mask.shape).to(mask.dtype))  # only grows: rule 3

    def fractions(self) -> dict[str, float]:
        """Each candidate's fraction of zeros now."""
        return {
            name: round(float((p.detach() == 0).double().mean()), 6)
            for name, p in zip(self.names, self.weights, strict=True)
        }

    def overall(self) -> float:
        zeros = sum(int((p.detach() == 0).sum()) for p in self.weights)
        return zeros / max(1, sum(p.numel() for p in self.weights))


def _smallest(key: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean: the ``count`` entries of smallest key (pruned ones, at -1, first; ties by
    position), at least every entry already pruned."""
    count = max(count, int((key < 0).sum()))
    pruned = torch.zeros(key.numel(), dtype=torch.bool, device=key.device)
    if count > 0:
        pruned[torch.argsort(key, stable=True)[:count]] = True
    return pruned


def attach_gradual_pruning(
    module: OnnxModule,
    model: ir.Model,
    config: GradualConfig,
    scales: Callable[[], dict[str, torch.Tensor]] = dict,
) -> tuple[GradualPruner, list[str]]:
    """Rule 1's checks, then a `GradualPruner` on ``module`` (imported from ``model``),
    registered as its submodule ``gradual_masks``; returns it and the report's notes."""
    if len(module.quants):
        raise OptionError(
            "--sparsity: the student is quantized (int8 QDQ or binarized); gradual pruning "
            "trains float weights: prune the float model, then quantize it"
        )
    layers, left = own_weight_layers(model.graph, config.first_layer)
    skipped = [(label(node), reason) for node, reason in left]
    shared = sorted(set(read_mark(model, SHARED_MARK)) & {str(la.weight.name) for la in layers})
    if shared:
        raise OptionError(
            f"--sparsity: the student's weights are k-means shared ({shared[0]}...); pruning "
            "would break the codebooks: prune first (--sparsity), then --weight-sharing"
        )
    params = module.onnx_parameters()
    names = [str(la.weight.name) for la in layers if str(la.weight.name) in params]
    if not names:
        raise OptionError(
            "--sparsity: the student has no prunable weight (Conv/Gemm/MatMul weights read by "
            "one node, the first layer left dense unless --compress-first-layer)"
        )
    pruner = GradualPruner(names, [params[n] for n in names], config, scales)
    module.add_module(MODULE_KEY, pruner)
    notes = [
        f"gradual pruning to {config.sparsity:.1%} ({config.scope} scope) of {len(names)} "
        f"weight(s) over the first {config.ramp:.0%} of training (cubic schedule)"
    ]
    if skipped:
        notes.append(
            "left dense: " + ", ".join(f"{who} ({why})" for who, why in skipped[:3])
            + (" ..." if len(skipped) > 3 else "")
        )  # fmt: skip
    if pruner.beyond:
        notes.append(
            f"{len(pruner.beyond)} weight(s) already sparser than {config.sparsity:.1%} keep "
            f"their zeros (none is revived): {', '.join(pruner.beyond[:3])}"
        )
    return pruner, notes


def mark_sparsity(model: ir.Model, fractions: dict[str, float]) -> None:
    """Rule 6: ``fractions`` merged into the model's ``onnxcomp.sparsity`` mark."""
    marks = {**read_mark(model, SPARSITY_MARK), **fractions}
    model.metadata_props[SPARSITY_MARK] = json.dumps(marks, sort_keys=True)


def sparsity_note(pruner: GradualPruner) -> str:
    """The report's line: the final sparsity overall and per weight."""
    fractions = pruner.fractions()
    each = ", ".join(f"{n} {f:.1%}" for n, f in fractions.items())
    return f"final sparsity {pruner.overall():.1%} overall; per weight: {each}"
