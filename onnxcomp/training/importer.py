"""ONNX -> trainable torch module, and back into the same ONNX graph.

`import_onnx(model)` builds an `OnnxModule` that runs the graph node by node with the per-op
converters of `ops.py`. Rules:

1. Float initializers in a weight slot (Conv/ConvTranspose/Gemm weight and bias, MatMul and
   Add/Sub/Mul operands, BatchNormalization scale and bias, PRelu slope), followed through
   Identity nodes, become ``nn.Parameter``s; every other initializer (BatchNorm running
   statistics, shapes, Clip bounds...) a buffer. A weight shared by several nodes is one
   parameter.
2. BatchNormalization follows ``train()``/``eval()``: batch statistics and running-statistic
   updates by the node's momentum in train mode, running statistics in eval mode.
3. QDQ: a QuantizeLinear whose readers are all DequantizeLinear with the same scale and zero
   point becomes one LSQ `FakeQuant` (learnable scale, fixed zero point), keyed by its scale
   initializer; the DequantizeLinear nodes pass its output through. An integer weight behind a
   DequantizeLinear becomes a float parameter (dequantized) and a `FakeQuant` with its
   (per-channel) scale; an int32 bias behind a DequantizeLinear becomes a float parameter.
   Sign weights that onnxcomp's binarize pass marked (metadata ``onnxcomp.binarized``, values
   all -1/+1) become a latent float parameter (alpha x sign to start) and a `BinaryWeight`
   (BinaryConnect, clipped STE, alpha = mean |w| per channel); export writes signs and alphas.
4. `export_onnx()` writes parameters, BatchNorm running statistics and learned scales into a
   fresh copy of the imported graph: same nodes, names and initializers. Integer weights are
   re-quantized with their learned scales; int32 biases with scale = input scale x weight
   scale, as onnxruntime.quantization writes them.
5. An op without a converter, a Q whose output is read by anything but a DequantizeLinear, or a
   used output the converter does not compute: one-line OnnxcompError naming node and op.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxcomp.core.graph import attr_int, input_at, label, set_constant
from onnxcomp.core.ops import BINARIZED_MARK, read_mark
from onnxcomp.errors import OnnxcompError

try:
    import torch
    from torch import nn
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise OnnxcompError("onnxcomp.training needs torch: pip install 'onnxcomp[torch]'") from error

from onnxcomp.training import ops
from onnxcomp.training.fake_quant import BinaryWeight, FakeQuant, int_range

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
MULTI_OUTPUT_OPS = ("Split",)
# Ops that onnxruntime's QDQ models (and our pad-island fusion) run on the integers between a
# QuantizeLinear and its DequantizeLinear; on the integer-valued floats they compute the same.
INTEGER_DOMAIN_OPS = (
    "Pad",
    "Slice",
    "Reshape",
    "Flatten",
    "Transpose",
    "MaxPool",
    "Squeeze",
    "Unsqueeze",
    "Identity",
)


@dataclass(frozen=True)
class _Step:
    label: str
    kind: str  # "op": `run`; "module": self.nodes[key]; "fake", "quantize", "dequantize":
    # self.quants[key] (forward, to_int, from_int) on the first input
    run: Callable | None
    key: str | None
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class _QWeight:
    """An integer initializer behind a DequantizeLinear: trained as a float parameter."""

    name: str
    dtype: np.dtype
    scale: str
    quant: str | None  # the weight's FakeQuant; None for an int32 bias
    bias_of: tuple[str | None, str | None] = (None, None)  # (input quant, weight quant)


def import_onnx(model: ir.Model) -> OnnxModule:
    """A trainable torch module running ``model`` (see the module docstring for the rules)."""
    return OnnxModule(model)


def supported_ops() -> list[str]:
    return sorted([*ops.CONVERTERS, *QDQ_OPS])


def _unsupported(node: ir.Node, why: str = "") -> OnnxcompError:
    name = node.name or node.outputs[0].name
    return OnnxcompError(
        f"training: node '{name}' ({node.op_type}) cannot be trained by onnxcomp's importer"
        f"{why}; supported: {', '.join(supported_ops())}"
    )


def _root(value: ir.Value | None) -> ir.Value | None:
    """The value behind a chain of Identity nodes."""
    while value is not None and value.producer() is not None:
        if value.producer().op_type != "Identity":
            break
        value = value.producer().inputs[0]
    return value


def _is_init(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _array(value: ir.Value) -> np.ndarray:
    return np.asarray(value.const_value.numpy())


def _trainable(graph: ir.Graph) -> set[str]:
    """Rule 1: the float initializers that become parameters."""
    names: set[str] = set()
    for node in graph:
        converter = ops.CONVERTERS.get(node.op_type)
        slots = converter.trainable if converter else (0,) if node.op_type == QDQ_OPS[0] else ()
        for slot in slots:
            value = _root(input_at(node, slot))
            if _is_init(value) and np.issubdtype(_array(value).dtype, np.floating):
                names.add(value.name)
    return names


class OnnxModule(nn.Module):
    """An ONNX graph as a trainable torch module (see `import_onnx`).

    ``forward(*inputs)`` returns the graph outputs in order; ``run(feeds, taps)`` returns the
    outputs and the named intermediate tensors; ``export_onnx()`` the graph with the trained
    values written back.
    """

    def __init__(self, model: ir.Model) -> None:
        super().__init__()
        self._proto = ir.to_proto(model)
        graph = model.graph
        self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self.output_names = [v.name for v in graph.outputs]
        self.params = nn.ParameterDict()
        self.consts = nn.Module()
        self.nodes = nn.ModuleDict()
        self.quants = nn.ModuleDict()
        self._keys: dict[str, str] = {}
        self._qweights: dict[str, _QWeight] = {}
        self._scales: dict[str, str] = {}  # activation scale initializer -> FakeQuant key
        self._state: list[str] = []  # float initializers written back as they are
        self._steps: list[_Step] = []
        self._binary = _binary_weights(model)
        self._add_initializers(graph)
        for key in self._scales.values():  # BinaryConnect: the latent weight it reads
            quant = self.quants[key]
            if isinstance(quant, BinaryWeight):
                quant.bind(self.params[self._keys[quant.name]])
        for node in graph:
            self._steps.append(self._step(node))
        for node in graph:  # int32 biases, once every scale has its FakeQuant
            weight = self._qweights.get(node.inputs[0].name) if node.inputs else None
            if node.op_type == "DequantizeLinear" and weight and weight.quant is None:
                self._qweights[weight.name] = _bias_links(node, weight, self._scales)

    # ---- building ---------------------------------------------------------------------------

    def _key(self, name: str, taken: Mapping) -> str:
        key = re.sub(r"\W", "_", name) or "_"
        while key in taken or hasattr(nn.ParameterDict, key) or hasattr(nn.Module, key):
            key += "_"
        return key

    def _add_initializers(self, graph: ir.Graph) -> None:
        trainable = _trainable(graph)
        weights = self._quantized_weights(graph)
        for name, value in graph.initializers.items():
            array = _array(value)
            if name in weights:
                array = weights[name]
            if name in trainable or name in weights:
                key = self._key(name, self.params)
                self.params[key] = nn.Parameter(torch.from_numpy(array.copy()))
                if name not in weights:
                    self._state.append(name)
            else:
                key = self._key(name, self.consts._buffers)
                self.consts.register_buffer(key, torch.from_numpy(np.array(array)))
            self._keys[name] = key
        for node in graph:
            if node.op_type == "BatchNormalization":
                self._state += [v.name for v in node.inputs[3:5] if _is_init(v)]

    def _quantized_weights(self, graph: ir.Graph) -> dict[str, np.ndarray]:
        """Rule 3 for integer initializers behind a DequantizeLinear: their float values."""
        floats: dict[str, np.ndarray] = {}
        for node in graph:
            value = input_at(node, 0)
            if node.op_type != "DequantizeLinear" or not _is_init(value):
                continue
            q = _array(value)
            scale = _array(node.inputs[1]).astype(np.float32)
            zero = input_at(node, 2)
            zero_point = _array(zero) if _is_init(zero) else np.zeros_like(scale, q.dtype)
            axis = attr_int(node, "axis", 1) % max(q.ndim, 1)
            shape = [1] * q.ndim
            if scale.size > 1:
                shape[axis] = -1
            deq = (q.astype(np.float32) - zero_point.astype(np.float32).reshape(shape)) * (
                scale.reshape(shape)
            )
            floats[value.name] = deq.astype(np.float32)
            quant = None
            if value.name in self._binary and np.all(np.abs(q) == 1):
                quant = self._add_quant(node.inputs[1].name, BinaryWeight(value.name, axis))
            elif q.dtype != np.int32:
                lo, hi = int_range(q.dtype, label(node))
                quant = self._add_quant(
                    node.inputs[1].name, FakeQuant(scale, zero_point, lo, hi, axis, False)
                )
            self._qweights[value.name] = _QWeight(value.name, q.dtype, node.inputs[1].name, quant)
        return floats

    def _add_quant(self, scale_name: str, module: FakeQuant) -> str:
        key = self._key(scale_name, self.quants)
        self.quants[key] = module
        self._scales[scale_name] = key
        return key

    def _step(self, node: ir.Node) -> _Step:
        inputs = tuple(v.name if v is not None else None for v in node.inputs)
        outputs = tuple(v.name for v in node.outputs)
        if node.domain not in ("", "ai.onnx"):
            raise _unsupported(node, f" (domain '{node.domain}')")
        if node.op_type == "QuantizeLinear":
            return _Step(label(node), "quantize", None, self._quantize(node), inputs, outputs)
        if node.op_type == "DequantizeLinear":
            return self._dequantize_step(node, inputs, outputs)
        converter = ops.CONVERTERS.get(node.op_type)
        if converter is None:
            raise _unsupported(node)
        if node.op_type not in MULTI_OUTPUT_OPS:
            for index, value in enumerate(node.outputs[1:], 1):
                if value.name and (value.uses() or value.is_graph_output()):
                    raise _unsupported(node, f" (its output {index} is used)")
        built = converter.build(node)
        if isinstance(built, nn.Module):
            key = self._key(node.name or outputs[0], self.nodes)
            self.nodes[key] = built
            return _Step(label(node), "module", None, key, inputs, outputs)
        return _Step(label(node), "op", built, None, inputs, outputs)

    def _quantize(self, node: ir.Node) -> str:
        """Rule 3: a Q -> DQ pair as one FakeQuant, keyed by the Q's scale initializer."""
        scale_value, zero_value = node.inputs[1], input_at(node, 2)
        if not _is_init(scale_value) or (zero_value is not None and not _is_init(zero_value)):
            raise _unsupported(node, " (its scale or zero point is not an initializer)")
        scale = _array(scale_value)
        zero = _array(zero_value) if zero_value is not None else np.zeros(scale.shape, np.uint8)
        for reader in _integer_readers(node.outputs[0]):
            same = (
                reader.op_type == "DequantizeLinear"
                and _is_init(reader.inputs[1])
                and np.array_equal(_array(reader.inputs[1]), scale)
                and (input_at(reader, 2) is None or np.array_equal(_array(reader.inputs[2]), zero))
            )
            if not same:
                raise _unsupported(node, f" (its integer output reaches {label(reader)})")
        if scale_value.name in self._scales:
            return self._scales[scale_value.name]
        lo, hi = int_range(zero.dtype, label(node))
        axis = attr_int(node, "axis", 1) if scale.size > 1 else None
        weight = _is_init(_root(node.inputs[0]))
        return self._add_quant(scale_value.name, FakeQuant(scale, zero, lo, hi, axis, not weight))

    def _dequantize_step(self, node: ir.Node, inputs, outputs) -> _Step:
        source = node.inputs[0]
        if _is_init(source):
            weight = self._qweights[source.name]
            if weight.quant is None:
                return _Step(label(node), "op", _identity, None, inputs, outputs)
            return _Step(label(node), "fake", None, weight.quant, inputs, outputs)
        quantize = _quantize_source(source)
        if quantize is not None:
            key = self._scales[quantize.inputs[1].name]
            self._scales.setdefault(node.inputs[1].name, key)
            return _Step(label(node), "dequantize", None, key, inputs, outputs)
        return _Step(label(node), "op", ops.dequantize(node), None, inputs, outputs)

    # ---- running ----------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every initializer by its ONNX name: parameters (trained) and buffers."""
        out = {}
        for name, key in self._keys.items():
            out[name] = self.params[key] if key in self.params else self.consts._buffers[key]
        return out

    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable initializers by ONNX name (integer weights: their float values)."""
        return {n: self.params[k] for n, k in self._keys.items() if k in self.params}

    def run(
        self, inputs: Mapping[str, torch.Tensor], taps: Sequence[str] = ()
    ) -> dict[str, torch.Tensor]:
        """Graph outputs, then the tensors named in ``taps``, by name."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise OnnxcompError(
                f"training: missing input(s) {', '.join(missing)}; the model reads "
                f"{', '.join(self.input_names)}"
            )
        env: dict[str, torch.Tensor] = {**self.tensors(), **inputs}
        self._execute(self._steps, env)
        unknown = [t for t in taps if t not in env]
        if unknown:
            raise OnnxcompError(
                f"training: no tensor named {', '.join(map(repr, unknown))} in the model; "
                "taps take the names of node outputs"
            )
        return {name: env[name] for name in [*self.output_names, *taps]}

    def run_from(
        self, feeds: Mapping[str, torch.Tensor], taps: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The tensors named in ``taps``, computed from ``feeds`` (any tensors, by name).

        Runs only the nodes the taps need, each fed tensor taking the place of its producer
        (its own inputs are not computed); a tap that is itself fed is returned as fed. A
        needed tensor that is neither fed, an initializer nor computed from them: one line.
        """
        env: dict[str, torch.Tensor] = {**self.tensors(), **feeds}
        needed, chosen = {t for t in taps if t not in env}, []
        for step in reversed(self._steps):
            if needed.intersection(step.outputs):
                chosen.append(step)
                needed.difference_update(step.outputs)
                needed.update(n for n in step.inputs if n and n not in env)
        if needed:
            produced = {*self.input_names, *(n for step in self._steps for n in step.outputs)}
            missing = sorted(needed)[0]
            what = "is not a tensor of the model" if missing not in produced else "is not fed"
            raise OnnxcompError(
                f"training: cannot compute {', '.join(map(repr, taps))} from "
                f"{', '.join(map(repr, feeds)) or 'no feeds'}: '{missing}' {what}; feed it too"
            )
        self._execute(list(reversed(chosen)), env)
        return {name: env[name] for name in taps}

    def _execute(self, steps: Sequence[_Step], env: dict[str, torch.Tensor]) -> None:
        """Run ``steps`` in order, reading and writing tensors in ``env`` by name."""
        for step in steps:
            args = [env[n] if n else None for n in step.inputs]
            if step.kind == "op":
                results = step.run(args)
            elif step.kind == "module":
                results = self.nodes[step.key](args)
            else:
                quant = self.quants[step.key]
                call = {"fake": quant, "quantize": quant.to_int, "dequantize": quant.from_int}
                results = (call[step.kind](args[0]),)
            for name, result in zip(step.outputs, results, strict=False):
                if name:
                    env[name] = result

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise OnnxcompError(
                f"training: the model takes {len(self.input_names)} input(s) "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        outputs = self.run(dict(zip(self.input_names, inputs, strict=True)))
        return tuple(outputs[name] for name in self.output_names)

    # ---- export -----------------------------------------------------------------------------

    def export_onnx(self) -> ir.Model:
        """Rule 4: a copy of the imported model with the trained values written back."""
        model = ir.from_proto(self._proto)
        inits = model.graph.initializers
        tensors = self.tensors()

        def write(name: str, array: np.ndarray) -> None:
            dtype = inits[name].const_value.dtype.numpy()
            set_constant(inits[name], np.asarray(array).astype(dtype))

        for name in self._state:
            write(name, tensors[name].detach().cpu().numpy())
        for scale_name, key in self._scales.items():
            write(scale_name, self.quants[key].exported_scale())
        for weight in self._qweights.values():
            value = tensors[weight.name].detach().cpu().numpy()
            if weight.quant is not None:
                write(weight.name, self.quants[weight.quant].quantize(value, weight.dtype))
            else:
                scale = self._bias_scale(weight, tensors)
                write(weight.scale, scale)
                write(weight.name, _quantize_bias(value, scale))
        return model

    def _bias_scale(self, weight: _QWeight, tensors: Mapping) -> np.ndarray:
        act, kernel = weight.bias_of
        if act is None or kernel is None:
            return tensors[weight.scale].detach().cpu().numpy()
        a = self.quants[act].exported_scale().astype(np.float32)
        return (a * self.quants[kernel].exported_scale()).astype(np.float32)


def _binary_weights(model: ir.Model) -> set[str]:
    """Initializers onnxcomp's binarize pass marked as sign weights (trained as BinaryWeight)."""
    return set(read_mark(model, BINARIZED_MARK).get("weights", ()))


def _identity(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor]:
    return (inputs[0],)


def _integer_readers(value: ir.Value) -> list[ir.Node]:
    """The first nodes reading ``value`` that are not integer-domain ops (following those)."""
    found: list[ir.Node] = []
    for reader, _ in value.uses():
        if reader.op_type in INTEGER_DOMAIN_OPS:
            for output in reader.outputs[:1]:
                found += _integer_readers(output)
        else:
            found.append(reader)
    return found


def _quantize_source(value: ir.Value) -> ir.Node | None:
    """The QuantizeLinear behind ``value`` through integer-domain ops, if any."""
    producer = value.producer()
    while producer is not None and producer.op_type in INTEGER_DOMAIN_OPS:
        producer = producer.inputs[0].producer()
    return producer if producer is not None and producer.op_type == "QuantizeLinear" else None


def _quantize_bias(value: np.ndarray, scale: np.ndarray) -> np.ndarray:
    shape = [-1] + [1] * (value.ndim - 1) if scale.size > 1 else []
    q = np.round(value.astype(np.float64) / scale.astype(np.float64).reshape(shape))
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32)


def _bias_links(node: ir.Node, bias: _QWeight, scales: Mapping[str, str]) -> _QWeight:
    """Find the FakeQuants of the input and weight of the layer reading this int32 bias."""
    uses = node.outputs[0].uses()
    if len(uses) != 1 or uses[0][1] != 2:
        return bias
    layer = uses[0][0]
    links: list[str | None] = []
    for slot in (0, 1):
        producer = layer.inputs[slot].producer() if layer.inputs[slot] is not None else None
        if producer is None or producer.op_type != "DequantizeLinear":
            return bias
        links.append(scales.get(producer.inputs[1].name))
    return _QWeight(bias.name, bias.dtype, bias.scale, None, (links[0], links[1]))
