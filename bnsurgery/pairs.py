"""Find which BatchNorm can be folded into which layer, from the model's real dataflow.

A BatchNorm folds into the layer that produced its input (``conv -> bn``), into the layers whose
outputs were concatenated into its input (``cat([conv_a, conv_b]) -> bn``, one channel slice
each), or into the single layer that reads its output (``bn -> conv``), and only when that is
exact:

* the BatchNorm is a class bnsurgery knows (exact type), in eval mode, with running statistics;
* the BatchNorm and the layer each run exactly once per forward (a module used at two call sites
  shares one set of weights, which cannot be folded for one call and not the other);
* the tensor between them has no other reader (a second reader would see folded values);
* the layer is ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear``, or a subclass
  that only changes ``__init__`` (a subclass with its own ``forward`` may transform its weights),
  its parameters are neither shared with another module nor share storage with another tensor,
  forward reads neither module's parameters or buffers outside its own call
  (``F.conv2d(x, self.conv.weight)``, ``self.bn.running_var``), and nobody has hooks on either
  (nor global module hooks, which see every module);
* a norm+act layer (timm's ``BatchNormAct2d``) folds only into the layer *before* it: its
  activation runs after the normalisation, and ``conv(act(bn(x)))`` is not ``conv'(act(x))``;
* the channel axes agree: a Linear layer writes the *last* axis, so it pairs with a BatchNorm
  only on 2-D tensors; folding into a following conv is refused when it pads with zeros.

The dataflow comes from :mod:`bnsurgery._dataflow` (``torch.fx``, then ``torch.export``, then a
forward run with hooks); every pair records which of them found it, and every BatchNorm that is
not paired gets a reason in plain words.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnsurgery._bn_registry import (
    batchnorm_input_rank,
    batchnorm_kind,
    looks_like_batchnorm,
    static_skip_reason,
)
from bnsurgery._dataflow import Dataflow, FlowNode, build_dataflow
from bnsurgery.errors import FusionError, InvalidInputError, format_message
from bnsurgery.results import JsonResult
from bnsurgery.tensors import module_tensor

__all__ = [
    "DISCOVERY_METHODS",
    "DiscoveryAttempt",
    "FoldPair",
    "PairSearch",
    "TRANSPOSED_CONVS",
    "as_forward_args",
    "channels_out",
    "discover_dataflow",
    "find_fold_pairs",
    "global_hooks_reason",
    "target_base",
]

logger = logging.getLogger(__name__)

#: The dataflow builders, in the order they are tried by default.
DISCOVERY_METHODS: tuple[str, ...] = ("fx", "export", "hooks")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Transposed convolutions: their weights hold output channels on axis 1, not 0.
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_TARGETS = (*_CONVS, *TRANSPOSED_CONVS, nn.Linear)


@dataclass(frozen=True)
class FoldPair(JsonResult):
    """A BatchNorm and the layer(s) it folds into.

    Attributes:
        batchnorm: Qualified name of the BatchNorm.
        targets: Qualified names of the layers that absorb it: one layer, or one per channel
            slice (in concatenation order) when the BatchNorm follows a concatenation.
        direction: ``"preceding"`` (folded into the layer(s) before it) or ``"following"``
            (folded into the layer after it).
        method: Which dataflow builder found the pair: ``"fx"``, ``"export"`` or ``"hooks"``.
    """

    batchnorm: str
    targets: tuple[str, ...]
    direction: str
    method: str


@dataclass(frozen=True)
class DiscoveryAttempt(JsonResult):
    """One try of one dataflow builder.

    Attributes:
        method: ``"fx"``, ``"export"`` or ``"hooks"``.
        status: ``"used"``, ``"failed"`` or ``"not tried"``.
        detail: Why it failed or was not tried (empty when used).
    """

    method: str
    status: str
    detail: str = ""


@dataclass(frozen=True)
class PairSearch(JsonResult):
    """The outcome of :func:`find_fold_pairs`.

    Attributes:
        pairs: Foldable pairs, in the order the BatchNorms appear in ``named_modules()``.
        skipped: BatchNorm qualified name -> why it cannot be folded, in plain words.
        attempts: Every dataflow builder tried, in order.
        method: The builder whose graph was used, or ``None`` when every one failed.
    """

    pairs: tuple[FoldPair, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    attempts: tuple[DiscoveryAttempt, ...] = ()
    method: str | None = None


def as_forward_args(example_inputs: object) -> tuple[object, ...] | None:
    """Normalise ``example_inputs`` to positional forward arguments.

    A tensor is one argument; a tuple or list is the argument list (so a model taking a list of
    images needs ``([image_a, image_b],)``); ``None`` stays ``None``; anything else is one argument.
    """
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def discover_dataflow(model: nn.Module, args: tuple[object, ...] | None,
                      methods: Sequence[str]) -> tuple[Dataflow | None, list[DiscoveryAttempt]]:
    """The dataflow graph from the first builder in ``methods`` that works, and every attempt.

    Shared by fold-pair discovery and branch re-parameterisation, so both try the builders in
    the same order and report their failures in the same words.

    Args:
        model: The model; each builder works on a copy.
        args: Positional forward arguments, or ``None`` (then only ``fx`` can run).
        methods: Builder names, in the order to try them.

    Returns:
        The graph (``None`` when every builder failed) and one attempt per method tried.
    """
    attempts: list[DiscoveryAttempt] = []
    for method in methods:
        if method != "fx" and args is None:
            attempts.append(DiscoveryAttempt(method, "not tried", "needs example_inputs"))
            continue
        try:
            flow = build_dataflow(model, method, args)
        except Exception as exc:  # noqa: BLE001 - any tracer failure means "try the next one"
            detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
            attempts.append(DiscoveryAttempt(method, "failed", detail[:300]))
            logger.info("Dataflow discovery with %s failed: %s", method, detail)
            continue
        attempts.append(DiscoveryAttempt(method, "used"))
        return flow, attempts
    return None, attempts


def find_fold_pairs(model: nn.Module, example_inputs: object = None, *,
                    methods: Sequence[str] = DISCOVERY_METHODS) -> PairSearch:
    """Find every foldable BatchNorm of ``model`` and say why the others are not.

    Tries the dataflow builders in ``methods`` order and uses the first that succeeds: ``"fx"``
    needs no inputs; ``"export"`` and ``"hooks"`` need ``example_inputs``. ``example_inputs``
    also let a Linear layer's output rank be checked when ``torch.fx`` found the graph.

    Args:
        model: The model; it is not modified, nor run, nor traced (every builder works on a
            copy).
        example_inputs: A tensor, or a tuple of positional forward arguments, or ``None``.
        methods: Builders to try, a subset of :data:`DISCOVERY_METHODS`, in order.

    Returns:
        The pairs, the skipped BatchNorms with reasons, and the attempts.

    Raises:
        InvalidInputError: ``methods`` is empty or names an unknown builder.
    """
    methods = tuple(methods)
    unknown = [m for m in methods if m not in DISCOVERY_METHODS]
    if unknown or not methods:
        raise InvalidInputError(format_message(
            "Unknown dataflow discovery method", where="methods", got=list(methods),
            expected=f"a non-empty sequence drawn from {list(DISCOVERY_METHODS)}",
            hint="use the default ('fx', 'export', 'hooks') unless you need to force one"))
    args = as_forward_args(example_inputs)
    flow, attempts = discover_dataflow(model, args, methods)
    analysis = _Analysis(model, flow, args, attempts)
    pairs, skipped = analysis.run()
    return PairSearch(pairs=tuple(pairs), skipped=skipped, attempts=tuple(attempts),
                      method=None if flow is None else flow.method)


def _padded_with_zeros(conv: nn.Module) -> bool:
    """True when ``conv`` pads its input with zeros by a non-zero amount."""
    amounts: Any = getattr(conv, "_reversed_padding_repeated_twice", None)
    if amounts is None:
        padding = conv.padding
        amounts = () if isinstance(padding, str) and padding == "valid" else padding
    return conv.padding_mode == "zeros" and any(int(p) != 0 for p in amounts)


#: Methods whose override means a subclass may compute something else than its base class.
_BEHAVIOUR = ("forward", "_conv_forward", "__call__", "_call_impl", "__getattr__",
              "__getattribute__", "_output_padding")


def target_base(module: nn.Module) -> type | None:
    """The foldable torch class ``module`` behaves as, or ``None``.

    That is the class itself when it is one of torch's convolutions or ``nn.Linear``, or that
    class when ``type(module)`` subclasses it without overriding how it computes (transformers'
    ``EfficientNetDepthwiseConv2d`` only changes ``__init__``).
    """
    cls = type(module)
    if cls in _TARGETS:
        return cls
    base = next((c for c in cls.__mro__ if c in _TARGETS), None)
    if base is None:
        return None
    for name in _BEHAVIOUR:
        if getattr(cls, name, None) is not getattr(base, name, None):
            return None
    for klass in cls.__mro__[:cls.__mro__.index(base)]:
        if "weight" in vars(klass) or "bias" in vars(klass):  # a property computing them
            return None
    return base


def global_hooks_reason() -> str | None:
    """Why no BatchNorm can be folded while global module hooks are registered, or ``None``."""
    registries = nn.modules.module
    count = sum(len(getattr(registries, name, {})) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks"))
    if count:
        return (f"{count} global module forward hook(s) are registered "
                "(torch.nn.modules.module.register_module_forward_hook and friends); they see "
                "every module, and would see different modules and tensors once the BatchNorm is "
                "folded; remove them first")
    return None


def channels_out(module: nn.Module) -> int:
    """Output channels of a convolution (plain or transposed) or features of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.out_features
    return _fold_target(module).out_channels


def _channels_in(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return _fold_target(module).in_channels


def _fold_target(module: nn.Module) -> nn.modules.conv._ConvNd:
    """A fold target that is not nn.Linear: every other class in _TARGETS is a convolution."""
    if not isinstance(module, nn.modules.conv._ConvNd):  # target_base admits no other class
        raise FusionError(f"{type(module).__qualname__} is neither a convolution nor nn.Linear")
    return module


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    try:
        return str(tensor.device), tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta or wrapper tensors have no storage
        return None


class _Analysis:
    """Checks every BatchNorm of one model against one dataflow graph."""

    def __init__(self, model: nn.Module, flow: Dataflow | None, args: tuple[object, ...] | None,
                 attempts: list[DiscoveryAttempt]) -> None:
        self.model = model
        self.has_graph = flow is not None
        self.flow = flow if flow is not None else Dataflow("none")
        self.args = args
        self.attempts = attempts
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self.canonical: dict[int, str] = {id(m): name for name, m in self.modules.items()}
        self.calls: dict[str, list[FlowNode]] = {}
        for label, nodes in self.flow.module_calls().items():
            self.calls.setdefault(self._canonical(label), []).extend(nodes)
        self._ranks: dict[str, tuple[tuple[int, ...] | None, int | None]] | None = None
        owners: dict[int, dict[int, str]] = {}  # parameter -> owning module -> its name
        for name, module in model.named_modules():
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), {})[id(module)] = name
        self.param_owners = owners
        storages: dict[tuple[str, int], set[str]] = {}  # (device, storage pointer) -> tensors
        for name, tensor in [*model.named_parameters(remove_duplicate=True),
                             *model.named_buffers(remove_duplicate=True)]:
            key = _storage_key(tensor)
            if key is not None:
                storages.setdefault(key, set()).add(name)
        self.storages = storages
        self.global_hooks = global_hooks_reason()

    def _canonical(self, label: str) -> str:
        try:
            return self.canonical.get(id(self.model.get_submodule(label)), label)
        except AttributeError:
            return label

    # -- ranks -------------------------------------------------------------------------------

    def ranks(self, node: FlowNode) -> tuple[tuple[int, ...] | None, int | None]:
        """``(input ranks, output rank)`` of a module call, running the model once if needed."""
        if node.input_ndims is not None or node.output_ndim is not None:
            return node.input_ndims, node.output_ndim
        if self._ranks is None:
            self._ranks = {}
            if self.args is not None:
                try:
                    shapes = build_dataflow(self.model, "hooks", self.args)
                except Exception as exc:  # noqa: BLE001 - ranks stay unknown; pairs are refused
                    logger.info("could not run the model to read tensor ranks: %s", exc)
                else:
                    for label, nodes in shapes.module_calls().items():
                        if len(nodes) == 1:
                            self._ranks[self._canonical(label)] = (nodes[0].input_ndims,
                                                                  nodes[0].output_ndim)
        return self._ranks.get(self._canonical(node.label), (None, None))

    # -- checks ------------------------------------------------------------------------------

    def _batchnorm_channels(self, bn_name: str) -> int:
        mean = module_tensor(self.modules[bn_name], "running_mean")
        if mean is None:  # run() pairs only BatchNorms that static_skip_reason accepts
            raise FusionError(f"'{bn_name}' has no running statistics to pair")
        return mean.numel()

    def _layer_reason(self, name: str) -> str | None:
        """Why layer ``name`` cannot absorb a BatchNorm, whatever the dataflow, or ``None``."""
        module = self.modules[name]
        if target_base(module) is None:
            return (f"'{name}' is a {type(module).__module__}.{type(module).__qualname__}, which "
                    "overrides how nn.Conv*, nn.ConvTranspose* or nn.Linear compute, so its "
                    "forward may transform its weights")
        weight = module.weight
        if isinstance(weight, nn.parameter.UninitializedParameter) or not isinstance(
                weight, torch.Tensor) or not weight.is_floating_point():
            return f"'{name}' has no initialised floating-point weight"
        for param in (weight, module_tensor(module, "bias")):
            if param is None:
                continue
            owners = self.param_owners.get(id(param), {})
            others = sorted(n for key, n in owners.items() if key != id(module))
            if others:
                return (f"the parameters of '{name}' are shared with {others}, which would "
                        "change too")
        own = {f"{name}.{attr}" if name else attr for attr, _ in module.named_parameters(
            recurse=False)} | {f"{name}.{attr}" if name else attr
                               for attr, _ in module.named_buffers(recurse=False)}
        for param in (weight, module_tensor(module, "bias")):
            key = None if param is None else _storage_key(param)
            sharing = sorted(self.storages.get(key, set()) - own) if key else []
            if sharing:
                return (f"the weights of '{name}' share storage with {sharing[:3]}, which would "
                        "change too (or stop matching them)")
        reads = self.flow.outside_reads.get(name)
        if reads:
            return (f"forward also reads {', '.join(repr(name + '.' + r) for r in reads)} "
                    f"outside '{name}' itself (e.g. F.conv2d(x, self.conv.weight)), and that "
                    "code would see the folded weights")
        if module._forward_hooks or module._forward_pre_hooks:
            return (f"'{name}' has forward hooks registered, which would see different tensors "
                    "after folding; remove the hooks first")
        runs = len(self.calls.get(name, []))
        if runs != 1:
            return (f"'{name}' runs {runs} times per forward (a module used at several call sites "
                    "shares one set of weights, so folding would change its other calls)")
        return None

    def _readers(self, node: FlowNode, expected: int) -> str | None:
        """Why ``node``'s output has readers other than ``expected``; ``None`` if it has not."""
        others = [u for u in node.users if u != expected]
        if others:
            names = ", ".join(self.flow.describe(u) for u in others[:3])
            return (f"the output of {self.flow.describe(node.index)} is also read by {names}, "
                    "which would see the folded values")
        return None

    def _preceding(self, bn_name: str, bn_node: FlowNode) -> tuple[tuple[str, ...] | None, str]:
        """The layer(s) before the BatchNorm that can absorb it, or the reason none can."""
        sources = list(dict.fromkeys(bn_node.inputs))
        if len(sources) != 1:
            return None, f"it reads {len(sources)} tensors"
        source = self.flow.nodes[sources[0]]
        channels = self._batchnorm_channels(bn_name)
        if source.kind == "module":
            reason = self._producer_reason(source, bn_node.index, channels)
            return (None, reason) if reason else ((self._canonical(source.label),), "")
        if source.kind == "cat":
            return self._concatenation(bn_name, bn_node, source, channels)
        return None, (f"its input comes from {self.flow.describe(source.index)}, not from a "
                      "convolution or Linear layer")

    def _producer_reason(self, node: FlowNode, consumer: int, channels: int) -> str | None:
        name = self._canonical(node.label)
        if name not in self.modules or not isinstance(self.modules[name], _TARGETS):
            return f"its input comes from '{name}', which is not a convolution or Linear layer"
        reason = self._layer_reason(name) or self._readers(node, consumer)
        if reason:
            return reason
        layer = self.modules[name]
        if channels_out(layer) != channels:
            return f"'{name}' has {channels_out(layer)} output channels, the BatchNorm {channels}"
        if isinstance(layer, nn.Linear):
            _, out_rank = self.ranks(node)
            if out_rank is None:
                return (f"'{name}' is a Linear layer and the rank of its output is unknown; pass "
                        "example_inputs so bnsurgery can check it is 2-D (a Linear layer writes "
                        "the last axis, BatchNorm normalises axis 1)")
            if out_rank != 2:
                return (f"'{name}' is a Linear layer whose output has {out_rank} dimensions: it "
                        "writes the last axis while BatchNorm normalises axis 1, so folding "
                        "would scale the wrong axis")
        return None

    def _concatenation(self, bn_name: str, bn_node: FlowNode, cat: FlowNode, channels: int
                       ) -> tuple[tuple[str, ...] | None, str]:
        rank = (bn_node.input_ndims or (None,))[0] or batchnorm_input_rank(
            self.modules[bn_name])
        dim = cat.cat_dim
        if dim is None or not (dim == 1 or (rank is not None and dim + rank == 1)):
            return None, (f"its input is a concatenation along dim {dim}, not along the channel "
                          "axis")
        if len(cat.inputs) != len(set(cat.inputs)):
            return None, "its input concatenates the same tensor more than once"
        reason = self._readers(cat, bn_node.index)
        if reason:
            return None, reason
        targets, total = [], 0
        for index in cat.inputs:
            part = self.flow.nodes[index]
            if part.kind != "module":
                return None, (f"its input concatenates {self.flow.describe(index)}, which is not "
                              "the output of a convolution or Linear layer")
            name = self._canonical(part.label)
            layer = self.modules.get(name)
            if layer is None or not isinstance(layer, _TARGETS):
                return None, f"its input concatenates '{name}', not a convolution or Linear layer"
            reason = self._producer_reason(part, cat.index, channels_out(layer))
            if reason:
                return None, f"its input concatenates several layers and {reason}"
            targets.append(name)
            total += channels_out(layer)
        if total != channels:
            return None, (f"the concatenated layers have {total} channels, the BatchNorm "
                          f"{channels}")
        return tuple(targets), ""

    def _following(self, bn_name: str, bn_node: FlowNode) -> tuple[str | None, str]:
        """The single layer after the BatchNorm that can absorb it, or the reason none can."""
        if len(bn_node.users) != 1:
            readers = ", ".join(self.flow.describe(u) for u in bn_node.users[:3]) or "nothing"
            return None, f"its output is read by {readers}, not by one layer alone"
        reader = self.flow.nodes[bn_node.users[0]]
        name = self._canonical(reader.label)
        if reader.kind != "module" or not isinstance(self.modules.get(name), _TARGETS):
            return None, (f"it feeds {self.flow.describe(reader.index)}, not a convolution or "
                          "Linear layer")
        if list(dict.fromkeys(reader.inputs)) != [bn_node.index]:
            return None, f"'{name}' also reads other tensors"
        reason = self._layer_reason(name)
        if reason:
            return None, reason
        layer = self.modules[name]
        channels = self._batchnorm_channels(bn_name)
        if _channels_in(layer) != channels:
            return None, (f"'{name}' has {_channels_in(layer)} input channels, the BatchNorm "
                          f"{channels}")
        if isinstance(layer, _CONVS) and _padded_with_zeros(layer):
            return None, (f"it feeds '{name}', which pads with zeros: the padded zeros never went "
                          "through the BatchNorm, so folding into it would not be exact")
        if isinstance(layer, TRANSPOSED_CONVS) and (
                any(k != 1 for k in layer.kernel_size) or any(s != 1 for s in layer.stride)
                or any(p != 0 for p in layer.output_padding)):
            return None, (f"it feeds the transposed convolution '{name}', whose output borders "
                          "and stride gaps receive fewer input taps, so folding into it would "
                          "not be exact (only 1x1, stride 1 is)")
        if isinstance(layer, nn.Linear):
            in_ranks, _ = self.ranks(bn_node)
            rank = in_ranks[0] if in_ranks else None
            if rank is None:
                return None, (f"it feeds the Linear layer '{name}' and the rank of its input is "
                              "unknown; pass example_inputs so bnsurgery can check it is 2-D")
            if rank != 2:
                return None, (f"it feeds the Linear layer '{name}' on a {rank}-D tensor: the "
                              "Linear layer reads the last axis while BatchNorm normalises "
                              "axis 1")
        return name, ""

    # -- driver ------------------------------------------------------------------------------

    def _no_graph_reason(self) -> str:
        tried = "; ".join(f"{a.method} {a.status}" + (f" ({a.detail})" if a.detail else "")
                          for a in self.attempts)
        hint = ("" if self.args is not None
                else "; pass example_inputs to try torch.export and a forward run")
        return f"bnsurgery could not find the model's dataflow ({tried}){hint}"

    def run(self) -> tuple[list[FoldPair], dict[str, str]]:
        pairs: list[FoldPair] = []
        skipped: dict[str, str] = {}
        for name, module in self.modules.items():
            if not name or not looks_like_batchnorm(module):
                continue
            reason = static_skip_reason(module) or self.global_hooks
            if reason is None and not self.has_graph:
                reason = self._no_graph_reason()
            reads = self.flow.outside_reads.get(name)
            if reason is None and reads:
                reason = (f"forward reads {', '.join(repr(name + '.' + r) for r in reads)} "
                          "outside the BatchNorm's own call; once folded that state is gone, "
                          "so the code reading it would fail or compute something else")
            if reason is not None:
                skipped[name] = reason
                continue
            calls = self.calls.get(name, [])
            if not calls:
                where = ("on the example inputs (a forward run only sees the path its inputs "
                         "take)" if self.flow.method == "hooks" else "in forward")
                skipped[name] = f"it is never called {where}"
                continue
            if len(calls) > 1:
                skipped[name] = (f"it runs {len(calls)} times per forward; one set of folded "
                                 "weights cannot serve every call")
                continue
            found = self._match(name, calls[0])
            if isinstance(found, str):
                skipped[name] = found
            else:
                pairs.append(found)
        return pairs, skipped

    def _match(self, name: str, node: FlowNode) -> FoldPair | str:
        targets, before_reason = self._preceding(name, node)
        if targets is not None:
            return FoldPair(name, targets, "preceding", self.flow.method)
        kind = batchnorm_kind(self.modules[name])
        if kind is not None and kind.keeps:
            return (f"it folds only into the layer before it, and cannot ({before_reason}); it "
                    f"applies {' and '.join(kind.keeps)} after normalising, and the layer after "
                    "it reads the activation's output, not the normalised tensor")
        target, after_reason = self._following(name, node)
        if target is not None:
            return FoldPair(name, (target,), "following", self.flow.method)
        return (f"it folds neither into the layer before it ({before_reason}) nor into the one "
                f"after it ({after_reason})")

