"""Keep a pruned / weight-shared student's structure while it trains (Deep Compression's
retraining, Han et al. 2016).

`apply_weight_constraints(module, model)`, called once after `import_onnx`, reads the marks
``--sparsity`` and ``--weight-sharing`` leave in the model's metadata and constrains the
imported parameters in place:

1. Sparsity (``onnxcomp.sparsity``, a weight not also shared): the weight's zeros stay exactly
   zero. A gradient hook multiplies the gradient by the mask of non-zeros; with the trainer's
   SGD (momentum, weight decay) a zero weight then gets a zero update (decay of 0 is 0, its
   momentum stays 0), and so with Adam / AdamW. The Parameter object is the same one
   (BatchNorm re-insertion may scale its data in place: zeros stay zero).
2. Sharing (``onnxcomp.shared`` = {weight: K}): the weight becomes a torch parametrization
   `Codebook`: the trained tensor is the vector of its distinct non-zero values (the
   centroids), the weight is ``centroids[index]``. Autograd gives a centroid the sum of its
   members' gradients (Deep Compression's rule); a gradient hook divides it by the member
   count, so a centroid moves as the mean of its members would under the same --lr (the
   summed gradient is ~300x a weight's on ResNet-20, K=32: ``--lr 1e-3`` diverged, loss 5e6,
   in benchmarks/deep_compression_cifar.py). The exported weight has at most K distinct
   values, and zeros (the share pass keeps them as their own cluster) are a fixed 0 that is
   not trained: a pruned and shared weight keeps its sparsity.
3. Not constrained, with a note: a marked name that is not a trainable float initializer of
   the model, a shared weight with more than K distinct values (changed after sharing), a
   sparsity-marked weight without zeros. A model without marks is left as it is (no notes).
4. The marks stay in the model: `OnnxModule.export_onnx` writes the graph it imported, metadata
   included, with each weight read through its parametrization.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.core.ops import SHARED_MARK, SPARSITY_MARK, read_mark
from onnxcomp.errors import OnnxcompError
from onnxcomp.training.importer import OnnxModule

try:
    import torch
    from torch import nn
    from torch.nn.utils import parametrize
except ImportError:  # pragma: no cover - the importer above raises first
    raise OnnxcompError("onnxcomp.training needs torch: pip install 'onnxcomp[torch]'") from None


class Codebook(nn.Module):
    """Rule 2: ``weight = table[index]``; the table is the trained centroids, preceded by a
    fixed 0 when the weight keeps zeros (index 0)."""

    def __init__(self, index: torch.Tensor, count: int, zero: bool) -> None:
        super().__init__()
        self.register_buffer("index", index)
        self.count = count  # trained centroids
        self.zero = zero
        # weights per slot (the fixed zero first), once: the index never changes
        slots = torch.bincount(index.reshape(-1), minlength=count + int(zero)).clamp(min=1)
        self.register_buffer("slot_members", slots, persistent=False)

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        table = torch.cat([centroids.new_zeros(1), centroids]) if self.zero else centroids
        return table[self.index]

    def members(self) -> torch.Tensor:
        """How many weights read each trained centroid."""
        return self.slot_members[1:] if self.zero else self.slot_members

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The centroids of ``weight``: the mean of each index's members (the value itself for
        a weight that is shared)."""
        slots = self.count + int(self.zero)
        flat, index = weight.detach().reshape(-1), self.index.reshape(-1)
        sums = torch.zeros(slots, dtype=weight.dtype, device=weight.device)
        sums.index_add_(0, index, flat)
        means = sums / self.slot_members.to(weight.dtype)
        return means[1:] if self.zero else means


def codebook_of(weight: np.ndarray) -> Codebook:
    """Rule 2: the `Codebook` of a shared weight (its distinct non-zero values, sorted)."""
    zero = bool((weight == 0).any())
    values = np.unique(weight[weight != 0])
    index = np.searchsorted(values, weight) + int(zero)
    if zero:
        index[weight == 0] = 0
    return Codebook(torch.from_numpy(index.astype(np.int64)), int(values.size), zero)


class _Masks(nn.Module):
    """The sparsity masks as buffers (they follow the module to its device)."""


def apply_weight_constraints(module: OnnxModule, model: ir.Model) -> list[str]:
    """Constrain ``module`` (imported from ``model``) by the model's sparsity and sharing
    marks (see the module docstring); returns the report's notes."""
    sparse, shared = read_mark(model, SPARSITY_MARK), read_mark(model, SHARED_MARK)
    if not sparse and not shared:
        return []
    params = module.onnx_parameters()
    keys = module._keys
    notes: list[str] = []
    missing = sorted(n for n in {*sparse, *shared} if n not in params)
    if missing:
        notes.append(
            f"{len(missing)} marked weight(s) are not trainable float initializers, left as "
            f"they are: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )
    coded: set[str] = set()
    for name, k in sorted(shared.items()):
        if name not in params:
            continue
        weight = params[name].detach().cpu().numpy()
        distinct = np.unique(weight).size
        if distinct > int(k):
            notes.append(f"{name}: {distinct} distinct values > K={k}: not trained as shared")
            continue
        codebook = codebook_of(weight)
        parametrize.register_parametrization(module.params, keys[name], codebook)
        original = module.params.parametrizations[keys[name]].original
        original.register_hook(lambda grad, book=codebook: grad / book.members())
        coded.add(name)
    masked, zeros, total = _mask_sparse(module, params, sparse, coded, notes)
    if masked:
        notes.append(
            f"sparsity kept: {masked} weight(s), {zeros / total:.1%} zeros, masked gradients"
        )
    if coded:
        notes.append(
            f"weight sharing kept: {len(coded)} weight(s) train their codebooks (centroid "
            "gradient: the mean of its members'; zeros fixed)"
        )
    return notes


def _mask_sparse(
    module: OnnxModule,
    params: dict[str, nn.Parameter],
    sparse: dict,
    coded: set[str],
    notes: list[str],
) -> tuple[int, int, int]:
    """Rule 1 on the sparsity-marked weights that are not shared (a codebook keeps its zeros):
    a gradient hook per weight; returns (weights masked, their zeros, their size)."""
    masks = _Masks()
    masked = zeros = total = 0
    for name in sorted(sparse):
        if name not in params or name in coded:
            continue
        param = params[name]
        keep = (param.detach() != 0).to(param.dtype)
        if bool(keep.all()):
            notes.append(f"{name}: marked sparse but holds no zeros: not masked")
            continue
        key = f"m{masked}"
        masks.register_buffer(key, keep)
        param.register_hook(lambda grad, key=key: grad * masks._buffers[key])
        masked += 1
        zeros += int((keep == 0).sum())
        total += keep.numel()
    if masked:
        module.add_module("weight_masks", masks)
    return masked, zeros, total
