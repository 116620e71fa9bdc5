"""Low-rank factorization of Gemm, MatMul and Conv weights (``--lowrank``).

A layer with weight W is replaced by a chain of two or three cheaper layers of the same op type
whose weights multiply back to a truncated approximation of W:

* Gemm / MatMul with a constant 2-D weight, and 1x1 Conv: truncated SVD, W ~ A B with
  A = U_r sqrt(S_r) and B = sqrt(S_r) V_r^T, so y = (x A) B.
* k x k Conv, spatial SVD (Jaderberg et al. 2014, "Speeding up Convolutional Neural Networks
  with Low Rank Expansions", scheme 2): W (O, C, kh, kw) seen as the matrix
  M[(c, i), (o, j)] = W[o, c, i, j] of shape (C kh, O kw); its truncated SVD gives a (kh x 1)
  conv C -> r followed by a (1 x kw) conv r -> O.
* k x k Conv, Tucker-2 (Kim et al. 2016, "Compression of Deep Convolutional Neural Networks for
  Fast and Low Power Mobile Applications"): HOSVD on the output (0) and input (1) modes,
  W ~ core x_0 U_out x_1 U_in, as a 1x1 conv C -> r_in, the k x k core r_in -> r_out and a
  1x1 conv r_out -> O.

The ranks come from the energy of the singular values (the fraction of ||W||_F^2 kept), so the
relative weight error ||W - W_r||_F / ||W||_F of an SVD is at most sqrt(1 - rank_energy). That
bound is the error budget every method must meet. Arithmetic is float64, cast back to the
weight's dtype. MACs are counted per sample: symbolic dims (the batch) count as 1.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxcomp.converter.analysis import conv_macs, format_count, gemm_macs, matmul_macs
from onnxcomp.converter.passes.base import CompressionPass, PassContext, PassRecord, Skipped

METHODS = ("svd", "spatial", "tucker2")
# Slack on the energy threshold and the error budget, for float64 rounding of exact ranks.
_ENERGY_SLACK = 1e-10
_ERROR_SLACK = 1e-6

TARGET_OPS = frozenset({"Gemm", "MatMul", "Conv"})
Attributes = dict[str, Any]


@dataclass(frozen=True)
class LowRankConfig:
    """Settings of the low-rank pass.

    ``rank_energy``: fraction of the weight's squared singular values to keep, in (0, 1].
    ``min_macs_saving``: the fraction of a layer's MACs a factorization must save (a negative
    value lets MACs grow, which only makes sense for tests). ``methods``: which of
    ``svd`` (Gemm, MatMul, 1x1 Conv), ``spatial`` and ``tucker2`` (k x k Conv) may be used.
    ``exclude``: node names (shell patterns, ``fnmatch``) to leave alone.
    """

    rank_energy: float = 0.9
    min_macs_saving: float = 0.1
    methods: tuple[str, ...] = METHODS
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.rank_energy <= 1.0:
            raise ValueError(f"rank_energy must be in (0, 1], got {self.rank_energy}")
        if self.min_macs_saving >= 1.0:
            raise ValueError(f"min_macs_saving must be below 1, got {self.min_macs_saving}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")

    @property
    def error_budget(self) -> float:
        """The largest relative weight error allowed: sqrt(1 - rank_energy)."""
        return math.sqrt(1.0 - self.rank_energy)


@dataclass
class Stage:
    """One layer of a factorized chain: its weight (float64) and attributes."""

    weight: np.ndarray
    attributes: Attributes = field(default_factory=dict)


@dataclass
class Candidate:
    """One way to factorize a layer."""

    method: str
    ranks: tuple[int, ...]
    full_ranks: tuple[int, ...]
    stages: list[Stage]
    macs: int
    error: float

    def rank_text(self) -> str:
        ranks = "/".join(map(str, self.ranks))
        full = "/".join(map(str, self.full_ranks))
        noun = "ranks" if len(self.ranks) > 1 else "rank"
        return f"{noun} {ranks} of {full}"


@dataclass
class LayerFactorization:
    """What the pass did to one layer, for the record and for callers."""

    node: str
    op_type: str
    method: str
    ranks: tuple[int, ...]
    macs_before: int
    macs_after: int
    error: float

    def describe(self) -> str:
        ranks = "/".join(map(str, self.ranks))
        change = self.macs_after / self.macs_before - 1.0
        return (
            f"{self.op_type} '{self.node}': {self.method}, rank {ranks}, MACs "
            f"{format_count(self.macs_before)} -> {format_count(self.macs_after)} "
            f"({change:+.0%}), weight error {self.error:.4f}"
        )


# ---------------------------------------------------------------------------------------------
# Linear algebra (float64)


def energy_rank(singular: np.ndarray, energy: float) -> int:
    """The smallest r whose top-r squared singular values hold ``energy`` of the total."""
    power = np.square(np.asarray(singular, np.float64))
    cumulative = np.cumsum(power) / power.sum()
    rank = int(np.searchsorted(cumulative, energy - _ENERGY_SLACK)) + 1
    return min(rank, len(power))


def relative_error(weight: np.ndarray, approximation: np.ndarray) -> float:
    """||W - W_r||_F / ||W||_F."""
    return float(np.linalg.norm(weight - approximation) / np.linalg.norm(weight))


def truncated_svd(matrix: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A B ~ matrix: A = U_r sqrt(S_r) (m x r), B = sqrt(S_r) V_r^T (r x n)."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    rank = energy_rank(s, energy)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def leading_vectors(unfolding: np.ndarray, energy: float) -> np.ndarray:
    """The left singular vectors of a mode unfolding that hold ``energy`` of it (m x r)."""
    u, s, _ = np.linalg.svd(unfolding, full_matrices=False)
    return u[:, : energy_rank(s, energy)]


# ---------------------------------------------------------------------------------------------
# Conv geometry


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D Conv's explicit geometry: (height, width) pairs, pads as (top, left, bottom, right)."""

    in_hw: tuple[int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]

    def out_size(self, axis: int) -> int:
        extent = self.dilations[axis] * (self.kernel[axis] - 1) + 1
        padded = self.in_hw[axis] + self.pads[axis] + self.pads[axis + 2]
        return (padded - extent) // self.strides[axis] + 1

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.out_size(0), self.out_size(1)


def _ints(node: ir.Node, name: str, default: Sequence[int]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(attr.as_ints()) if attr is not None else tuple(default)


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int, int]:
    """(begin, end) pads of auto_pad SAME_UPPER / SAME_LOWER on one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def conv_geometry(node: ir.Node, kernel: tuple[int, int]) -> ConvGeometry | str:
    """The explicit geometry of a 2-D Conv, or why it cannot be known."""
    shape = node.inputs[0].shape
    if shape is None or shape.rank() != 4 or not (shape.is_static(2) and shape.is_static(3)):
        return "its input height and width are not known (fix the input dims)"
    in_hw = (int(shape[2]), int(shape[3]))
    strides = _ints(node, "strides", (1, 1))
    dilations = _ints(node, "dilations", (1, 1))
    auto_pad = node.attributes.get("auto_pad")
    mode = auto_pad.as_string() if auto_pad is not None else "NOTSET"
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        (t, b), (left, r) = (
            _same_pads(in_hw[a], kernel[a], strides[a], dilations[a], mode == "SAME_UPPER")
            for a in (0, 1)
        )
        pads = (t, left, b, r)
    elif mode == "VALID":
        pads = (0, 0, 0, 0)
    else:
        pads = _ints(node, "pads", (0, 0, 0, 0))
    return ConvGeometry(in_hw, kernel, strides[:2], dilations[:2], pads[:4])  # type: ignore[arg-type]


def _conv_attributes(geometry: ConvGeometry, only_axis: int | None = None) -> Attributes:
    """Conv attributes of the whole geometry, or of one axis only (0: vertical, 1: horizontal).

    With ``only_axis`` the other axis gets a kernel of 1, stride 1, dilation 1 and no padding.
    """
    kernel, strides = list(geometry.kernel), list(geometry.strides)
    dilations, pads = list(geometry.dilations), list(geometry.pads)
    if only_axis is not None:
        other = 1 - only_axis
        kernel[other], strides[other], dilations[other] = 1, 1, 1
        pads[other], pads[other + 2] = 0, 0
    return {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "pads": pads}


# ---------------------------------------------------------------------------------------------
# Candidates per method


def conv_svd(weight: np.ndarray, geometry: ConvGeometry, energy: float) -> Candidate:
    """1x1 Conv as two 1x1 Convs; the whole geometry goes on the first (it has no bias)."""
    out_ch, in_ch = weight.shape[:2]
    a, b = truncated_svd(weight.reshape(out_ch, in_ch), energy)  # W ~ a (O x r) b (r x C)
    rank = a.shape[1]
    ho, wo = geometry.out_hw
    stages = [
        Stage(b.reshape(rank, in_ch, 1, 1), _conv_attributes(geometry)),
        Stage(a.reshape(out_ch, rank, 1, 1), {}),
    ]
    macs = conv_macs((1, rank, ho, wo), (rank, in_ch, 1, 1))
    macs += conv_macs((1, out_ch, ho, wo), (out_ch, rank, 1, 1))
    error = relative_error(weight.reshape(out_ch, in_ch), a @ b)
    return Candidate("svd", (rank,), (min(out_ch, in_ch),), stages, macs, error)


def conv_spatial(weight: np.ndarray, geometry: ConvGeometry, energy: float) -> Candidate:
    """k x k Conv as a (kh x 1) Conv C -> r and a (1 x kw) Conv r -> O."""
    out_ch, in_ch, kh, kw = weight.shape
    matrix = weight.transpose(1, 2, 0, 3).reshape(in_ch * kh, out_ch * kw)
    a, b = truncated_svd(matrix, energy)
    rank = a.shape[1]
    vertical = a.reshape(in_ch, kh, rank).transpose(2, 0, 1)[..., None]  # (r, C, kh, 1)
    horizontal = b.reshape(rank, out_ch, kw).transpose(1, 0, 2)[:, :, None, :]  # (O, r, 1, kw)
    ho, wo = geometry.out_hw
    stages = [
        Stage(vertical, _conv_attributes(geometry, only_axis=0)),
        Stage(horizontal, _conv_attributes(geometry, only_axis=1)),
    ]
    macs = conv_macs((1, rank, ho, geometry.in_hw[1]), vertical.shape)
    macs += conv_macs((1, out_ch, ho, wo), horizontal.shape)
    error = relative_error(matrix, a @ b)
    return Candidate("spatial", (rank,), (min(in_ch * kh, out_ch * kw),), stages, macs, error)


def conv_tucker2(weight: np.ndarray, geometry: ConvGeometry, energy: float) -> Candidate:
    """k x k Conv as 1x1 C -> r_in, k x k core r_in -> r_out, 1x1 r_out -> O.

    Each mode keeps 1 - (1 - energy) / 2 of its energy, so by the HOSVD error bound the
    squared error of both truncations together stays within 1 - energy.
    """
    out_ch, in_ch = weight.shape[:2]
    mode_energy = 1.0 - (1.0 - energy) / 2.0
    u_out = leading_vectors(weight.reshape(out_ch, -1), mode_energy)  # (O, r_out)
    u_in = leading_vectors(weight.transpose(1, 0, 2, 3).reshape(in_ch, -1), mode_energy)
    core = np.einsum("oikl,or,is->rskl", weight, u_out, u_in)  # (r_out, r_in, kh, kw)
    r_out, r_in = core.shape[:2]
    approximation = np.einsum("rskl,or,is->oikl", core, u_out, u_in)
    ho, wo = geometry.out_hw
    stages = [
        Stage(u_in.T.reshape(r_in, in_ch, 1, 1), {}),
        Stage(core, _conv_attributes(geometry)),
        Stage(u_out.reshape(out_ch, r_out, 1, 1), {}),
    ]
    macs = conv_macs((1, r_in, *geometry.in_hw), (r_in, in_ch, 1, 1))
    macs += conv_macs((1, r_out, ho, wo), core.shape)
    macs += conv_macs((1, out_ch, ho, wo), (out_ch, r_out, 1, 1))
    error = relative_error(weight, approximation)
    return Candidate("tucker2", (r_in, r_out), (in_ch, out_ch), stages, macs, error)


def matrix_svd(
    matrix: np.ndarray, rows: int, energy: float, transposed: bool, attributes: list[Attributes]
) -> Candidate:
    """x @ W as (x @ A) @ B for W (K x N); ``transposed`` stores A^T and B^T (Gemm transB=1)."""
    a, b = truncated_svd(matrix, energy)
    rank = a.shape[1]
    weights = (a.T, b.T) if transposed else (a, b)
    stages = [Stage(w, attrs) for w, attrs in zip(weights, attributes, strict=True)]
    macs = matmul_macs((rows, matrix.shape[0]), a.shape) + matmul_macs((rows, rank), b.shape)
    error = relative_error(matrix, a @ b)
    return Candidate("svd", (rank,), (min(matrix.shape),), stages, macs, error)


# ---------------------------------------------------------------------------------------------
# Layers


@dataclass
class Layer:
    """A layer that may be factorized: its node, weight, current MACs and candidates."""

    node: ir.Node
    name: str
    weight: ir.Value
    macs: int
    candidates: list[Candidate]


def _static_product(shape: ir.Shape | None, dims: slice) -> int:
    """The product of the known dims of ``shape`` in ``dims``; symbolic or unknown count as 1."""
    if shape is None:
        return 1
    return math.prod(int(d) if isinstance(d, int) else 1 for d in list(shape)[dims])


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _weight_problem(node: ir.Node, label: str) -> str | None:
    """Why the node's weight (input 1) cannot be factorized, or None."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None or weight.is_graph_input():
        return f"the weight of {label} is not a constant initializer"
    users = len(weight.uses())
    if users > 1:
        return f"the weight '{weight.name}' of {label} is shared by {users} uses"
    if not np.issubdtype(weight.const_value.dtype.numpy(), np.floating):
        return f"the weight of {label} is not floating point"
    return None


def matrix_layer(node: ir.Node, weight: np.ndarray, energy: float) -> tuple[Candidate, int]:
    """The SVD candidate of a Gemm or MatMul and the layer's MACs.

    Gemm becomes Gemm(x, A) then Gemm(h, B, C) with alpha and beta on the second; MatMul
    becomes MatMul(MatMul(x, A), B).
    """
    shape = node.inputs[0].shape
    if node.op_type == "MatMul":
        rows = _static_product(shape, slice(None, -1))
        macs = matmul_macs((rows, weight.shape[0]), weight.shape)
        return matrix_svd(weight, rows, energy, False, [{}, {}]), macs
    trans_a, trans_b = _attr_int(node, "transA", 0), _attr_int(node, "transB", 0)
    rows = _static_product(shape, slice(1, 2) if trans_a else slice(0, 1))
    first: Attributes = {"transA": trans_a, "transB": trans_b}
    second: Attributes = {"transB": trans_b}
    for name in ("alpha", "beta"):
        if name in node.attributes:
            second[name] = node.attributes[name].as_float()
    matrix = weight.T if trans_b else weight
    macs = gemm_macs((rows, matrix.shape[0]), weight.shape, False, bool(trans_b))
    return matrix_svd(matrix, rows, energy, bool(trans_b), [first, second]), macs


# ---------------------------------------------------------------------------------------------
# Graph edits


def _value_names(graph: ir.Graph) -> set[str]:
    """Every value and node name in use in the graph, to keep new names unique."""
    names = set(graph.initializers)
    names.update(v.name for v in graph.inputs if v.name)
    for node in graph:
        if node.name:
            names.add(node.name)
        names.update(v.name for v in node.outputs if v.name)
    return names


def _unique(names: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is free; the name is then taken."""
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def _replace(graph: ir.Graph, layer: Layer, chosen: Candidate, names: set[str]) -> None:
    """Put the candidate's chain in place of the layer; drop the old weight if now unused."""
    node = layer.node
    dtype = layer.weight.const_value.dtype.numpy()  # type: ignore[union-attr]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    current = node.inputs[0]
    new_nodes: list[ir.Node] = []
    for i, stage in enumerate(chosen.stages):
        prefix = f"{layer.name}.lowrank{i}"
        tensor = ir.tensor(stage.weight.astype(dtype))
        weight = ir.Value(
            name=_unique(names, f"{prefix}.weight"),
            type=ir.TensorType(tensor.dtype),
            shape=tensor.shape,
            const_value=tensor,
        )
        graph.register_initializer(weight)
        last = i == len(chosen.stages) - 1
        inputs = [current, weight, *([bias] if last and bias is not None else [])]
        new = ir.node(
            node.op_type, inputs, stage.attributes, name=_unique(names, prefix), num_outputs=1
        )
        new.outputs[0].name = _unique(names, f"{prefix}.out")
        new.outputs[0].type = node.outputs[0].type
        current = new.outputs[0]
        new_nodes.append(new)
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], new_nodes, [node.outputs[0]], [current]
    )
    old = layer.weight
    if not old.uses() and not old.is_graph_output() and old.name in graph.initializers:
        graph.initializers.pop(old.name)


CONV_METHODS = {"spatial": conv_spatial, "tucker2": conv_tucker2}


class LowRankPass(CompressionPass):
    """Replace Gemm, MatMul and Conv layers by low-rank chains where that saves MACs.

    Rules:

    1. Gemm (transA/transB 0 or 1, alpha and beta kept on the second Gemm) and MatMul with a
       constant 2-D weight at input 1: truncated SVD, (x A) B, weights stored in the original
       layout (transB=1 stores A^T and B^T); the bias C stays on the second Gemm.
    2. 2-D Conv with group 1: a k x k kernel (either side > 1) tries spatial SVD (vertical
       strides/pads/dilations on the (kh x 1) conv, horizontal ones on the (1 x kw) conv) and
       Tucker-2 (the whole geometry on the core); a 1x1 kernel gets SVD as two 1x1 convs. The
       bias goes on the last conv; auto_pad becomes explicit pads.
    3. Ranks: the smallest rank whose squared singular values hold ``rank_energy`` of the
       total (Tucker-2: 1 - (1 - rank_energy) / 2 per mode). A candidate whose relative weight
       error exceeds sqrt(1 - rank_energy) is dropped; of the rest the one with the fewest MACs
       is kept, and only if it saves at least ``min_macs_saving`` of the layer's MACs.
    4. Never factorized, with the reason in ``record.skipped``: grouped and depthwise convs,
       non-2-D convs, weights that are not constant initializers, not floating point, all
       zero, or shared by several uses; Convs whose input height and width are unknown;
       excluded names; layers where no enabled method applies or none saves enough MACs.
    5. Only the main graph is visited. New initializers get unique names and new nodes the
       original node's name as a prefix; the graph is topologically sorted at the end.
    """

    name = "lowrank"
    lossless = False
    min_opset = 11  # the first Gemm of a factorized pair has no C input

    def __init__(
        self, config: LowRankConfig | None = None, context: PassContext | None = None
    ) -> None:
        super().__init__(context)
        self.config = config or LowRankConfig()
        self.layers: list[LayerFactorization] = []

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        self.layers = []
        graph = model.graph
        targets = [n for n in graph if n.op_type in TARGET_OPS and n.domain in ("", "ai.onnx")]
        if not targets:
            record.summary = "no Gemm, MatMul or Conv in the graph"
            return
        ir_passes.ShapeInferencePass()(model)
        names = _value_names(graph)
        for index, node in enumerate(list(graph)):
            if node.op_type not in TARGET_OPS or node.domain not in ("", "ai.onnx"):
                continue
            name = node.name or f"{node.op_type}_{index}"
            layer, problem = self._layer(node, name)
            if layer is None:
                record.skipped.append(Skipped(name, problem or "not factorized"))
                continue
            chosen, problem = self._choose(layer)
            if chosen is None:
                record.skipped.append(Skipped(name, problem or "not factorized"))
                continue
            _replace(graph, layer, chosen, names)
            done = LayerFactorization(
                name, node.op_type, chosen.method, chosen.ranks, layer.macs, chosen.macs,
                chosen.error,
            )  # fmt: skip
            self.layers.append(done)
            record.changes.append(done.describe())
        ir_passes.TopologicalSortPass()(model)
        record.summary = self._summary(len(targets))

    def _layer(self, node: ir.Node, name: str) -> tuple[Layer | None, str | None]:
        """The layer and its candidates, or why it is left alone."""
        label = f"{node.op_type} '{name}'"
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.config.exclude):
            return None, f"{label} is excluded"
        problem = _weight_problem(node, label)
        if problem:
            return None, problem
        weight = node.inputs[1]
        array = np.asarray(weight.const_value.numpy(), np.float64)  # type: ignore[union-attr]
        if not np.any(array):
            return None, f"the weight of {label} is all zeros"
        if node.op_type == "Conv":
            return self._conv_layer(node, name, label, weight, array)
        if array.ndim != 2:
            return None, f"the weight of {label} is not 2-D"
        if "svd" not in self.config.methods:
            return None, f"{label} needs method 'svd', which is not enabled"
        candidate, macs = matrix_layer(node, array, self.config.rank_energy)
        candidates = [candidate]
        return Layer(node, name, weight, macs, candidates), None

    def _conv_layer(
        self, node: ir.Node, name: str, label: str, weight: ir.Value, array: np.ndarray
    ) -> tuple[Layer | None, str | None]:
        group = _attr_int(node, "group", 1)
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
        energy = self.config.rank_energy
        if kernel == (1, 1):
            if "svd" not in self.config.methods:
                return None, f"{label} (1x1) needs method 'svd', which is not enabled"
            candidates = [conv_svd(array, geometry, energy)]
        else:
            methods = [m for m in self.config.methods if m in CONV_METHODS]
            if not methods:
                return None, f"{label} needs method 'spatial' or 'tucker2', neither is enabled"
            candidates = [CONV_METHODS[m](array, geometry, energy) for m in methods]
        return Layer(node, name, weight, macs, candidates), None

    def _choose(self, layer: Layer) -> tuple[Candidate | None, str | None]:
        """The candidate with the fewest MACs within the error budget, if it saves enough."""
        budget = self.config.error_budget + _ERROR_SLACK
        label = f"{layer.node.op_type} '{layer.name}'"
        within = [c for c in layer.candidates if c.error <= budget]
        if not within:
            worst = ", ".join(f"{c.method} {c.error:.4f}" for c in layer.candidates)
            return None, f"{label}: weight error over the budget {budget:.4f} ({worst})"
        best = min(within, key=lambda c: c.macs)
        kept = best.macs / layer.macs
        if 1.0 - kept < self.config.min_macs_saving:
            return None, (
                f"{best.method} {best.rank_text()} would keep {kept:.0%} of the MACs "
                f"(a saving of at least {self.config.min_macs_saving:.0%} is needed)"
            )
        return best, None

    def _summary(self, total: int) -> str:
        if not self.layers:
            return f"no layer factorized ({total} considered)"
        before = sum(layer.macs_before for layer in self.layers)
        after = sum(layer.macs_after for layer in self.layers)
        return (
            f"factorized {len(self.layers)} of {total} layer(s): their MACs "
            f"{format_count(before)} -> {format_count(after)}"
        )
