"""Locating the first diverging module between a reference model and a candidate.

Module outputs are recorded with forward hooks and compared at module boundaries in execution
order. Convolutions, linear layers, BatchNorms and identities are not compared themselves (folding
legitimately changes their outputs); they are listed as the suspects that ran just before the
first diverging boundary. For an ONNX file, a debug copy exposes the values at module boundaries
(found through the module-scope metadata the exporter stores on every node) as extra outputs; the
file under test is never changed.
"""

from __future__ import annotations

import ast
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnsurgery._lazy import require
from bnsurgery.ort_session import _session
from bnsurgery.report import LayerError, Tolerance

__all__ = ["LayerComparison", "layer_errors", "onnx_module_outputs"]

# Modules whose own output is not compared at module boundaries: folding legitimately changes
# what a convolution or linear layer returns (it now includes the BatchNorm) and turns the
# BatchNorm into an identity. Their neighbours' outputs must still agree.
_NOT_COMPARED: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.Identity,
                                   nn.modules.batchnorm._NormBase)


# --------------------------------------------------------------------------------------------
# PyTorch module boundaries.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Event:
    """One module call in the reference's execution order."""

    key: str            # "name" for the first call, "name#k" for the k-th call (k >= 2)
    name: str
    call: int
    compared: bool      # its output is compared (a tensor from a module folding leaves alone)
    foldable: bool      # a convolution, linear layer, BatchNorm or identity: never compared
    output: Tensor | None


def _record_calls(model: nn.Module, inputs: Sequence[Tensor]) -> list[_Event]:
    """Run ``model`` once and record every submodule call's output, in completion order."""
    events: list[_Event] = []
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str, module: nn.Module) -> Callable[..., None]:
        foldable = isinstance(module, _NOT_COMPARED) or _bn_like(module)

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            call = counts[name]
            key = name if call == 1 else f"{name}#{call}"
            # Cloned: an in-place ReLU would otherwise rewrite the recorded tensor.
            tensor = output.detach().clone() if isinstance(output, Tensor) and not foldable \
                else None
            events.append(_Event(key, name, call, tensor is not None, foldable, tensor))
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook_for(name, module)))
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return events


def _bn_like(module: nn.Module) -> bool:
    from bnsurgery._bn_registry import looks_like_batchnorm
    return looks_like_batchnorm(module)


@dataclass(frozen=True)
class LayerComparison:
    """Module-boundary errors between a reference and a candidate, in execution order.

    Attributes:
        layers: Error at every compared module boundary.
        first_divergence: The first boundary out of tolerance, ``"output"`` when only the final
            output is, or ``None``.
        suspects: Modules not compared themselves (convolutions, linear layers, BatchNorms,
            identities) that ran between the last agreeing boundary and the first diverging one.
    """

    layers: tuple[LayerError, ...]
    first_divergence: str | None
    suspects: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"layers": [layer.to_dict() for layer in self.layers],
                "first_divergence": self.first_divergence, "suspects": list(self.suspects)}


def _walk_layers(events: Sequence[_Event], candidate: Mapping[str, Tensor], tolerance: Tolerance,
                 *, output_failed: bool) -> LayerComparison:
    """Compare recorded boundaries in order; see :class:`LayerComparison`."""
    from bnsurgery.validate import _scale

    layers: list[LayerError] = []
    first: str | None = None
    suspects: tuple[str, ...] = ()
    pending: list[str] = []
    for event in events:
        other = candidate.get(event.key)
        if event.foldable:
            pending.append(event.key)
            continue
        if not event.compared or other is None or event.output is None \
                or tuple(other.shape) != tuple(event.output.shape):
            continue
        ref = event.output.to("cpu", torch.float64)
        diff = (other.detach().to("cpu", torch.float64) - ref).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        if math.isnan(max_abs):
            max_abs = math.inf
        scale = _scale(ref)
        diverged = not max_abs <= tolerance.allowed(scale)
        layers.append(LayerError(event.key, max_abs, max_abs / scale if scale > 0 else max_abs,
                                 diverged))
        if diverged and first is None:
            first, suspects = event.key, tuple(pending)
        if not diverged:
            pending = []
    if first is None and output_failed:
        # Every boundary agreed: the difference is in what ran after the last one (often the
        # classifier), or it builds up too gradually to cross the tolerance anywhere earlier.
        first, suspects = "output", tuple(pending)
    return LayerComparison(tuple(layers), first, suspects)


def layer_errors(reference: nn.Module, candidate: nn.Module, inputs: Tensor | Sequence[Tensor],
                 *, tolerance: Tolerance | None = None, output_failed: bool = False
                 ) -> LayerComparison:
    """Compare two PyTorch models module boundary by module boundary, using forward hooks.

    Modules are paired by qualified name and call number, so a module used twice (torchvision's
    ``BasicBlock.relu``) is compared call by call. Convolutions, linear layers, BatchNorms and
    identities are not compared (folding changes their outputs on purpose); they are reported
    as suspects when the boundary after them diverges. Both models must already be on the same
    device; the candidate's inputs are cast to its dtype.

    Args:
        reference: The original model, in eval mode.
        candidate: The model to judge (replaced, fused, half precision...), in eval mode.
        inputs: Positional inputs.
        tolerance: Tolerance that decides divergence; defaults to the candidate dtype's.
        output_failed: The final outputs are known to differ; when no boundary diverges, the
            divergence is then attributed to ``"output"`` and what ran after the last boundary.

    Returns:
        The per-boundary comparison.
    """
    from bnsurgery.validate import (
        _cast_inputs,
        _model_device,
        _model_dtype,
        as_input_tuple,
        select_tolerance,
    )

    inputs = as_input_tuple(inputs)
    dtype = _model_dtype(candidate)
    tolerance = tolerance or select_tolerance(dtype)
    ref_events = _record_calls(reference, _cast_inputs(inputs, _model_device(reference),
                                                       torch.float32))
    cand_events = _record_calls(candidate, _cast_inputs(inputs, _model_device(candidate), dtype))
    cand = {e.key: e.output for e in cand_events if e.output is not None}
    return _walk_layers(ref_events, cand, tolerance, output_failed=output_failed)


# --------------------------------------------------------------------------------------------
# ONNX module boundaries.
# --------------------------------------------------------------------------------------------

def _scopes(node: Any) -> tuple[str, ...]:
    """Module paths a node belongs to, from the exporter's ``name_scopes`` metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ()
            # First entry is the root module (''), last is the aten node's own name.
            return tuple(s for s in scopes[1:-1] if s)
    return ()


def onnx_module_outputs(proto: Any) -> dict[str, list[str]]:
    """For each module path, the values it hands to the rest of the graph, in graph order.

    A value belongs to a module's output when a node inside the module produces it and a node
    outside the module (or the graph output) consumes it. Needs the module-scope metadata the
    torch.export-based exporter writes on each node; returns ``{}`` without it.
    """
    graph = proto.graph
    producer: dict[str, tuple[int, frozenset[str]]] = {}
    node_scopes = []
    for index, node in enumerate(graph.node):
        scopes = frozenset(_scopes(node))
        node_scopes.append(scopes)
        for value in node.output:
            if value:
                producer[value] = (index, scopes)
    exits: dict[str, list[tuple[int, str]]] = {}
    seen: set[tuple[str, str]] = set()

    def mark(value: str, consumer_scopes: frozenset[str]) -> None:
        if value not in producer:
            return
        index, scopes = producer[value]
        for scope in scopes - consumer_scopes:
            if (scope, value) not in seen:
                seen.add((scope, value))
                exits.setdefault(scope, []).append((index, value))

    for node, scopes in zip(graph.node, node_scopes, strict=True):
        for value in node.input:
            mark(value, scopes)
    for output in graph.output:
        mark(output.name, frozenset())
    return {scope: [value for _, value in sorted(values)] for scope, values in exits.items()}


def _onnx_layer_errors(reference: nn.Module, path: Path, inputs: Sequence[Tensor],
                       providers: Sequence[str], tolerance: Tolerance, names: Sequence[str],
                       file_dtypes: Sequence[torch.dtype | None], device: torch.device, *,
                       output_failed: bool) -> tuple[LayerComparison, str]:
    """Module-boundary errors of an ONNX file, through a debug copy exposing module outputs."""
    from bnsurgery.validate import _cast_inputs

    onnx = require("onnx", purpose="Comparing ONNX module outputs")
    proto = onnx.load(str(path))
    module_outputs = onnx_module_outputs(proto)
    if not module_outputs:
        return LayerComparison((), None, ()), (
            "first diverging module unknown: the file carries no module-scope metadata (the "
            "legacy exporter writes none)")
    events = _record_calls(reference, _cast_inputs(inputs, device, torch.float32))
    calls: dict[str, int] = {}
    for event in events:
        calls[event.name] = max(calls.get(event.name, 0), event.call)
    wanted: dict[str, str] = {}
    for event in events:
        values = module_outputs.get(event.name, [])
        if event.compared and len(values) == calls[event.name]:
            wanted[event.key] = values[event.call - 1]
    known = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.output)}
    if not all(value in known for value in wanted.values()):
        proto = onnx.shape_inference.infer_shapes(proto)
        known = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.output)}
    present = {o.name for o in proto.graph.output}
    for value in dict.fromkeys(wanted.values()):
        if value in present:
            continue
        info = known.get(value)
        if info is None:
            info = onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None)
        proto.graph.output.append(info)
        present.add(value)
    with tempfile.TemporaryDirectory(prefix="bnsurgery-debug-") as folder:
        debug_path = Path(folder) / f"{path.stem}.debug.onnx"
        onnx.save(proto, str(debug_path))
        session = _session(debug_path, providers)
        feed = {name: tensor.detach().to("cpu", dtype=dtype or tensor.dtype).numpy()
                for name, tensor, dtype in zip(names, inputs, file_dtypes, strict=True)}
        output_names = [o.name for o in session.get_outputs()]
        values = dict(zip(output_names, session.run(None, feed), strict=True))
    candidate = {key: torch.from_numpy(values[value]) for key, value in wanted.items()
                 if value in values}
    comparison = _walk_layers(events, candidate, tolerance, output_failed=output_failed)
    note = (f"per-layer errors from a debug copy of {path.name} exposing {len(candidate)} module "
            "boundaries as outputs; the file under test was not changed")
    return comparison, note
