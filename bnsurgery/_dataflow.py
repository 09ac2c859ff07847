"""Dataflow graphs of a model's BatchNorm, convolution and Linear calls, found three ways.

Pairing layers by registration order (``for conv, bn in zip(convs, bns)``) is wrong whenever the
forward uses modules in another order, twice, or not at all. What a fold needs is the *dataflow*:
which call produced the tensor a BatchNorm normalises, who else reads that tensor, and how often
each module runs. This module records it in one small graph (:class:`Dataflow`) built by

* ``"fx"``: ``torch.fx`` symbolic tracing with BatchNorm-likes, convolutions and Linear layers
  kept as leaves (no inputs needed; fails on data-dependent Python control flow);
* ``"export"``: a ``torch.export`` graph whose ATen nodes are mapped back to module calls through
  their ``nn_module_stack`` (needs example inputs; handles shape-dependent control flow);
* ``"hooks"``: one real forward run on example inputs, with hooks on the leaf modules and a
  ``TorchFunctionMode`` that sees every torch function applied outside them (handles anything
  that runs, but only sees the path those inputs take).

Every builder works on a deep copy, so the caller's model is never touched: a forward that stores
a tensor on ``self`` (a cache, a counter) would otherwise be left holding an fx ``Proxy``, and
buffers, RNG-driven layers and hooks would see the analysis. Each graph also records which
parameters and buffers of the leaf modules forward reads *outside* their own call
(``F.conv2d(x, self.conv.weight)``, ``self.bn.running_var``): such a layer cannot be folded. The
graph is consumed by :mod:`bnsurgery.pairs`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bnsurgery._bn_registry import looks_like_batchnorm

__all__ = [
    "Dataflow",
    "FlowNode",
    "build_dataflow",
    "is_leaf_of_interest",
    "resolve_module_path",
]

logger = logging.getLogger(__name__)

_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)


def _cat_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Sequence[Any], Any]:
    """The tensors and the dimension of a concatenation, however the call passed them."""
    tensors = args[0] if args else kwargs.get("tensors", ())
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    return tensors, dim

# Functions that read only a tensor's metadata. Reading a conv output's shape does not depend on
# its values, so it is not a "user" that would stop the fold.
_METADATA_READS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
    "is_floating_point", "is_complex", "element_size", "get_device", "storage_offset",
    "data_ptr", "dim_order", "has_names", "__len__", "__hash__", "type",
    "shape", "dtype", "ndim", "device", "layout", "requires_grad", "is_cuda", "is_sparse",
    "is_quantized", "is_meta", "names", "is_leaf", "grad_fn", "_version",
})


def is_leaf_of_interest(module: nn.Module) -> bool:
    """Modules the graph records as single calls: BatchNorm-likes, convolutions, Linear layers."""
    return looks_like_batchnorm(module) or isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


@dataclass
class FlowNode:
    """One step of the dataflow.

    Attributes:
        index: Position in :attr:`Dataflow.nodes` (topological order).
        kind: ``"input"``, ``"const"``, ``"module"`` (a call of a leaf of interest), ``"cat"``
            (a concatenation), ``"op"`` (anything else) or ``"output"``.
        label: The module's qualified name for module nodes, a readable op name otherwise.
        inputs: Indices of the nodes whose tensors this node reads, in argument order.
        users: Indices of the nodes that read this node's tensor(s).
        cat_dim: The concatenation dimension of a cat node.
        input_ndims: Ranks of a module call's tensor inputs, when known.
        output_ndim: Rank of a module call's output, when known.
    """

    index: int
    kind: str
    label: str
    inputs: list[int]
    users: list[int] = field(default_factory=list)
    cat_dim: int | None = None
    input_ndims: tuple[int, ...] | None = None
    output_ndim: int | None = None


@dataclass
class Dataflow:
    """The dataflow of one forward, with leaf-module calls as nodes (see :class:`FlowNode`)."""

    method: str
    nodes: list[FlowNode] = field(default_factory=list)
    #: Leaf module qualified name -> its parameters/buffers that forward reads outside its call.
    outside_reads: dict[str, list[str]] = field(default_factory=dict)

    def read_outside(self, owner: str, attribute: str) -> None:
        """Record that forward reads ``owner.attribute`` outside ``owner``'s own call."""
        seen = self.outside_reads.setdefault(owner, [])
        if attribute not in seen:
            seen.append(attribute)

    def add(self, kind: str, label: str, inputs: list[int], **extra: object) -> FlowNode:
        node = FlowNode(index=len(self.nodes), kind=kind, label=label, inputs=list(inputs),
                        **extra)  # type: ignore[arg-type]
        self.nodes.append(node)
        return node

    def link_users(self) -> None:
        """Fill every node's ``users`` from the ``inputs`` of the others (once per user)."""
        for node in self.nodes:
            node.users = []
        for node in self.nodes:
            for producer in dict.fromkeys(node.inputs):
                self.nodes[producer].users.append(node.index)

    def module_calls(self) -> dict[str, list[FlowNode]]:
        """Module qualified name -> its call nodes, in call order."""
        calls: dict[str, list[FlowNode]] = {}
        for node in self.nodes:
            if node.kind == "module":
                calls.setdefault(node.label, []).append(node)
        return calls

    def describe(self, index: int) -> str:
        """A short phrase naming a node, for skip reasons."""
        node = self.nodes[index]
        if node.kind == "module":
            return f"'{node.label}'"
        if node.kind == "input":
            return "a model input"
        if node.kind == "output":
            return "the model output"
        if node.kind == "const":
            return f"the constant {node.label}"
        return node.label


def build_dataflow(model: nn.Module, method: str,
                   example_inputs: tuple[object, ...] | None) -> Dataflow:
    """Build the dataflow of ``model`` with ``method`` (``"fx"``, ``"export"`` or ``"hooks"``).

    Args:
        model: The model; never modified.
        method: Which builder to use.
        example_inputs: Positional forward arguments (needed by ``"export"`` and ``"hooks"``).

    Returns:
        The dataflow, users linked.

    Raises:
        Exception: Whatever the tracer raises when it cannot handle the model; callers record it
            and fall back to the next method.
    """
    builders: dict[str, Callable[[nn.Module, tuple[object, ...] | None], Dataflow]] = {
        "fx": _from_fx, "export": _from_export, "hooks": _from_hooks}
    flow = builders[method](model, example_inputs)
    flow.link_users()
    return flow


# --- torch.fx ---------------------------------------------------------------------------------

class _LeafTracer(torch.fx.Tracer):
    """A tracer that stops at BatchNorm-likes, convolutions and Linear layers of any class."""

    # Buffers read in forward become graph nodes too, so ``self.bn.running_var`` outside the
    # BatchNorm's call shows as a read (it would otherwise be evaluated eagerly and vanish).
    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_of_interest(m) or super().is_leaf_module(m, module_qualified_name)


def _fx_label(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    try:
        name = torch.fx.node._get_qualified_name(node.target)  # type: ignore[arg-type]
    except (AttributeError, RuntimeError, TypeError):
        name = str(node.target)
    return name.replace("_operator.", "operator.")


def _copy(model: nn.Module, *, share_tensors: bool = False) -> nn.Module:
    """A deep copy of ``model``; with ``share_tensors`` its parameters and buffers are the
    caller's own objects (symbolic tracing reads no tensor values and writes none: every
    parameter and buffer becomes a graph node), so a large model costs no weight copy."""
    memo: dict[int, object] = {}
    if share_tensors:
        for tensor in [*model.parameters(), *model.buffers()]:
            memo[id(tensor)] = tensor
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - any failure to copy means "cannot analyse safely"
        raise RuntimeError(f"the model cannot be deep-copied ({type(exc).__name__}: {exc}), and "
                           "analysing the original would leave traces of the analysis on it"
                           ) from exc


def _leaf_tensors(model: nn.Module) -> dict[int, tuple[str, str]]:
    """``id(tensor)`` -> ``(leaf module name, attribute)`` for every leaf parameter and buffer."""
    owned: dict[int, tuple[str, str]] = {}
    for name, module in model.named_modules():
        if not name or not is_leaf_of_interest(module):
            continue
        for attribute, tensor in [*module.named_parameters(recurse=False),
                                  *module.named_buffers(recurse=False)]:
            owned.setdefault(id(tensor), (name, attribute))
    return owned


def _from_fx(model: nn.Module, example_inputs: tuple[object, ...] | None) -> Dataflow:
    model = _copy(model, share_tensors=True)
    graph = _LeafTracer().trace(model)
    owned = _leaf_tensors(model)
    flow = Dataflow("fx")
    index: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        inputs = [index[n] for n in node.all_input_nodes if n in index]
        if node.op == "placeholder":
            new = flow.add("input", str(node.target), [])
        elif node.op == "get_attr":
            new = flow.add("const", str(node.target), [])
            value: torch.Tensor | None
            try:
                value = model.get_parameter(str(node.target))
            except AttributeError:
                try:
                    value = model.get_buffer(str(node.target))
                except AttributeError:
                    value = None
            if value is not None and id(value) in owned:
                flow.read_outside(*owned[id(value)])
        elif node.op == "call_module":
            module = model.get_submodule(str(node.target))
            if is_leaf_of_interest(module):
                new = flow.add("module", str(node.target), inputs)
            else:
                new = flow.add("op", f"{type(module).__name__} '{node.target}'", inputs)
        elif node.op == "call_function" and node.target in _CAT_FUNCTIONS:
            tensors, dim = _cat_arguments(node.args, node.kwargs)
            ordered = [index[n] for n in tensors if isinstance(n, torch.fx.Node) and n in index]
            if len(ordered) != len(tensors) or not isinstance(dim, int):
                new = flow.add("op", "torch.cat", inputs)
            else:
                new = flow.add("cat", "torch.cat", ordered, cat_dim=dim)
        elif node.op == "output":
            new = flow.add("output", "output", inputs)
        elif _fx_reads_metadata(node):
            new = flow.add("op", _fx_label(node), [])  # depends on shapes, not values
        else:
            new = flow.add("op", _fx_label(node), inputs)
        index[node] = new.index
    return flow


def _fx_reads_metadata(node: torch.fx.Node) -> bool:
    """``x.shape``, ``x.size(0)``, ``x.dim()`` and the like: no dependence on tensor values."""
    if node.op == "call_method":
        return node.target in _METADATA_READS
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[1] in _METADATA_READS
    return False


# --- torch.export -----------------------------------------------------------------------------

def _from_export(model: nn.Module, example_inputs: tuple[object, ...] | None) -> Dataflow:
    """The dataflow of ``model`` read from a ``torch.export`` program of a copy of it: one node
    per call of a leaf module of interest, plus the inputs, ``torch.cat`` calls and other ops."""
    if example_inputs is None:
        raise ValueError("torch.export needs example_inputs")
    work = _copy(model)
    with _quiet_torch() as captured:
        try:
            program = torch.export.export(work, tuple(example_inputs), strict=False)
        finally:
            if captured.getvalue():
                logger.debug("torch.export printed:\n%s", captured.getvalue())
    flow = Dataflow("export")
    group_of, path_of_group = _export_module_groups(work, program)
    _record_outside_reads(flow, work, program, group_of, path_of_group)
    _add_export_nodes(flow, program, group_of, path_of_group)
    return flow


def _export_module_groups(work: nn.Module, program: Any
                          ) -> tuple[dict[torch.fx.Node, str], dict[str, str]]:
    """Group every ATen node under the outermost leaf module call it belongs to.

    Returns:
        Node -> its group key (the ``nn_module_stack`` key of the call), and group key -> the
        leaf module's qualified name.
    """
    names = {id(module): name for name, module in work.named_modules()}
    resolved: dict[str, str | None] = {}

    def leaf_name(path: str) -> str | None:
        if path not in resolved:
            module = resolve_module_path(work, path)
            name = None if module is None else names.get(id(module))
            resolved[path] = (name if name and module is not None and is_leaf_of_interest(module)
                              else None)
        return resolved[path]

    group_of: dict[torch.fx.Node, str] = {}
    path_of_group: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        for key, (path, _type_name) in (node.meta.get("nn_module_stack") or {}).items():
            name = leaf_name(path)
            if name is not None:
                group_of[node] = key
                path_of_group[key] = name
                break
    return group_of, path_of_group


def _record_outside_reads(flow: Dataflow, work: nn.Module, program: Any,
                          group_of: dict[torch.fx.Node, str],
                          path_of_group: dict[str, str]) -> None:
    """Mark the leaf tensors (parameters, buffers) that nodes outside their own module read."""
    signature = program.graph_signature
    state_inputs = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    owned = _leaf_tensors(work)
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in state_inputs:
            continue
        try:
            target = state_inputs[node.name]
            value = (work.get_parameter(target) if node.name in signature.inputs_to_parameters
                     else work.get_buffer(target))
        except AttributeError:
            continue
        owner = owned.get(id(value))
        if owner is None:
            continue
        for user in node.users:
            key = group_of.get(user)
            if key is None or path_of_group[key] != owner[0]:
                flow.read_outside(*owner)


def _add_export_nodes(flow: Dataflow, program: Any, group_of: dict[torch.fx.Node, str],
                      path_of_group: dict[str, str]) -> None:
    """Add one flow node per user input, module group, ``torch.cat``, other op and output."""
    user_inputs = set(program.graph_signature.user_inputs)
    index: dict[torch.fx.Node, int] = {}
    group_node: dict[str, FlowNode] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                index[node] = flow.add("input", node.name, []).index
            continue
        if node.op == "get_attr":
            continue
        inputs = [index[n] for n in node.all_input_nodes if n in index]
        key = group_of.get(node)
        if key is not None:
            existing = group_node.get(key)
            if existing is None:
                existing = flow.add("module", path_of_group[key], [])
                group_node[key] = existing
                _set_ndims(existing, node, first=True)
            existing.inputs.extend(i for i in inputs
                                   if i != existing.index and i not in existing.inputs)
            _set_ndims(existing, node, first=False)
            index[node] = existing.index
            continue
        if node.op == "call_function" and node.target is torch.ops.aten.cat.default:
            tensors, dim = _cat_arguments(node.args, node.kwargs)
            ordered = [index[n] for n in tensors if isinstance(n, torch.fx.Node) and n in index]
            if len(ordered) == len(tensors) and isinstance(dim, int):
                index[node] = flow.add("cat", "torch.cat", ordered, cat_dim=dim).index
                continue
        if node.op == "output":
            index[node] = flow.add("output", "output", inputs).index
            continue
        label = getattr(node.target, "__name__", str(node.target))
        index[node] = flow.add("op", f"aten.{label}", inputs).index


def _path_parts(path: str) -> list[str]:
    """Split a module path on the dots outside parentheses (``a.slice(None, -1, None).0``)."""
    parts, depth, current = [], 0, ""
    for char in path:
        if char == "." and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (char == "(") - (char == ")")
        current += char
    parts.append(current)
    return [p for p in parts if p]


def resolve_module_path(root: nn.Module, path: str) -> nn.Module | None:
    """The module a ``torch.export`` module path names, or ``None``.

    Besides plain dotted names, torch.export writes the slices a forward takes of an
    ``nn.Sequential`` or ``nn.ModuleList`` (``for m in self.model[:-1]``) into the path:
    ``model.slice(None, -1, None).0.bn``. The slice is applied to the real container, so the
    path leads to the real module.
    """
    module: object = root
    for part in _path_parts(path):
        if part.startswith("slice(") and part.endswith(")"):
            try:
                bounds = [None if b.strip() == "None" else int(b)
                          for b in part[len("slice("):-1].split(",")]
                module = module[slice(*bounds)]  # type: ignore[index]
            except (TypeError, ValueError, IndexError):
                return None
            continue
        children = getattr(module, "_modules", None)
        if isinstance(children, dict) and part in children:
            module = children[part]
        else:
            module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module if isinstance(module, nn.Module) else None


@contextlib.contextmanager
def _quiet_torch() -> Iterator[io.StringIO]:
    """Keep a failing ``torch.export`` from printing partial graphs and shape warnings.

    A failed export is an expected step of the fallback chain, not something to show the user;
    what torch prints is kept and logged at DEBUG level instead.
    """
    names = ("torch.fx.experimental.symbolic_shapes", "torch.export", "torch._export",
             "torch._dynamo", "torch._subclasses.fake_tensor")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    buffer = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR + 1)
        with contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _set_ndims(flow_node: FlowNode, node: torch.fx.Node, *, first: bool) -> None:
    """Record tensor ranks from export's fake-tensor metadata (input of the first ATen node of a
    module call, output of the last)."""
    if first:
        value = node.all_input_nodes[0].meta.get("val") if node.all_input_nodes else None
        if isinstance(value, torch.Tensor):
            flow_node.input_ndims = (value.dim(),)
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        flow_node.output_ndim = value.dim()


# --- forward run with hooks -------------------------------------------------------------------

def _tensors_in(obj: object, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor inside nested containers, dataclasses and plain objects (bounded depth)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth > 6 or obj is None or isinstance(obj, (str, bytes, int, float, bool, nn.Module)):
        return
    if isinstance(obj, dict):
        items: list[object] = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name, None) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        yield from _tensors_in(item, depth + 1)


def _function_name(func: Callable[..., object]) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":  # a Tensor property such as .shape
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _Recorder(TorchFunctionMode):
    """Records torch functions applied to tracked tensors outside the leaf modules."""

    def __init__(self, flow: Dataflow, owned: dict[int, tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.flow = flow
        self.owned = owned or {}
        self.producer: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique for the whole run
        self.depth = 0
        self.stack: list[FlowNode | None] = []

    def track(self, tensors: list[torch.Tensor], node: FlowNode) -> None:
        for tensor in tensors:
            self.alive.append(tensor)
            self.producer[id(tensor)] = node.index

    def producers(self, obj: object) -> list[int]:
        found = (self.producer.get(id(t)) for t in _tensors_in(obj))
        return [p for p in found if p is not None]

    def __torch_function__(self, func: Callable[..., object], types: Sequence[type],
                           args: Sequence[object] = (),
                           kwargs: Mapping[str, object] | None = None) -> object:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.depth:
            return result
        if self.owned:
            for tensor in _tensors_in((args, kwargs)):
                owner = self.owned.get(id(tensor))
                if owner is not None:
                    self.flow.read_outside(*owner)
        outputs = list(_tensors_in(result))
        name = _function_name(func)
        if not outputs and name in _METADATA_READS:
            return result
        inputs = self.producers((args, kwargs))
        if not inputs and not outputs:
            return result
        if func in _CAT_FUNCTIONS:
            tensors, dim = _cat_arguments(args, kwargs)
            ordered = [self.producer.get(id(t)) for t in tensors]
            if isinstance(dim, int) and all(p is not None for p in ordered):
                node = self.flow.add("cat", "torch.cat", ordered, cat_dim=dim)  # type: ignore[arg-type]
                self.track(outputs, node)
                return result
        node = self.flow.add("op", f"torch.{name}" if name else repr(func), inputs)
        self.track(outputs, node)
        return result

    def pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            node = None
            if not self.depth:
                tensors = list(_tensors_in((args, kwargs)))
                node = self.flow.add("module", name, self.producers((args, kwargs)),
                                     input_ndims=tuple(t.dim() for t in tensors))
            self.stack.append(node)
            self.depth += 1
        return hook

    def post_hook(self) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object],
                 output: object) -> None:
            self.depth -= 1
            node = self.stack.pop()
            if node is not None:
                outputs = list(_tensors_in(output))
                node.output_ndim = outputs[0].dim() if len(outputs) == 1 else None
                self.track(outputs, node)
        return hook


def _from_hooks(model: nn.Module, example_inputs: tuple[object, ...] | None) -> Dataflow:
    if example_inputs is None:
        raise ValueError("a forward run needs example_inputs")
    work = _copy(model)
    flow = Dataflow("hooks")
    recorder = _Recorder(flow, _leaf_tensors(work))
    handles = []
    inputs = copy.deepcopy(tuple(example_inputs))
    try:
        for name, module in work.named_modules():
            if name and is_leaf_of_interest(module):
                handles.append(module.register_forward_pre_hook(recorder.pre_hook(name),
                                                                with_kwargs=True))
                handles.append(module.register_forward_hook(recorder.post_hook(),
                                                            with_kwargs=True))
        for position, tensor in enumerate(_tensors_in(inputs)):
            recorder.track([tensor], flow.add("input", f"input {position}", []))
        # torch leaves torch.cuda.is_initialized unannotated.
        initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        devices = list(range(torch.cuda.device_count())) if initialized else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), recorder:
            output = work(*inputs)
        flow.add("output", "output", recorder.producers(output))
    finally:
        for handle in handles:
            handle.remove()
    return flow

