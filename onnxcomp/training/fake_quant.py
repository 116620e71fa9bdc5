"""LSQ fake quantization (Esser et al. 2020, "Learned Step Size Quantization").

A QuantizeLinear -> DequantizeLinear pair of a QDQ model becomes one `FakeQuant`:

    x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s

with a learnable step ``s`` (per tensor, or per channel along ``axis``) and a fixed zero point
``z``. Rounding passes gradients straight through (STE), so

    d x_hat / d x = 1 inside the range, 0 outside;
    d x_hat / d s = round(x / s) - x / s inside, qmin - z below, qmax - z above;

and the step's gradient is multiplied by LSQ's ``g = 1 / sqrt(n * qmax)`` (n: elements per
step, i.e. per sample for activations and per channel for weights), which keeps the step's
updates in proportion to the weights'. Rounding is half to even, as ONNX Runtime's.

The step is learned in the log domain relative to its initial value ``s0`` (as TQT, Jain et
al. 2020, trains log thresholds), ``s = s0 * exp(b * tanh(theta / b))`` with ``b =
log(MAX_STEP_RATIO)``: always positive, within ``MAX_STEP_RATIO`` of ``s0`` either way (so
ONNX Runtime's fused QLinear ops, which need input/output scale ratios in bounded ranges, keep
accepting the exported model), and ``d L / d theta = s * d L / d s`` near ``theta = 0``, which
SGD updates by the same *relative* amount whatever the step's size. A raw step did not: PTQ
models hold per-channel weight steps from 1e-9 (nearly dead channels) to 1e-1, and one
learning rate moved the small ones by hundreds of times their value, through zero to the
floor, and ONNX Runtime then refused the model. The learning rate of ``theta`` is therefore a
rate of relative change, not comparable with the weights' learning rate.
"""

from __future__ import annotations

import math

import numpy as np

from onnxcomp.errors import OnnxcompError

try:
    import torch
    from torch import nn
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise OnnxcompError("onnxcomp.training needs torch: pip install 'onnxcomp[torch]'") from error

# Integer types a QuantizeLinear / DequantizeLinear may use, with their ranges.
INT_RANGES: dict[np.dtype, tuple[int, int]] = {
    np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max))
    for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)
}
MIN_SCALE = 1e-12
# A learned step stays within this factor of its initial value, either way.
MAX_STEP_RATIO = 16.0


def int_range(dtype: np.dtype, where: str) -> tuple[int, int]:
    """(qmin, qmax) of an integer quantization type, or a one-line error naming ``where``."""
    found = INT_RANGES.get(np.dtype(dtype))
    if found is None:
        raise OnnxcompError(
            f"training: {where} quantizes to {np.dtype(dtype)}; the importer trains "
            "int8/uint8/int16/uint16 QDQ models only"
        )
    return found


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, its gradient multiplied by ``g`` in the backward pass."""
    return (x - x * g).detach() + x * g


def broadcast_shape(scale_numel: int, rank: int, axis: int | None) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``axis`` of a rank-``rank`` tensor."""
    if axis is None or scale_numel == 1:
        return [1] * rank if scale_numel == 1 else [scale_numel]
    shape = [1] * rank
    shape[axis % rank] = scale_numel
    return shape


class FakeQuant(nn.Module):
    """Fake quantization with a learnable LSQ step and a fixed zero point.

    ``per_sample``: True for activations (the first axis is the batch, LSQ's n counts the
    elements of one sample), False for weights (n counts the elements of one channel).
    """

    def __init__(
        self,
        scale: np.ndarray,
        zero_point: np.ndarray,
        qmin: int,
        qmax: int,
        axis: int | None = None,
        per_sample: bool = True,
    ) -> None:
        super().__init__()
        scale = np.maximum(np.asarray(scale, dtype=np.float32), MIN_SCALE)
        self.scalar = scale.ndim == 0
        self.register_buffer("initial_scale", torch.from_numpy(scale.reshape(-1).copy()))
        self.log_scale = nn.Parameter(torch.zeros(scale.size))
        zero = np.broadcast_to(np.asarray(zero_point, dtype=np.float32).reshape(-1), scale.size)
        self.register_buffer("zero_point", torch.from_numpy(zero.copy()))
        self.qmin, self.qmax = qmin, qmax
        self.axis = axis
        self.per_sample = per_sample

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's step-gradient scale g = 1 / sqrt(n * qmax) for input ``x``."""
        n = x.numel() // (x.shape[0] if self.per_sample and x.dim() > 0 else 1)
        if self.log_scale.numel() > 1:
            n = x.numel() // self.log_scale.numel()
        return 1.0 / math.sqrt(max(n, 1) * max(self.qmax, 1))

    def step(self) -> torch.Tensor:
        """The learned step: positive, within MAX_STEP_RATIO of the initial one."""
        bound = math.log(MAX_STEP_RATIO)
        return self.initial_scale * torch.exp(bound * torch.tanh(self.log_scale / bound))

    def _step_and_zero(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = broadcast_shape(self.log_scale.numel(), x.dim(), self.axis)
        s = _grad_scale(self.step(), self.grad_factor(x)).reshape(shape)
        return s, self.zero_point.reshape(shape)

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """QuantizeLinear: the integers clamp(round(x / s) + z), as floats, rounding by STE."""
        s, z = self._step_and_zero(x)
        return torch.clamp(_round_ste(x / s) + z, self.qmin, self.qmax)

    def from_int(self, q: torch.Tensor) -> torch.Tensor:
        """DequantizeLinear: (q - z) * s."""
        s, z = self._step_and_zero(q)
        return (q - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self._step_and_zero(x)
        q = torch.clamp(_round_ste(x / s) + z, self.qmin, self.qmax)
        return (q - z) * s

    def exported_scale(self) -> np.ndarray:
        """The learned step as the ONNX scale initializer wants it (a scalar when it was one)."""
        array = self.step().detach().cpu().numpy().astype(np.float32)
        return array.reshape(()) if self.scalar else array

    def quantize(self, w: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """``w`` as integers of ``dtype`` with the learned step (for re-writing weights)."""
        scale = self.step().detach().cpu().numpy().astype(np.float64)
        shape = broadcast_shape(scale.size, w.ndim, self.axis)
        zero = self.zero_point.cpu().numpy().astype(np.float64).reshape(shape)
        q = np.round(w.astype(np.float64) / scale.reshape(shape)) + zero
        return np.clip(q, self.qmin, self.qmax).astype(dtype)


def _sign_ste(w: torch.Tensor) -> torch.Tensor:
    """sign(w) (sign(0) = +1) forward; gradient 1 where |w| <= 1, else 0 (clipped STE)."""
    sign = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
    clipped = w.clamp(-1.0, 1.0)
    return (sign - clipped).detach() + clipped


class BinaryWeight(nn.Module):
    """BinaryConnect / BWN weights (Courbariaux et al. 2015, Rastegari et al. 2016): a latent
    float weight ``w`` trained as usual, used as

        w_b = alpha * sign(w),   alpha_c = mean |w_c| over output channel c (along ``axis``)

    with the clipped straight-through estimator for sign (d sign(w) / dw = 1 where |w| <= 1,
    0 outside) and alpha differentiated as it is computed (d alpha_c / d w = sign(w) / n_c).
    It stands where a `FakeQuant` stands for an int8 weight: ``exported_scale()`` is alpha of
    the bound latent weight and ``quantize()`` its signs, so the importer's export writes the
    signs and alphas back into the same graph.
    """

    def __init__(self, name: str, axis: int) -> None:
        super().__init__()
        self.name = name  # the weight's initializer name (the float teacher's too)
        self.axis = axis
        self._latent: list[torch.Tensor] = []  # the bound parameter, not registered twice

    def bind(self, latent: torch.Tensor) -> None:
        self._latent[:] = [latent]

    def alpha(self, w: torch.Tensor) -> torch.Tensor:
        axes = [d for d in range(w.dim()) if d != self.axis % w.dim()]
        return w.abs().mean(dim=axes, keepdim=True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.alpha(w) * _sign_ste(w)

    def to_int(self, w: torch.Tensor) -> torch.Tensor:
        """The signs (a weight has no separate QuantizeLinear; here for the importer's API)."""
        return _sign_ste(w)

    def from_int(self, q: torch.Tensor) -> torch.Tensor:
        return self.alpha(self._latent[0]) * q

    def exported_scale(self) -> np.ndarray:
        w = self._latent[0].detach()
        return self.alpha(w).reshape(-1).cpu().numpy().astype(np.float32)

    def quantize(self, w: np.ndarray, dtype: np.dtype) -> np.ndarray:
        return np.where(w >= 0, 1, -1).astype(dtype)


def init_latent_from(module: nn.Module, teacher) -> list[str]:
    """Start the latent weights of a binarized student from its float teacher (an onnx-ir
    model, BatchNorm folded as the binarize pass saw it), matched by initializer name.

    Each channel of the teacher's weight is rescaled so that mean |w| equals the student's
    alpha (the signs are the student's when the teacher is the model it was binarized from).
    Returns the names initialised; a weight whose signs disagree with the student's on more
    than 1 % of its values is a one-line error (not the model it was binarized from).
    """
    params = module.onnx_parameters()
    done: list[str] = []
    for quant in module.quants.values():
        if not isinstance(quant, BinaryWeight) or quant.name not in teacher.graph.initializers:
            continue
        latent = params[quant.name]
        source = teacher.graph.initializers[quant.name].const_value
        w = torch.from_numpy(np.asarray(source.numpy(), np.float32).copy())
        if tuple(w.shape) != tuple(latent.shape):
            continue
        with torch.no_grad():
            alpha, signs = quant.alpha(latent), torch.sign(latent)
            scaled = w * alpha / quant.alpha(w).clamp_min(MIN_SCALE)
            agree = float((torch.where(scaled >= 0, 1.0, -1.0) == signs).float().mean())
            if agree < 0.99:
                raise OnnxcompError(
                    f"training: the teacher's '{quant.name}' has other signs than the binarized "
                    f"student's ({agree:.0%} agree): give the float model it was binarized from"
                )
            latent.copy_(scaled)
        done.append(quant.name)
    return done
