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

By default the ranks come from the energy of the singular values (the fraction of ||W||_F^2
kept), so the relative weight error ||W - W_r||_F / ||W||_F of an SVD is at most
sqrt(1 - rank_energy). That bound is the error budget every method must meet.

With calibration data, one pass over it collects each layer's input Gram matrix G (the
layer's matrix form M, D x N, maps an input row p to p M: the input features of Gemm/MatMul,
the im2col patches (c, i, j) of a Conv, sampled at random positions per image). Then:

* ``output_error``: each method takes the smallest rank whose relative output error
  sqrt(tr(dM^T G dM) / tr(M^T G M)) is within the budget (SVD: exact, from
  sum_{i>r} s_i^2 u_i^T G u_i; spatial SVD: bisection on the rank; Tucker-2: a ladder of
  energies).
* ``refit``: data-aware factors. SVD: the truncated SVD of G^{1/2} M, multiplied back by
  G^{-1/2} (optimal for the output error, as in whitening-based SVD compression); spatial SVD:
  the first factor from the same with the Gram of the (c, i) features, the second refitted by
  least squares on G. Tucker-2 stays weight-only.
* ``measure_latency``: each chosen chain and the original layer are timed as tiny models in
  ONNX Runtime (batch 1); the chain is kept only if it is faster by ``latency_margin``.

Arithmetic is float64, cast back to the weight's dtype. MACs are counted per sample: symbolic
dims (the batch) count as 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from onnxcomp.converter.base import CompressionPass, PassContext, PassRecord, Skipped
from onnxcomp.converter.lowrank.candidates import Candidate, ranks_text
from onnxcomp.converter.lowrank.config import LowRankConfig
from onnxcomp.converter.lowrank.decompose import ERROR_SLACK, Target
from onnxcomp.converter.lowrank.latency import Timer, chain_model, ort_timer
from onnxcomp.converter.lowrank.layer import Layer, candidates, layer_of
from onnxcomp.converter.lowrank.rewrite import replace_layer, value_names
from onnxcomp.core.units import format_count
from onnxcomp.stats.collector import Observer
from onnxcomp.stats.gram import ConvPatchGram, InputGram
from onnxcomp.stats.request import StatisticsRequest

TARGET_OPS = frozenset({"Gemm", "MatMul", "Conv"})


@dataclass
class LayerFactorization:
    """What the pass did to one layer, for the record and for callers.

    ``basis`` says how the ranks were chosen; ``latency_ratio`` is the measured time of the
    chain over the layer's (None: not measured).
    """

    node: str
    op_type: str
    method: str
    ranks: tuple[int, ...]
    macs_before: int
    macs_after: int
    error: float
    full_ranks: tuple[int, ...] = ()
    output_error: float | None = None
    refit: bool = False
    basis: str = ""
    latency_ratio: float | None = None

    def describe(self) -> str:
        ranks = ranks_text(self.ranks)
        if self.full_ranks:
            ranks = f"{ranks_text(self.full_ranks)} -> {ranks}"
        change = self.macs_after / self.macs_before - 1.0
        text = (
            f"{self.op_type} '{self.node}': {self.method}, rank {ranks}"
            f"{f' ({self.basis})' if self.basis else ''}, MACs "
            f"{format_count(self.macs_before)} -> {format_count(self.macs_after)} "
            f"({change:+.0%}), weight error {self.error:.4f}"
        )
        if self.output_error is not None:
            text += f", output error {self.output_error:.4f}"
        if self.refit:
            text += ", refit on data"
        if self.latency_ratio is not None:
            text += f", latency x{self.latency_ratio:.2f}"
        return text


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
    4. With ``output_error`` or ``refit`` and calibration data: one pass over the data, before
       any change, collects every layer's input Gram matrix. ``output_error`` replaces rule 3's
       budget: ranks are the smallest whose relative output error fits it. ``refit`` uses
       data-aware factors (SVD and spatial SVD). Layers whose Gram would be larger than
       ``max_gram_features`` and all layers when there is no data keep rule 3; the record says
       so.
    5. With ``measure_latency`` a chosen chain is timed against its layer (``timer``) and kept
       only if its time is at most 1 - ``latency_margin`` of the layer's.
    6. Never factorized, with the reason in ``record.skipped``: grouped and depthwise convs,
       non-2-D convs, weights that are not constant initializers, not floating point, all
       zero, or shared by several uses; Convs whose input height and width are unknown;
       excluded names; layers where no enabled method applies, none saves enough MACs, or the
       chain was not faster.
    7. Only the main graph is visited. New initializers get unique names and new nodes the
       original node's name as a prefix; the graph is topologically sorted at the end.
    """

    name = "lowrank"
    lossless = False
    min_opset = 11  # the first Gemm of a factorized pair has no C input

    def __init__(
        self,
        config: LowRankConfig | None = None,
        context: PassContext | None = None,
        timer: Timer | None = None,
    ) -> None:
        super().__init__(context)
        self.config = config or LowRankConfig()
        self.timer = timer
        self.layers: list[LayerFactorization] = []

    def requires_data(self) -> str | None:
        return self.config.requires_data()

    def apply(self, model: ir.Model, record: PassRecord) -> None:
        self.layers = []
        graph = model.graph
        targets = [n for n in graph if n.op_type in TARGET_OPS and n.domain in ("", "ai.onnx")]
        if not targets:
            record.summary = "no Gemm, MatMul or Conv in the graph"
            return
        ir_passes.ShapeInferencePass()(model)
        names = value_names(graph)
        layers: list[Layer] = []
        for index, node in enumerate(list(graph)):
            if node.op_type not in TARGET_OPS or node.domain not in ("", "ai.onnx"):
                continue
            name = node.name or f"{node.op_type}_{index}"
            layer, problem = layer_of(node, name, self.config.methods, self.config.exclude)
            if layer is None:
                record.skipped.append(Skipped(name, problem or "not factorized"))
                continue
            layers.append(layer)
        note = self._statistics(model, layers)
        opset = model.opset_imports.get("", 17)
        for layer in layers:
            layer.candidates = candidates(layer)
            layer.target = dataclasses.replace(layer.target, gram=None)  # free its memory
            chosen, problem = self._choose(layer)
            ratio = None
            if chosen is not None and self.config.measure_latency:
                ratio, problem = self._latency(layer, chosen, opset)
                if problem:
                    chosen = None
            if chosen is None:
                record.skipped.append(Skipped(layer.name, problem or "not factorized"))
                continue
            replace_layer(graph, layer, chosen, names)
            done = LayerFactorization(
                layer.name, layer.node.op_type, chosen.method, chosen.ranks, layer.macs,
                chosen.macs, chosen.error, chosen.full_ranks, chosen.output_error, chosen.refit,
                layer.basis, ratio,
            )  # fmt: skip
            self.layers.append(done)
            unmeasured = self.config.measure_latency and ratio is None
            latency = ", latency not measured (input shape unknown)" if unmeasured else ""
            record.changes.append(done.describe() + latency)
        ir_passes.TopologicalSortPass()(model)
        record.summary = self._summary(len(targets)) + note

    def _statistics(self, model: ir.Model, layers: list[Layer]) -> str:
        """Set each layer's target; with data, its input Gram from one pass over the data.

        Returns a note for the summary when data-driven ranks were asked for but not given.
        """
        config = self.config
        energy = Target(config.rank_energy)
        for layer in layers:
            layer.target = energy
        if not config.needs_data or not layers:
            return ""
        fallback = f"by energy {config.rank_energy:.2f}"
        if self.context.calibration is None:
            for layer in layers:
                layer.basis = f"{fallback}: no calibration data"
            return f"; no calibration data: ranks from rank_energy {config.rank_energy}, no refit"
        observers: dict[str, list[Observer]] = {}
        grams: list[tuple[Layer, InputGram | ConvPatchGram]] = []
        for i, layer in enumerate(layers):
            source = layer.node.inputs[0]
            if layer.features > config.max_gram_features or source is None or not source.name:
                layer.basis = f"{fallback}: {layer.features} input features, no statistics"
                continue
            if layer.geometry is not None:
                channels = layer.array.shape[1]
                seed = config.seed + i
                observer: InputGram | ConvPatchGram = ConvPatchGram(
                    layer.geometry, channels, config.patches_per_image, seed
                )
            else:
                observer = InputGram(layer.features, layer.form.input_transposed)  # type: ignore[union-attr]
            observers.setdefault(source.name, []).append(observer)
            grams.append((layer, observer))
        if grams:
            request = StatisticsRequest.observing(observers)
            self.context.collect(model, request, "low-rank statistics")
        for layer, observer in grams:
            if observer.rows == 0:
                layer.basis = f"{fallback}: no input rows seen"
                continue
            budget = config.output_error
            layer.target = Target(config.rank_energy, observer.gram, budget, config.refit)
            layer.basis = f"by output error <= {budget:g}" if budget is not None else fallback
            if observer.rows < layer.features:  # the Gram is singular: the fit may overfit
                layer.basis += f", only {observer.rows} input rows for {layer.features} features"
        return ""

    def _within(self, layer: Layer, candidate: Candidate) -> bool:
        """Whether a candidate meets the layer's error budget.

        Output budget: its output error. Ranks from the energy with data-aware factors: yes
        (they do better on the data than the truncation that met the energy). Else: its
        weight error within sqrt(1 - rank_energy).
        """
        budget = layer.target.budget
        if budget is not None and candidate.output_error is not None:
            return candidate.output_error <= budget + ERROR_SLACK
        if candidate.refit:
            return True
        return candidate.error <= self.config.error_budget + ERROR_SLACK

    def _choose(self, layer: Layer) -> tuple[Candidate | None, str | None]:
        """The candidate with the fewest MACs within the error budget, if it saves enough."""
        within = [c for c in layer.candidates if self._within(layer, c)]
        if not within and layer.target.budget is not None:
            worst = ", ".join(f"{c.method} {c.output_error or 0.0:.4f}" for c in layer.candidates)
            budget = layer.target.budget
            return None, f"{layer.label}: output error over the budget {budget:g} ({worst})"
        if not within:
            worst = ", ".join(f"{c.method} {c.error:.4f}" for c in layer.candidates)
            budget = self.config.error_budget + ERROR_SLACK
            return None, f"{layer.label}: weight error over the budget {budget:.4f} ({worst})"
        best = min(within, key=lambda c: c.macs)
        kept = best.macs / layer.macs
        if 1.0 - kept < self.config.min_macs_saving:
            return None, (
                f"{best.method} {best.rank_text()} would keep {kept:.0%} of the MACs "
                f"(a saving of at least {self.config.min_macs_saving:.0%} is needed)"
            )
        return best, None

    def _latency(
        self, layer: Layer, chosen: Candidate, opset: int
    ) -> tuple[float | None, str | None]:
        """The measured time ratio chain / layer, and why the chain is refused (or None)."""
        if layer.input_dims is None:
            return None, None
        timer = self.timer or ort_timer(self.context.session, self.config.latency_runs)
        original, feeds = chain_model(layer, None, opset)
        chain, _ = chain_model(layer, chosen.stages, opset)
        before, after = timer(original, feeds), timer(chain, feeds)
        ratio = after / before if before > 0 else math.inf
        limit = 1.0 - self.config.latency_margin
        if ratio > limit:
            return ratio, (
                f"{chosen.method} {chosen.rank_text()} runs in x{ratio:.2f} the time of "
                f"{layer.label} (at most x{limit:.2f} is needed)"
            )
        return ratio, None

    def _summary(self, total: int) -> str:
        if not self.layers:
            return f"no layer factorized ({total} considered)"
        before = sum(layer.macs_before for layer in self.layers)
        after = sum(layer.macs_after for layer in self.layers)
        return (
            f"factorized {len(self.layers)} of {total} layer(s): their MACs "
            f"{format_count(before)} -> {format_count(after)}"
        )
