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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnsurgery._bn_registry import looks_like_batchnorm
from bnsurgery._lazy import require
from bnsurgery.comparison import Tolerance, output_scale, select_tolerance
from bnsurgery.ort_session import DEFAULT_TIMEOUT_S, OnnxRunner
from bnsurgery.report import LayerError
from bnsurgery.results import JsonResult
from bnsurgery.tensors import as_input_tuple, cast_inputs, model_device, model_dtype

__all__ = ["LayerComparison", "layer_errors", "onnx_layer_errors", "onnx_module_outputs"]

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
        foldable = isinstance(module, _NOT_COMPARED) or looks_like_batchnorm(module)

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


@dataclass(frozen=True)
class LayerComparison(JsonResult):
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


def _walk_layers(events: Sequence[_Event], candidate: Mapping[str, Tensor], tolerance: Tolerance,
                 *, output_failed: bool) -> LayerComparison:
    """Compare recorded boundaries in order; see :class:`LayerComparison`."""
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
        scale = output_scale(ref)
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
    inputs = as_input_tuple(inputs)
    dtype = model_dtype(candidate)
    tolerance = tolerance or select_tolerance(dtype)
    ref_events = _record_calls(reference, cast_inputs(inputs, model_device(reference),
                                                      torch.float32))
    cand_events = _record_calls(candidate, cast_inputs(inputs, model_device(candidate), dtype))
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


def onnx_layer_errors(reference: nn.Module, path: Path, inputs: Sequence[Tensor], *,
                      providers: Sequence[str], tolerance: Tolerance, device: torch.device,
                      output_failed: bool, timeout: float = DEFAULT_TIMEOUT_S
                      ) -> tuple[LayerComparison, str]:
    """Module-boundary errors of an ONNX file, through a debug copy exposing module outputs.

    Args:
        reference: The original model, on ``device``, in float32.
        path: The ONNX file under test; it is read, never changed.
        inputs: The positional inputs.
        providers: Resolved onnxruntime execution providers.
        tolerance: What decides divergence.
        device: Where the reference runs.
        output_failed: The final outputs are known to differ (see :func:`layer_errors`).
        timeout: Seconds the debug copy may run.

    Returns:
        The comparison, and a note saying how it was made (or why it could not be).

    Raises:
        InvalidInputError: onnxruntime cannot load the debug copy.
        RunTimeoutError: The debug copy did not finish within ``timeout``.
    """
    onnx = require("onnx", purpose="Comparing ONNX module outputs")
    proto = onnx.load(str(path))
    module_outputs = onnx_module_outputs(proto)
    if not module_outputs:
        return LayerComparison((), None, ()), (
            "first diverging module unknown: the file carries no module-scope metadata (the "
            "legacy exporter writes none)")
    events = _record_calls(reference, cast_inputs(inputs, device, torch.float32))
    wanted = _wanted_values(events, module_outputs)
    _expose_outputs(onnx, proto, wanted.values())
    with tempfile.TemporaryDirectory(prefix="bnsurgery-debug-") as folder:
        debug_path = Path(folder) / f"{path.stem}.debug.onnx"
        onnx.save(proto, str(debug_path))
        runner = OnnxRunner(debug_path, providers, timeout=timeout)
        values = dict(zip(runner.output_names, runner(*inputs), strict=True))
    candidate = {key: values[value] for key, value in wanted.items() if value in values}
    comparison = _walk_layers(events, candidate, tolerance, output_failed=output_failed)
    note = (f"per-layer errors from a debug copy of {path.name} exposing {len(candidate)} module "
            "boundaries as outputs; the file under test was not changed")
    return comparison, note


def _wanted_values(events: Sequence[_Event], module_outputs: Mapping[str, list[str]]
                   ) -> dict[str, str]:
    """Event key -> graph value holding that call's output, where the file says which it is."""
    calls: dict[str, int] = {}
    for event in events:
        calls[event.name] = max(calls.get(event.name, 0), event.call)
    wanted: dict[str, str] = {}
    for event in events:
        values = module_outputs.get(event.name, [])
        if event.compared and len(values) == calls[event.name]:
            wanted[event.key] = values[event.call - 1]
    return wanted


def _expose_outputs(onnx: Any, proto: Any, values: Iterable[str]) -> None:
    """Add ``values`` to the graph outputs of ``proto`` (typed where shape inference knows)."""
    values = list(dict.fromkeys(values))
    known = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.output)}
    if not all(value in known for value in values):
        inferred = onnx.shape_inference.infer_shapes(proto)
        known = {v.name: v for v in list(inferred.graph.value_info)
                 + list(inferred.graph.output)}
    present = {o.name for o in proto.graph.output}
    for value in values:
        if value in present:
            continue
        info = known.get(value)
        if info is None:
            info = onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None)
        proto.graph.output.append(info)
        present.add(value)
