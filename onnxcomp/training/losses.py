"""Distillation losses (torch ``nn.Module``s) and the objective that combines them.

With student logits z_s, teacher logits z_t, temperature T and p(z) = softmax(z / T):

- Hinton KD (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):
  ``KD = T^2 * KL(p(z_t) || p(z_s))``, averaged over the batch; with labels the objective is
  ``(1 - alpha) * CE + alpha * KD``.
- DKD (Zhao et al. 2022, "Decoupled Knowledge Distillation"): with b = (p_target, 1 - p_target)
  and p^ the softmax over the non-target classes only, ``TCKD = KL(b_t || b_s)``,
  ``NCKD = KL(p^_t || p^_s)``, ``DKD = T^2 * (alpha * TCKD + beta * NCKD)``, optionally times the
  warm-up factor ``min((epoch + 1) / warmup, 1)``; the objective is ``CE + DKD``.
- FitNets hints (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"):
  ``weight * mean((r(F_s) - F_t)^2)`` with a learnable regressor r (1x1 convolution for 4-D
  features, linear for 2-D), built from the first shapes it sees.
- Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"):
  ``Q(F) = sum_c |F_c|^p`` (p = 2) flattened and L2-normalised; the loss is
  ``beta / 2 * mean((Q_s - Q_t)^2)``, the squared L2 distance averaged over batch and positions
  as in the authors' code (beta = 1000 there); maps of different sizes are matched by adaptive
  average pooling to the smaller one.

:class:`DistillationObjective` adds cross-entropy when labels are given (KD-only otherwise) to
any of these on named tensors and returns the loss and its weighted parts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from onnxcomp.errors import OnnxcompError, OptionError

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as error:  # the torch extra
    raise OnnxcompError(
        "onnxcomp.training.losses needs torch: pip install 'onnxcomp[torch]'"
    ) from error

Tensor = torch.Tensor


def _positive(label: str, value: float) -> float:
    if not value > 0:
        raise OptionError(f"{label} must be > 0, got {value}")
    return float(value)


def _non_negative(label: str, value: float) -> float:
    if not value >= 0:
        raise OptionError(f"{label} must be >= 0, got {value}")
    return float(value)


def _fraction(label: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise OptionError(f"{label} must be between 0 and 1, got {value}")
    return float(value)


def _class_kl(teacher_log: Tensor, student_log: Tensor) -> Tensor:
    """KL(teacher || student) from log-probabilities over axis 1, averaged over the rest."""
    return (teacher_log.exp() * (teacher_log - student_log)).sum(1).mean()


class KDLoss(nn.Module):
    """Hinton's distillation term ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    ``alpha`` is the term's share against cross-entropy, read by the objective:
    ``(1 - alpha) * CE + alpha * KD`` with labels, KD alone without.
    """

    name = "kd"

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature = _positive("KD temperature", temperature)
        self.alpha = _fraction("KD alpha", alpha)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        t = self.temperature
        student_log = F.log_softmax(student / t, dim=1)
        teacher_log = F.log_softmax(teacher.detach() / t, dim=1)
        return _class_kl(teacher_log, student_log) * t * t


def _target_split(log_probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """log b = (log p_target, log(1 - p_target)) from (batch, classes) log-probabilities, and
    the target mask."""
    mask = F.one_hot(target, log_probs.shape[1]).bool()
    others = log_probs[~mask].view(log_probs.shape[0], -1)
    log_target = log_probs[mask].view(-1, 1)
    return torch.cat([log_target, torch.logsumexp(others, dim=1, keepdim=True)], dim=1), mask


class DKDLoss(nn.Module):
    """Decoupled KD: ``T^2 * (alpha * TCKD + beta * NCKD)``, times the warm-up factor.

    The target class is the label; without labels, the teacher's top-1 class. ``warmup`` > 0
    scales the loss by ``min((epoch + 1) / warmup, 1)`` (``epoch`` counted from 0, set with
    :meth:`set_epoch`); the paper warms up over 20 epochs on CIFAR.
    """

    name = "dkd"

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 0
    ) -> None:
        super().__init__()
        self.alpha = _non_negative("DKD alpha", alpha)
        self.beta = _non_negative("DKD beta", beta)
        self.temperature = _positive("DKD temperature", temperature)
        if warmup < 0:
            raise OptionError(f"DKD warm-up must be >= 0 epochs, got {warmup}")
        self.warmup = int(warmup)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        if student.ndim != 2:
            raise OnnxcompError(
                f"DKD needs (batch, classes) logits, got shape {list(student.shape)}; use KD"
            )
        teacher = teacher.detach()
        if target is None:
            target = teacher.argmax(dim=1)
        t = self.temperature
        student_log = F.log_softmax(student / t, dim=1)
        teacher_log = F.log_softmax(teacher / t, dim=1)
        b_student, mask = _target_split(student_log, target)
        b_teacher, _ = _target_split(teacher_log, target)
        tckd = _class_kl(b_teacher, b_student)
        rows = student.shape[0]
        nckd = _class_kl(
            F.log_softmax(teacher[~mask].view(rows, -1) / t, dim=1),
            F.log_softmax(student[~mask].view(rows, -1) / t, dim=1),
        )
        factor = min((self.epoch + 1) / self.warmup, 1.0) if self.warmup else 1.0
        return factor * t * t * (self.alpha * tckd + self.beta * nckd)


def _pool_to_match(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two (batch, C, H, W) tensors pooled (adaptive average) to their smaller spatial size."""
    if a.shape[2:] == b.shape[2:]:
        return a, b
    size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:], strict=True))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


class AttentionTransferLoss(nn.Module):
    """Attention transfer between one student and one teacher feature map (batch, C, H, W).

    Channel counts may differ; spatial sizes are matched by adaptive average pooling of the
    attention maps.
    """

    name = "at"

    def __init__(self, beta: float = 1000.0, p: float = 2.0) -> None:
        super().__init__()
        self.beta = _non_negative("attention-transfer beta", beta)
        self.p = _positive("attention-transfer p", p)

    def attention(self, features: Tensor) -> Tensor:
        """``sum_c |F_c|^p`` as a (batch, 1, H, W) map (not yet normalised)."""
        if features.ndim != 4:
            raise OnnxcompError(
                "attention transfer needs (batch, channels, height, width) feature maps, got "
                f"shape {list(features.shape)}; tap a convolutional feature map"
            )
        return features.abs().pow(self.p).sum(dim=1, keepdim=True)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        a_s, a_t = _pool_to_match(self.attention(student), self.attention(teacher.detach()))
        q_s = F.normalize(a_s.flatten(1), dim=1)
        q_t = F.normalize(a_t.flatten(1), dim=1)
        return self.beta / 2 * (q_s - q_t).pow(2).mean()


class FitNetsLoss(nn.Module):
    """FitNets hint: ``weight * mean((r(F_s) - F_t)^2)`` with a learnable regressor ``r``.

    ``r`` is a 1x1 convolution (4-D features) or a linear map (2-D), without bias, from the
    student's channels to the teacher's, built on the first call (or by :meth:`build`): build
    it before creating the optimizer (``DistillationObjective.prepare``) so its parameters
    are trained. Different spatial sizes are matched by adaptive average pooling.
    """

    name = "fitnets"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = _non_negative("FitNets weight", weight)
        self.regressor: nn.Module | None = None

    def build(self, student: Tensor, teacher: Tensor) -> nn.Module:
        """The regressor for these feature shapes (made once, on the student's device)."""
        if self.regressor is not None:
            return self.regressor
        if student.ndim != teacher.ndim or student.ndim not in (2, 4):
            raise OnnxcompError(
                f"FitNets hints pair 2-D or 4-D features of the same rank; got student shape "
                f"{list(student.shape)} and teacher shape {list(teacher.shape)}"
            )
        c_in, c_out = student.shape[1], teacher.shape[1]
        layer = (
            nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
            if student.ndim == 4
            else nn.Linear(c_in, c_out, bias=False)
        )
        self.regressor = layer.to(device=student.device, dtype=student.dtype)
        return self.regressor

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        regressed = self.build(student, teacher)(student)
        teacher = teacher.detach()
        if regressed.ndim == 4:
            regressed, teacher = _pool_to_match(regressed, teacher)
        return self.weight * F.mse_loss(regressed, teacher)


@dataclass(frozen=True)
class Term:
    """One distillation loss on a named student tensor and teacher tensor.

    ``student``/``teacher`` default to the objective's logits names (for KD and DKD).
    """

    loss: nn.Module
    student: str | None = None
    teacher: str | None = None


def _label(term: Term, student: str, used: set[str]) -> str:
    base = getattr(term.loss, "name", type(term.loss).__name__.lower())
    label = base if term.student is None else f"{base}:{student}"
    count = 2
    while label in used:
        label, count = f"{base}:{student}#{count}", count + 1
    used.add(label)
    return label


class DistillationObjective(nn.Module):
    """Cross-entropy on the student's logits (when labels are given) plus distillation terms.

    With labels: ``ce_weight * CE + sum(terms)``, where ``ce_weight`` defaults to
    ``1 - alpha`` when a :class:`KDLoss` is among the terms (Hinton's mix, the KD term then
    weighted by ``alpha``) and to 1 otherwise. Without labels (KD-only): the terms alone, the
    KD term unweighted. Teacher tensors may be numpy arrays; they are moved to the student's
    device. Returns ``(loss, parts)``, ``parts`` the weighted contributions by name (``ce``,
    ``kd``, ``dkd``, ``at:<student tensor>``, ``fitnets:<student tensor>``).
    """

    def __init__(
        self,
        terms: Sequence[Term] = (),
        student_logits: str = "logits",
        teacher_logits: str | None = None,
        ce_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.student_logits = student_logits
        self.teacher_logits = teacher_logits or student_logits
        self.losses = nn.ModuleList([t.loss for t in terms])
        self.names = [
            (t.student or self.student_logits, t.teacher or self.teacher_logits) for t in terms
        ]
        used: set[str] = set()
        self.labels = [_label(t, s, used) for t, (s, _) in zip(terms, self.names, strict=True)]
        kd = [loss for loss in self.losses if isinstance(loss, KDLoss)]
        if len(kd) > 1:
            raise OptionError("give at most one KD term: its alpha sets the cross-entropy weight")
        self.kd_alpha = kd[0].alpha if kd else None
        if ce_weight is not None:
            ce_weight = _non_negative("cross-entropy weight", ce_weight)
        elif kd:
            ce_weight = 1.0 - kd[0].alpha
        self.ce_weight = 1.0 if ce_weight is None else ce_weight

    def set_epoch(self, epoch: int) -> None:
        """Tell epoch-dependent terms (DKD's warm-up) the current epoch (from 0)."""
        for loss in self.losses:
            if hasattr(loss, "set_epoch"):
                loss.set_epoch(epoch)

    def _pair(
        self, index: int, student: Mapping[str, Any], teacher: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor]:
        s_name, t_name = self.names[index]
        s_value = _lookup(student, s_name, "student")
        t_value = torch.as_tensor(
            _lookup(teacher, t_name, "teacher"), device=s_value.device, dtype=s_value.dtype
        )
        return s_value, t_value

    @torch.no_grad()
    def prepare(self, student_outputs: Mapping[str, Any], teacher_outputs: Mapping[str, Any]):
        """Build lazily-shaped parts (FitNets regressors) from one batch's outputs; call it
        before creating the optimizer so their parameters are in ``parameters()``."""
        for index, loss in enumerate(self.losses):
            if hasattr(loss, "build"):
                loss.build(*self._pair(index, student_outputs, teacher_outputs))
        return self

    def forward(
        self,
        student_outputs: Mapping[str, Tensor],
        teacher_outputs: Mapping[str, Any],
        labels: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        logits = _lookup(student_outputs, self.student_logits, "student")
        if labels is None and not len(self.losses):
            raise OnnxcompError(
                "the data has no labels and no distillation loss was chosen: nothing to train "
                "on; give labelled data or a teacher"
            )
        parts: dict[str, float] = {}
        total = logits.new_zeros(())
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device).long()
            ce = self.ce_weight * F.cross_entropy(logits, labels)
            total = total + ce
            parts["ce"] = float(ce.detach())
        for index, loss in enumerate(self.losses):
            student, teacher = self._pair(index, student_outputs, teacher_outputs)
            if isinstance(loss, DKDLoss):
                value = loss(student, teacher, labels)
            else:
                value = loss(student, teacher)
            if isinstance(loss, KDLoss) and labels is not None:
                value = loss.alpha * value
            total = total + value
            parts[self.labels[index]] = float(value.detach())
        return total, parts


def _lookup(outputs: Mapping[str, Any], name: str, side: str) -> Any:
    if name not in outputs:
        have = ", ".join(list(outputs)[:8]) or "none"
        raise OnnxcompError(
            f"the {side} has no output or tapped tensor '{name}' (have: {have}); tap it or "
            "name one of those"
        )
    return outputs[name]


@dataclass(frozen=True)
class DistillationConfig:
    """The distillation flags, checked when built (OptionError), and the objective they make.

    ``method``: ``kd`` (Hinton), ``dkd`` or ``ce`` (no logit distillation). ``features`` pairs
    (student tensor, teacher tensor) for ``feature_loss`` (``at`` or ``fitnets``), weighted by
    ``feature_weight`` (default: 1000 for attention transfer, 1 for FitNets).
    """

    method: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.9
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 0
    features: tuple[tuple[str, str], ...] = ()
    feature_loss: str = "at"
    feature_weight: float | None = None

    def __post_init__(self) -> None:
        if self.method not in ("kd", "dkd", "ce"):
            raise OptionError(f"unknown distillation method '{self.method}'; choose kd, dkd or ce")
        if self.feature_loss not in ("at", "fitnets"):
            raise OptionError(
                f"unknown feature loss '{self.feature_loss}'; choose at (attention transfer) "
                "or fitnets"
            )
        self.objective("logits")  # builds every loss once: each checks its own values

    def objective(
        self, student_logits: str, teacher_logits: str | None = None
    ) -> DistillationObjective:
        terms: list[Term] = []
        if self.method == "kd":
            terms.append(Term(KDLoss(self.temperature, self.alpha)))
        elif self.method == "dkd":
            dkd = DKDLoss(self.dkd_alpha, self.dkd_beta, self.temperature, self.dkd_warmup)
            terms.append(Term(dkd))
        for student, teacher in self.features:
            if self.feature_loss == "at":
                loss: nn.Module = AttentionTransferLoss(
                    1000.0 if self.feature_weight is None else self.feature_weight
                )
            else:
                loss = FitNetsLoss(1.0 if self.feature_weight is None else self.feature_weight)
            terms.append(Term(loss, student, teacher))
        return DistillationObjective(terms, student_logits, teacher_logits)
