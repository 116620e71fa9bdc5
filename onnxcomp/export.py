"""Export a PyTorch module to ONNX with deployment defaults.

torch is an optional dependency (``pip install onnxcomp[torch]``); it is imported lazily.
"""

from __future__ import annotations

import copy
import io
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from onnxcomp.errors import OnnxcompError

if TYPE_CHECKING:
    import torch

__all__ = ["export_torch"]

# Legacy-exporter deprecation notices: expected, since we choose it on purpose (deterministic).
_QUIET = (
    r".*legacy TorchScript-based ONNX export.*",
    r".*The feature will be removed.*",
    r".*Only steps=1 can be constant folded.*",  # strided Slice (x[:, :, ::2, ::2]): harmless
    # Aimed at modules in training mode; ours is in eval mode, BN is exported in inference form.
    r".*recommended that constant folding be turned off.*",
)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise OnnxcompError(
            "exporting a PyTorch model needs torch: install onnxcomp[torch] (pip install torch)"
        ) from exc
    return torch


def _fold_batchnorm(module: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """Return a copy of ``module`` with every BatchNorm that follows a Conv/Linear folded into it.

    Uses torch.fx; falls back to ``module`` itself (the exporter then folds Conv+BN on its own)
    when the module cannot be traced or the folded copy does not reproduce its outputs.
    """
    torch = _import_torch()
    try:
        fused = _fx_fuse(torch, module)
        with torch.no_grad():
            ref = module(example)
            got = fused(example)
    except Exception:  # untraceable or failing module: let torch.onnx.export report it
        return module
    return fused if _same_outputs(torch, ref, got) else module


def _fx_fuse(torch: Any, module: torch.nn.Module) -> torch.nn.Module:
    """Trace ``module`` with torch.fx and fold Conv/Linear -> BatchNorm pairs (eval mode)."""
    from torch import fx, nn  # torch is optional: imported only when exporting
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    pairs = (
        (nn.Conv1d, nn.BatchNorm1d, fuse_conv_bn_eval),
        (nn.Conv2d, nn.BatchNorm2d, fuse_conv_bn_eval),
        (nn.Conv3d, nn.BatchNorm3d, fuse_conv_bn_eval),
        (nn.Linear, nn.BatchNorm1d, fuse_linear_bn_eval),
    )
    traced = fx.symbolic_trace(copy.deepcopy(module))
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not node.args or len(node.args) != 1:
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        first, bn = modules[prev.target], modules[node.target]
        for first_type, bn_type, fuse in pairs:
            if type(first) is first_type and type(bn) is bn_type and bn.track_running_stats:
                if first_type is nn.Linear and bn.num_features != first.out_features:
                    continue
                parent, _, attr = prev.target.rpartition(".")
                setattr(traced.get_submodule(parent), attr, fuse(first.eval(), bn.eval()))
                node.replace_all_uses_with(prev)
                traced.graph.erase_node(node)
                break
    traced.graph.lint()
    traced.recompile()
    return traced.eval()


def _same_outputs(torch: Any, ref: Any, got: Any) -> bool:
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    gots = [got] if isinstance(got, torch.Tensor) else list(got)
    if len(refs) != len(gots):
        return False
    for r, g in zip(refs, gots, strict=True):
        if r.shape != g.shape:
            return False
        scale = float(r.abs().max()) if r.numel() else 0.0
        if float((r - g).abs().max()) > 1e-4 * max(scale, 1e-6):
            return False
    return True


def export_torch(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    input_shape: Sequence[int] = (1, 3, 32, 32),
    example_input: torch.Tensor | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
    keep_batchnorm: bool = False,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("logits",),
) -> Path:
    """Export ``module`` (in eval mode) to one self-contained ONNX file at ``path`` (< 2 GB).

    Uses the TorchScript exporter (``dynamo=False``) for deterministic output. With
    ``dynamic_batch`` the first dimension of every input and output is named ``batch``.
    ``keep_batchnorm=False`` folds each BatchNorm that follows a Conv/Linear into it (deployment
    form); ``True`` keeps BatchNormalization nodes (eval mode, running statistics) so a later
    pass can fold them. The module's training flags are restored afterwards. The file is written
    atomically and checked with ``onnx.checker``.
    """
    torch = _import_torch()
    out = Path(path)
    example = _example_input(torch, module, input_shape, example_input)
    names_in, names_out = list(input_names), list(output_names)
    dynamic_axes = {name: {0: "batch"} for name in names_in + names_out} if dynamic_batch else None
    modes = {name: sub.training for name, sub in module.named_modules()}
    try:
        module.eval()
        if keep_batchnorm:
            to_export, mode = module, torch.onnx.TrainingMode.PRESERVE
        else:
            to_export = _fold_batchnorm(module, example)
            mode = torch.onnx.TrainingMode.EVAL
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                for pattern in _QUIET:
                    warnings.filterwarnings("ignore", message=pattern)
                torch.onnx.export(
                    to_export,
                    (example,),
                    buf,
                    dynamo=False,
                    export_params=True,
                    opset_version=opset,
                    do_constant_folding=True,
                    # EVAL lets the exporter's eval peephole fuse Conv+BN; PRESERVE on an
                    # eval-mode module skips that fusion only: BN is exported in inference form.
                    training=mode,
                    input_names=names_in,
                    output_names=names_out,
                    dynamic_axes=dynamic_axes,
                )
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise OnnxcompError(
                f"torch.onnx.export failed for {type(module).__name__} -> {out}: {first_line}"
            ) from exc
    finally:
        for name, sub in module.named_modules():
            sub.training = modes.get(name, sub.training)
    data = buf.getvalue()
    if keep_batchnorm:
        data = unshare_initializers(onnx.load_from_string(data)).SerializeToString()
    _write_checked(data, out)
    return out


def unshare_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every use of an initializer its own copy (in place, returned).

    torch's exporter merges initializers of equal value (a fresh network's BatchNorm scales,
    biases and statistics are all ones or zeros) and feeds some through Identity nodes: a model
    exported for training (``keep_batchnorm``) would then tie parameters of different layers, and
    a BatchNorm's running statistics would be the same tensor as another layer's parameter.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        dup = onnx.TensorProto()
        dup.CopyFrom(inits[node.input[0]])
        dup.name = node.output[0]
        graph.initializer.append(dup)
        inits[dup.name] = dup
        graph.node.remove(node)
    seen: set[str] = set()
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name not in inits or name in outputs:
                continue
            if name in seen:
                dup = onnx.TensorProto()
                dup.CopyFrom(inits[name])
                dup.name = f"{name}.{node.name or node.op_type}.{slot}"
                graph.initializer.append(dup)
                node.input[slot] = dup.name
            seen.add(name)
    used = {name for node in graph.node for name in node.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return model


def _example_input(
    torch: Any, module: torch.nn.Module, shape: Sequence[int], given: torch.Tensor | None
) -> torch.Tensor:
    """The given example, or a seeded random one of ``shape``, on the module's device."""
    if given is None:
        gen = torch.Generator().manual_seed(0)
        given = torch.randn(tuple(int(d) for d in shape), generator=gen)
    param = next(iter(module.parameters()), None)
    return given if param is None else given.to(param.device)


def _write_checked(data: bytes, out: Path) -> None:
    """Write the model atomically (temporary file beside ``out``, then renamed), after
    ``onnx.checker`` accepts it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a model file is meant to be shared
        try:
            onnx.checker.check_model(tmp_name, full_check=False)
        except onnx.checker.ValidationError as exc:
            first_line = (str(exc).strip().splitlines() or ["invalid model"])[0]
            raise OnnxcompError(f"exported model {out} fails onnx.checker: {first_line}") from exc
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
