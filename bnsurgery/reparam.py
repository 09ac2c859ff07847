"""Structural re-parameterisation: merge parallel conv+BatchNorm branches into one convolution.

RepVGG, MobileOne, RepGhost, ACNet and many in-house nets train blocks such as
``bn_a(conv_3x3(x)) + bn_b(conv_1x1(x)) + bn_id(x)`` and deploy them as one 3x3 convolution. In
eval mode every branch is affine in ``x``, so the sum is one convolution whose kernel is the sum
of the branches' BatchNorm-scaled kernels (smaller kernels zero-padded to the largest, a bare
BatchNorm being a conv with an identity kernel) and whose bias is the sum of their biases.

:func:`plan_reparameterization` finds the sums from the model's real dataflow (the
``torch.fx`` -> ``torch.export`` -> hooks chain of :mod:`bnsurgery._dataflow`) and explains every
sum it will not merge; :func:`reparameterize_branches` applies the plan. The module whose forward
computes a merged sum (the *block*) keeps its instance, name, attributes and methods; its
``forward`` is replaced by the traced eval-mode forward in which the whole sum is one call of the
largest branch conv (its class becomes a subclass of the original class, so ``isinstance`` still
holds; blocks of one class with the same traced forward share one such class). The other branch
modules become ``nn.Identity``. Weights are summed in float64 and rounded once. A merged model
pickles, deep-copies and saves whole with ``torch.save``: a block is stored as its original class,
its forward's source and the globals that source names, and rebuilt from them.

This is a function of its own rather than an option of ``fuse_batchnorm``: it rewrites a block's
forward (folding only swaps modules), it has its own report (blocks and unmerged sums, not
BatchNorm pairs), and a model is typically re-parameterised first and then fused.
"""

from __future__ import annotations

import copy
import importlib
import logging
import numbers
import operator
import textwrap
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

import torch
from torch import nn
from torch.fx.node import Argument

from bnsurgery._bn_registry import batchnorm_kind, looks_like_batchnorm, static_skip_reason
from bnsurgery._dataflow import Dataflow, FlowNode, is_leaf_of_interest
from bnsurgery.errors import InvalidInputError, NumericMismatchError, format_message
from bnsurgery.fold import batchnorm_scale_shift, fold_batchnorm_after
from bnsurgery.pairs import (
    DISCOVERY_METHODS,
    DiscoveryAttempt,
    as_forward_args,
    discover_dataflow,
)
from bnsurgery.results import JsonResult
from bnsurgery.tensors import module_tensor

__all__ = [
    "BranchRecord",
    "MergedBlock",
    "ReparamPlan",
    "UnmergedSum",
    "merge_branch_kernels",
    "plan_reparameterization",
    "reparameterize_branches",
]

logger = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ConvNd = nn.modules.conv._ConvNd
_F64 = torch.float64

# Labels the dataflow builders give a tensor addition / a multiplication.
_ADD_LABELS = frozenset({
    "operator.add", "operator.iadd", "torch.add", "the tensor method .add()",
    "the tensor method .add_()", "aten.add.Tensor", "aten.add_.Tensor", "torch.__add__",
    "torch.__iadd__", "torch.__radd__", "torch.add_"})
_MUL_LABELS = frozenset({
    "operator.mul", "operator.imul", "torch.mul", "the tensor method .mul()", "aten.mul.Tensor",
    "aten.mul_.Tensor", "torch.__mul__", "torch.__imul__", "torch.__rmul__"})
_FX_ADDS = (operator.add, operator.iadd, torch.add)
_FX_MULS = (operator.mul, operator.imul, torch.mul)


@dataclass(frozen=True)
class BranchRecord(JsonResult):
    """One branch of a merged sum.

    Attributes:
        kind: ``"conv+batchnorm"``, ``"conv"`` or ``"batchnorm"`` (the identity branch).
        conv: Qualified name of the branch's convolution, or ``None``.
        batchnorm: Qualified name of its BatchNorm, or ``None``.
        kernel_size: The branch's kernel (``1`` per axis for the identity branch).
        scale: A constant factor the branch is multiplied by in the sum.
    """

    kind: str
    conv: str | None
    batchnorm: str | None
    kernel_size: tuple[int, ...]
    scale: float = 1.0


@dataclass(frozen=True)
class MergedBlock(JsonResult):
    """A sum of branches that becomes one convolution.

    Attributes:
        block: Qualified name of the module whose forward computes the sum (``""``: the model).
        conv: The convolution that holds the merged kernel (the branch conv with the largest one).
        branches: Every branch, in the order they are summed.
        constant: A constant added to the sum (folded into the bias; usually 0).
        method: The dataflow builder whose graph found the sum.
    """

    block: str
    conv: str
    branches: tuple[BranchRecord, ...]
    constant: float = 0.0
    method: str = "fx"


@dataclass(frozen=True)
class UnmergedSum(JsonResult):
    """A sum of tensors that is not merged, and why.

    Attributes:
        terms: What is summed, in plain words (module names where there are modules).
        reason: Why it stays as it is.
    """

    terms: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class ReparamPlan(JsonResult):
    """What :func:`reparameterize_branches` merges and why it leaves the other sums.

    Attributes:
        merged: One record per sum that becomes a single convolution.
        not_merged: Every other sum the dataflow holds, with its reason.
        attempts: The dataflow builders tried, in order.
        method: The builder whose graph was used, or ``None`` when none worked.
    """

    merged: tuple[MergedBlock, ...]
    not_merged: tuple[UnmergedSum, ...] = ()
    attempts: tuple[DiscoveryAttempt, ...] = ()
    method: str | None = None

    def __str__(self) -> str:
        total = len(self.merged) + len(self.not_merged)
        lines = [f"Re-parameterisation plan: {len(self.merged)} of {total} sums merged into one "
                 f"conv (dataflow from {self.method or 'no dataflow graph'})"]
        for block in self.merged:
            parts = ", ".join(
                (f"{b.scale:g}*" if b.scale != 1.0 else "")
                + f"{b.kind}[{'x'.join(map(str, b.kernel_size))}]"
                f"({'/'.join(n for n in (b.conv, b.batchnorm) if n)})" for b in block.branches)
            lines.append(f"  {block.block or '<model>'} -> {block.conv}: {parts}")
        if self.not_merged:
            lines.append("not merged:")
            for item in self.not_merged:
                lines.append(textwrap.fill(f"{' + '.join(item.terms)}: {item.reason}", width=100,
                                           initial_indent="  ", subsequent_indent="      "))
        return "\n".join(lines)


# --- pure tensor maths --------------------------------------------------------------------------

def merge_branch_kernels(kernels: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                         offsets: Sequence[Sequence[int]], kernel_size: Sequence[int], *,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum branch kernels into one, each placed at its offset inside the largest kernel.

    Args:
        kernels: Float64 kernels ``(out, in/groups, *k_i)`` (BatchNorm already folded in).
        biases: Float64 biases ``(out,)``.
        offsets: Per kernel, where its first tap sits in the merged kernel, per spatial axis.
        kernel_size: The merged kernel's spatial size.
        dtype: The dtype to round the result to (once).

    Returns:
        ``(weight, bias)`` rounded to ``dtype``.

    Raises:
        InvalidInputError: A kernel does not fit at its offset.
    """
    out_channels, in_per_group = kernels[0].shape[:2]
    total = torch.zeros((out_channels, in_per_group, *kernel_size), dtype=_F64,
                        device=kernels[0].device)
    for kernel, offset in zip(kernels, offsets, strict=True):
        spatial = kernel.shape[2:]
        if any(o < 0 or o + k > size for o, k, size in zip(offset, spatial, kernel_size,
                                                            strict=True)):
            raise InvalidInputError(format_message(
                "A branch kernel does not fit inside the merged kernel", where="kernels",
                got=f"kernel {tuple(spatial)} at offset {tuple(offset)}",
                expected=f"inside {tuple(kernel_size)}", hint="pass offsets that centre it"))
        window = tuple(slice(o, o + k) for o, k in zip(offset, spatial, strict=True))
        index = (slice(None), slice(None), *window)
        total[index] += kernel.to(_F64)
    bias = torch.stack([b.to(_F64) for b in biases]).sum(0)
    return total.to(dtype), bias.to(dtype)


def _identity_kernel(channels: int, groups: int, spatial: tuple[int, ...], centre: tuple[int, ...],
                     device: torch.device) -> torch.Tensor:
    """The float64 kernel of ``x -> x`` for a conv with ``groups`` (one tap of 1 per channel)."""
    per_group = channels // groups
    kernel = torch.zeros((channels, per_group, *spatial), dtype=_F64, device=device)
    for channel in range(channels):
        index = (channel, channel % per_group, *centre)
        kernel[index] = 1.0
    return kernel


# --- discovery on the dataflow ----------------------------------------------------------------

@dataclass
class _Branch:
    kind: str
    conv: str | None
    batchnorm: str | None
    source: int
    end: str


@dataclass
class _Candidate:
    terms: list[str]
    branches: list[_Branch] = field(default_factory=list)
    reason: str | None = None


def _padding_pairs(conv: _ConvNd) -> list[tuple[int, int]] | None:
    """``(before, after)`` zero padding per spatial axis, first axis first; ``None`` if unknown."""
    amounts = getattr(conv, "_reversed_padding_repeated_twice", None)
    dims = len(conv.kernel_size)
    if amounts is None:
        padding = conv.padding
        if isinstance(padding, str):
            return [(0, 0)] * dims if padding == "valid" else None
        return [(int(p), int(p)) for p in padding]
    amounts = [int(a) for a in amounts]  # last axis first, (before, after) each
    pairs = [(amounts[2 * i], amounts[2 * i + 1]) for i in range(dims)]
    return pairs[::-1]


class _Planner:
    def __init__(self, model: nn.Module, flow: Dataflow) -> None:
        self.model = model
        self.flow = flow
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        # Branch convs are looked up here: every name a _Branch gives as its conv is one.
        self.convs = {name: module for name, module in self.modules.items()
                      if isinstance(module, _ConvNd)}
        self.calls = flow.module_calls()
        counts: dict[int, int] = {}
        for module in self.modules.values():
            for parameter in module.parameters(recurse=False):
                counts[id(parameter)] = counts.get(id(parameter), 0) + 1
        self.shared = {pid for pid, n in counts.items() if n > 1}

    # Pass-through nodes: nn.Identity calls (fx records them as ops).
    def _is_identity(self, node: FlowNode) -> bool:
        if node.kind != "op" or not node.label.startswith("Identity '"):
            return False
        return type(self.modules.get(node.label[len("Identity '"):-1])) is nn.Identity

    def back(self, index: int) -> int:
        node = self.flow.nodes[index]
        while self._is_identity(node) and len(node.inputs) == 1:
            node = self.flow.nodes[node.inputs[0]]
        return node.index

    def readers(self, index: int) -> list[int]:
        out: list[int] = []
        for user in self.flow.nodes[index].users:
            if self._is_identity(self.flow.nodes[user]):
                out.extend(self.readers(user))
            else:
                out.append(user)
        return out

    def _is_add(self, node: FlowNode) -> bool:
        return node.kind == "op" and node.label in _ADD_LABELS

    def _is_scale(self, node: FlowNode) -> bool:
        return node.kind == "op" and node.label in _MUL_LABELS and len(node.inputs) == 1

    def _absorbed(self, node: FlowNode) -> bool:
        users = self.readers(node.index)
        return len(users) == 1 and self._is_add(self.flow.nodes[users[0]])

    def candidates(self) -> list[_Candidate]:
        """Every maximal sum; where one cannot merge, its inner sums are tried on their own."""
        found: list[_Candidate] = []
        for node in self.flow.nodes:
            if self._is_add(node) and not self._absorbed(node):
                self._collect(node, found)
        return found

    def _collect(self, node: FlowNode, found: list[_Candidate]) -> None:
        candidate = self._candidate(node)
        found.append(candidate)
        if candidate.reason is None:
            return
        for producer in node.inputs:
            inner = self.flow.nodes[self.back(producer)]
            if self._is_add(inner) and self._absorbed(inner):
                self._collect(inner, found)

    def _terms(self, node: FlowNode) -> list[int]:
        terms: list[int] = []
        for producer in node.inputs:
            producer = self.back(producer)
            inner = self.flow.nodes[producer]
            if self._is_add(inner) and self._absorbed(inner):
                terms.extend(self._terms(inner))
            else:
                terms.append(producer)
        return terms

    def _candidate(self, node: FlowNode) -> _Candidate:
        terms = self._terms(node)
        for i, term in enumerate(terms):
            inner = self.flow.nodes[term]
            if self._is_scale(inner) and len(self.readers(inner.inputs[0])) == 1:
                terms[i] = self.back(inner.inputs[0])  # the factor is read from the block graph
        words = [self.flow.describe(t) for t in terms]
        candidate = _Candidate(terms=words)
        options: list[list[_Branch]] = []
        for term in terms:
            opts = self._interpretations(term)
            if isinstance(opts, str):
                candidate.reason = f"{self.flow.describe(term)} {opts}"
                return candidate
            options.append(opts)
        sources = set.intersection(*({b.source for b in opts} for opts in options))
        if not sources:
            candidate.reason = "the branches do not read the same tensor"
            return candidate
        source = max(sources, key=lambda s: (sum(b.conv is not None for opts in options
                                                 for b in opts if b.source == s), -s))
        candidate.branches = [next(b for b in opts if b.source == source) for opts in options]
        candidate.reason = self._check(candidate.branches)
        return candidate

    def _once(self, name: str) -> str | None:
        count = len(self.calls.get(name, []))
        if count != 1:
            return (f"'{name}' runs {count} times per forward; its weights cannot be merged for "
                    "one call only")
        return None

    def _interpretations(self, index: int) -> list[_Branch] | str:
        node = self.flow.nodes[index]
        if node.kind != "module":
            return "is not a convolution, a convolution+BatchNorm or a BatchNorm"
        module = self.modules[node.label]
        if len(self.readers(index)) != 1:
            return "is also read outside the sum"
        if not node.inputs:
            return "has no tensor input in the dataflow"
        producer = self.back(node.inputs[0])
        if isinstance(module, nn.modules.conv._ConvNd):
            return [_Branch("conv", node.label, None, producer, node.label)]
        if not looks_like_batchnorm(module):
            return "is not a convolution, a convolution+BatchNorm or a BatchNorm"
        options = [_Branch("batchnorm", None, node.label, producer, node.label)]
        inner = self.flow.nodes[producer]
        if (inner.kind == "module" and isinstance(self.modules[inner.label],
                                                   nn.modules.conv._ConvNd)
                and len(self.readers(producer)) == 1 and inner.inputs):
            options.insert(0, _Branch("conv+batchnorm", inner.label, node.label,
                                      self.back(inner.inputs[0]), node.label))
        return options

    def _check(self, branches: list[_Branch]) -> str | None:
        convs = [self.convs[b.conv] for b in branches if b.conv]
        if not convs:
            return "no branch has a convolution to merge into"
        outside = getattr(self.flow, "outside_reads", {})
        for branch in branches:
            for name in (branch.conv, branch.batchnorm):
                if name is not None and (problem := self._once(name)):
                    return problem
                if name is not None and outside.get(name):
                    return (f"the forward also reads {', '.join(outside[name])} of '{name}' "
                            "outside its call")
            if branch.conv:
                conv = self.convs[branch.conv]
                if type(conv) not in _CONVS:
                    return (f"'{branch.conv}' is a {type(conv).__qualname__}, not exactly "
                            "nn.Conv1d/2d/3d (a subclass may change its weights in forward)")
                if conv.padding_mode != "zeros" and any(p != (0, 0) for p in
                                                        _padding_pairs(conv) or []):
                    return f"'{branch.conv}' pads with {conv.padding_mode!r}, not zeros"
                if any(id(p) in self.shared for p in conv.parameters(recurse=False)):
                    return f"'{branch.conv}' shares its parameters with another module"
                if conv._forward_hooks or conv._forward_pre_hooks:
                    return f"'{branch.conv}' has forward hooks"
            if branch.batchnorm:
                bn = self.modules[branch.batchnorm]
                reason = static_skip_reason(bn)
                if reason:
                    return f"'{branch.batchnorm}' cannot be folded: {reason}"
                kind = batchnorm_kind(bn)
                for child in (kind.keeps if kind else ()):
                    kept = getattr(bn, child, None)
                    if kept is not None and type(kept) is not nn.Identity:
                        return (f"a branch with a nonlinearity: '{branch.batchnorm}' applies "
                                f"{type(kept).__qualname__} after normalising")
        first = convs[0]
        for conv in convs[1:]:
            for attribute in ("in_channels", "out_channels", "stride", "dilation", "groups"):
                if getattr(conv, attribute) != getattr(first, attribute):
                    return (f"different {attribute.replace('_', ' ')}: "
                            f"{getattr(first, attribute)} vs {getattr(conv, attribute)}")
            if type(conv) is not type(first):
                return "branches of different dimensionality"
        if any(_padding_pairs(c) is None for c in convs):
            return "a conv's padding cannot be resolved"
        kernel = tuple(max(c.kernel_size[d] for c in convs) for d in range(len(first.kernel_size)))
        if not any(tuple(c.kernel_size) == kernel for c in convs):
            return f"no branch has the largest kernel {kernel} in every axis"
        largest = next(c for c in convs if tuple(c.kernel_size) == kernel)
        for conv in convs:
            if _offsets(conv, largest) is None:
                return (f"a non-centred padding: a {tuple(conv.kernel_size)} kernel with padding "
                        f"{_padding_pairs(conv)} does not line up inside the "
                        f"{kernel} kernel with padding {_padding_pairs(largest)}")
        for branch in branches:
            if branch.batchnorm is None:
                continue
            # static_skip_reason above made sure every branch BatchNorm has its statistics.
            mean = module_tensor(self.modules[branch.batchnorm], "running_mean")
            channels = mean.numel() if mean is not None else None
            if branch.kind == "batchnorm":
                bn = self.modules[branch.batchnorm]
                if first.in_channels != first.out_channels:
                    return ("an identity branch needs in_channels == out_channels, got "
                            f"{first.in_channels} and {first.out_channels}")
                if getattr(bn, "num_features", channels) != first.out_channels:
                    return f"'{branch.batchnorm}' has a channel count different from the convs"
                if _identity_centre(largest) is None:
                    return ("an identity branch needs stride 1 and a kernel whose padding keeps "
                            "the spatial size")
            elif branch.kind == "conv+batchnorm" and channels != first.out_channels:
                return f"'{branch.batchnorm}' has a channel count different from the convs"
        return None


def _offsets(conv: _ConvNd, largest: _ConvNd) -> tuple[int, ...] | None:
    """Where ``conv``'s first tap sits inside ``largest``'s kernel so both compute the same
    output positions (``None`` when no placement does, or a padding is unknown)."""
    pads, big_pads = _padding_pairs(conv), _padding_pairs(largest)
    if pads is None or big_pads is None:
        return None
    offsets = []
    for axis, dilation in enumerate(conv.dilation):
        (before, after), (big_before, big_after) = pads[axis], big_pads[axis]
        lead, trail = big_before - before, big_after - after
        if lead < 0 or trail < 0 or lead % dilation or trail % dilation:
            return None
        span = lead // dilation + conv.kernel_size[axis] + trail // dilation
        if span != largest.kernel_size[axis]:
            return None
        offsets.append(lead // dilation)
    return tuple(offsets)


def _identity_centre(conv: _ConvNd) -> tuple[int, ...] | None:
    """The tap of ``conv``'s kernel that reads output position ``o`` at input position ``o``."""
    pads = _padding_pairs(conv)
    if pads is None or any(s != 1 for s in conv.stride):
        return None
    centre = []
    for axis, (before, after) in enumerate(pads):
        dilation, size = conv.dilation[axis], conv.kernel_size[axis]
        if before % dilation or before + after != dilation * (size - 1):
            return None
        centre.append(before // dilation)
    return tuple(centre)


# --- the block graph: exact check and rewrite ---------------------------------------------------

class _BlockTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf_of_interest(m) or super().is_leaf_module(m, module_qualified_name)


def _relative(name: str, block: str) -> str:
    return name[len(block) + 1:] if block else name


def _owner_candidates(names: Sequence[str]) -> list[str]:
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for pieces in zip(*parts):  # noqa: B905 - stops at the shortest name on purpose
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return [".".join(common[:i]) for i in range(len(common), -1, -1)]


@dataclass
class _BlockMatch:
    root: torch.fx.Node
    source: torch.fx.Node
    scales: dict[str, float]
    constant: float


class _GraphSum:
    """Reads the sum of a block's branches out of its traced graph.

    Holds what the steps share: which nodes end a branch, the predicates over graph nodes, and
    the scale of each branch and the constant term that :meth:`walk` collects.
    """

    def __init__(self, block_module: nn.Module, ends: dict[torch.fx.Node, str]) -> None:
        self.block_module = block_module
        self.ends = ends
        self.scales: dict[str, float] = {}
        self.constant = 0.0
        self.seen: set[torch.fx.Node] = set()

    def is_identity(self, node: torch.fx.Node) -> bool:
        return (node.op == "call_module"
                and type(self.block_module.get_submodule(str(node.target))) is nn.Identity)

    @staticmethod
    def is_add(node: torch.fx.Node) -> bool:
        return node.op == "call_function" and node.target in _FX_ADDS and not node.kwargs

    @staticmethod
    def is_scaling(node: torch.fx.Node) -> bool:
        return (node.op == "call_function" and node.target in _FX_MULS and not node.kwargs
                and len(node.args) == 2 and any(_is_number(a) for a in node.args))

    def chain(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """``node`` and the single-user additions, scalings and identities above it."""
        path = [node]
        while len(node.users) == 1:
            user = next(iter(node.users))
            if not (self.is_identity(user) or self.is_add(user) or self.is_scaling(user)):
                break
            node = user
            path.append(node)
        return path

    def root(self) -> torch.fx.Node | None:
        """The node of the whole sum: the lowest one every branch reaches, with the constant
        additions, scalings and identities above it taken in; ``None`` when there is none."""
        chains = [self.chain(node) for node in self.ends]
        common = set(chains[0]).intersection(*chains[1:])
        if not common:
            return None
        root = next(n for n in chains[0] if n in common)
        while len(root.users) == 1:
            user = next(iter(root.users))
            others = [a for a in user.args if a is not root]
            if self.is_identity(user) or self.is_scaling(user) or (
                    self.is_add(user) and len(user.args) == 2
                    and all(_is_number(a) for a in others)):
                root = user
            else:
                break
        return root

    def walk(self, node: Argument, factor: float) -> str | None:
        """Collect each branch's scale and the constant under ``node``; what else it adds."""
        if _is_number(node):
            self.constant += factor * float(node)
            return None
        if not isinstance(node, torch.fx.Node):
            return f"the sum adds {type(node).__name__} values"
        if node in self.ends:
            self.seen.add(node)
            self.scales[self.ends[node]] = factor
            return None
        if self.is_identity(node):
            return self.walk(node.args[0], factor)
        if self.is_add(node) and len(node.args) == 2:
            return self.walk(node.args[0], factor) or self.walk(node.args[1], factor)
        if node.op == "call_function" and node.target in _FX_MULS and len(node.args) == 2:
            left, right = node.args
            if _is_number(right):
                return self.walk(left, factor * float(right))
            if _is_number(left):
                return self.walk(right, factor * float(left))
            return "a branch is multiplied by a tensor, not a constant"
        return f"the sum also adds the result of {node.format_node()}"


def _match_in_graph(graph: torch.fx.Graph, block_module: nn.Module, block: str,
                    branches: list[_Branch]) -> _BlockMatch | str:
    """Find the sum of ``branches`` in the block's traced graph; check it is a plain sum.

    Returns:
        The match, or why the block is not a plain sum of its branches.
    """
    by_target = {str(n.target): n for n in graph.nodes if n.op == "call_module"}
    ends: dict[torch.fx.Node, str] = {}
    for branch in branches:
        node = by_target.get(_relative(branch.end, block))
        if node is None:
            return "its forward does not call the branch modules directly"
        ends[node] = branch.end
    graph_sum = _GraphSum(block_module, ends)
    root = graph_sum.root()
    if root is None:
        return "the branches are not summed in one expression"
    problem = graph_sum.walk(root, 1.0)
    if problem:
        return problem
    if graph_sum.seen != set(ends):
        return "the branches are not summed in one expression"
    source = _shared_source(graph_sum, by_target, block, branches)
    if source is None:
        return "the branches do not read the same tensor in the block's forward"
    return _BlockMatch(root=root, source=source, scales=graph_sum.scales,
                       constant=graph_sum.constant)


def _shared_source(graph_sum: _GraphSum, by_target: dict[str, torch.fx.Node], block: str,
                   branches: list[_Branch]) -> torch.fx.Node | None:
    """The one tensor every branch's first module reads (through identities), else ``None``."""
    inputs: set[Argument] = set()
    for branch in branches:
        first = branch.conv or branch.batchnorm
        node = by_target.get(_relative(first, block)) if first else None
        source = node.args[0] if node is not None and node.args else None
        while isinstance(source, torch.fx.Node) and graph_sum.is_identity(source):
            source = source.args[0]
        inputs.add(source)
    if len(inputs) != 1:
        return None
    source = inputs.pop()
    return source if isinstance(source, torch.fx.Node) else None


def _is_number(value: object) -> TypeGuard[numbers.Real]:
    """A real constant of a traced graph (a bool is a flag, not a number to sum or scale by)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _trace(block_module: nn.Module) -> torch.fx.Graph:
    return _BlockTracer().trace(block_module)


# --- planning -----------------------------------------------------------------------------------



def _kernel(planner: _Planner, branch: _Branch, dims: int) -> tuple[int, ...]:
    return tuple(planner.convs[branch.conv].kernel_size) if branch.conv else (1,) * dims


def plan_reparameterization(model: nn.Module, example_inputs: object = None, *,
                            methods: Sequence[str] = DISCOVERY_METHODS) -> ReparamPlan:
    """Find every sum of parallel conv/BatchNorm branches that merges into one conv.

    A sum merges when its terms all read the same tensor and each is a conv followed by a
    foldable BatchNorm (eval mode, known class, no activation), a bare BatchNorm (an identity
    kernel) or a conv alone, possibly times a constant; the convs share stride, dilation, groups
    and channel counts, and their paddings line the smaller kernels up inside the largest. Every
    module runs once per forward and no branch output is read elsewhere.

    Args:
        model: The model, in eval mode; never modified.
        example_inputs: A tensor or a tuple of positional forward arguments; needed when
            ``torch.fx`` cannot trace the model.
        methods: Dataflow builders to try, in order (see :func:`bnsurgery.find_fold_pairs`).

    Returns:
        The plan; ``print(plan)`` shows it.

    Raises:
        InvalidInputError: ``methods`` names an unknown builder.
    """
    methods = tuple(methods)
    if not methods or any(m not in DISCOVERY_METHODS for m in methods):
        raise InvalidInputError(format_message(
            "Unknown dataflow discovery method", where="methods", got=list(methods),
            expected=f"a non-empty sequence drawn from {list(DISCOVERY_METHODS)}",
            hint="use the default ('fx', 'export', 'hooks')"))
    flow, attempts = discover_dataflow(model, as_forward_args(example_inputs), methods)
    if flow is None:
        return ReparamPlan(merged=(), not_merged=(UnmergedSum(
            ("<model>",), "no dataflow graph could be built: "
            + "; ".join(f"{a.method}: {a.detail}" for a in attempts)),), attempts=tuple(attempts))
    planner = _Planner(model, flow)
    merged: list[MergedBlock] = []
    not_merged: list[UnmergedSum] = []
    traced: dict[str, torch.fx.Graph | str] = {}
    for candidate in planner.candidates():
        if candidate.reason:
            not_merged.append(UnmergedSum(tuple(candidate.terms), candidate.reason))
            continue
        names = [n for b in candidate.branches for n in (b.conv, b.batchnorm) if n]
        result: MergedBlock | str = "no enclosing module's forward could be traced"
        for owner in _owner_candidates(names):
            if owner not in traced:
                try:
                    traced[owner] = _trace(model.get_submodule(owner))
                except Exception as exc:  # noqa: BLE001 - an untraceable block is reported
                    traced[owner] = f"torch.fx cannot trace '{owner}': {type(exc).__name__}: {exc}"
            graph = traced[owner]
            if isinstance(graph, str):
                result = graph
                continue
            match = _match_in_graph(graph, model.get_submodule(owner), owner, candidate.branches)
            if isinstance(match, str):
                result = match
                continue
            result = _record(planner, candidate.branches, owner, match, flow.method)
            break
        if isinstance(result, str):
            not_merged.append(UnmergedSum(tuple(candidate.terms), result))
        else:
            merged.append(result)
    return ReparamPlan(merged=tuple(merged), not_merged=tuple(not_merged),
                       attempts=tuple(attempts), method=flow.method)


def _record(planner: _Planner, branches: list[_Branch], owner: str, match: _BlockMatch,
            method: str) -> MergedBlock:
    convs = [planner.convs[b.conv] for b in branches if b.conv]
    dims = len(convs[0].kernel_size)
    kernel = tuple(max(c.kernel_size[d] for c in convs) for d in range(dims))
    main = next(b.conv for b in branches if b.conv
                and tuple(planner.convs[b.conv].kernel_size) == kernel)
    records = tuple(BranchRecord(kind=b.kind, conv=b.conv, batchnorm=b.batchnorm,
                                 kernel_size=_kernel(planner, b, dims),
                                 scale=match.scales[b.end]) for b in branches)
    return MergedBlock(block=owner, conv=main, branches=records, constant=match.constant,
                       method=method)


# --- applying -----------------------------------------------------------------------------------

_PLAN_HINT = "pass the plan made by plan_reparameterization for this model"


def _plan_mismatch(what: str, *, where: str, got: object, expected: object) -> InvalidInputError:
    return InvalidInputError(format_message(
        f"The re-parameterisation plan does not match the model: {what}", where=where, got=got,
        expected=expected, hint=_PLAN_HINT))


def _plan_conv(model: nn.Module, name: str) -> _ConvNd:
    """The convolution a plan names (a plan made for another model may name something else)."""
    module = model.get_submodule(name)
    if not isinstance(module, _ConvNd):
        raise _plan_mismatch("a branch conv is not a convolution", where=name,
                             got=type(module).__qualname__, expected="nn.Conv1d/2d/3d")
    return module


def _plan_scale_shift(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` of the BatchNorm a plan names."""
    bn = model.get_submodule(name)
    mean, var = module_tensor(bn, "running_mean"), module_tensor(bn, "running_var")
    eps = getattr(bn, "eps", None)
    if mean is None or var is None or not isinstance(eps, (numbers.Real, torch.Tensor)):
        raise _plan_mismatch("a branch BatchNorm has no running statistics or eps", where=name,
                             got=type(bn).__qualname__, expected="a BatchNorm to fold")
    return batchnorm_scale_shift(mean, var, eps=float(eps), weight=module_tensor(bn, "weight"),
                                 bias=module_tensor(bn, "bias"))


def _branch_weights(model: nn.Module, branch: BranchRecord, block: MergedBlock, main: _ConvNd
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """A branch's float64 kernel and bias (its BatchNorm folded in) and where the kernel sits
    inside the kernel of ``main`` (the conv ``block.conv``)."""
    folded = None if branch.batchnorm is None else _plan_scale_shift(model, branch.batchnorm)
    if branch.conv is not None:
        conv = _plan_conv(model, branch.conv)
        weight = conv.weight.detach().to(_F64)
        bias = (torch.zeros(conv.out_channels, dtype=_F64, device=weight.device)
                if conv.bias is None else conv.bias.detach().to(_F64))
        if folded is not None:
            weight, bias = fold_batchnorm_after(weight, bias, *folded, groups=conv.groups)
        offset = _offsets(conv, main)
        if offset is None:
            raise _plan_mismatch("a branch kernel does not line up inside the merged one",
                                 where=branch.conv, got=tuple(conv.kernel_size),
                                 expected=f"a kernel that fits {tuple(main.kernel_size)}")
        return weight, bias, offset
    centre = _identity_centre(main)
    if folded is None or centre is None:
        raise _plan_mismatch("an identity branch cannot be merged into this conv",
                             where=branch.batchnorm or block.conv, got=branch.kind,
                             expected="a BatchNorm beside a stride-1 conv whose padding keeps "
                             "the spatial size")
    weight = _identity_kernel(main.out_channels, main.groups, (1,) * len(centre),
                              (0,) * len(centre), main.weight.device)
    weight, bias = fold_batchnorm_after(weight, None, *folded, groups=main.groups)
    return weight, bias, centre


def _merged_weights(model: nn.Module, block: MergedBlock) -> tuple[torch.Tensor, torch.Tensor]:
    main = _plan_conv(model, block.conv)
    kernels: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    offsets: list[tuple[int, ...]] = []
    for branch in block.branches:
        weight, bias, offset = _branch_weights(model, branch, block, main)
        kernels.append(weight * branch.scale)
        biases.append(bias * branch.scale)
        offsets.append(offset)
    biases[0] = biases[0] + block.constant
    return merge_branch_kernels(kernels, biases, offsets, tuple(main.kernel_size),
                                dtype=main.weight.dtype)


def _rewrite_forward(block_module: nn.Module, block: str, records: list[MergedBlock],
                     branches_of: dict[int, list[_Branch]]) -> None:
    graph = _trace(block_module)
    for record in records:
        match = _match_in_graph(graph, block_module, block, branches_of[id(record)])
        if isinstance(match, str):  # the plan was made for another model
            raise InvalidInputError(format_message(
                "The re-parameterisation plan does not match the model", where=block or "<model>",
                got=match, hint="pass the plan made by plan_reparameterization for this model"))
        with graph.inserting_before(match.root):
            merged = graph.call_module(_relative(record.conv, block), (match.source,))
        match.root.replace_all_uses_with(merged)
    compiled = torch.fx.GraphModule(block_module, graph)
    compiled.graph.eliminate_dead_code()
    compiled.graph.lint()
    compiled.recompile()
    graph = compiled.graph
    missing = [str(n.target) for n in graph.nodes if n.op == "get_attr"
               and not _has_attribute(block_module, str(n.target))]
    if missing:
        raise InvalidInputError(format_message(
            "The traced forward needs constants the block does not hold", where=block,
            got=missing, hint="this block cannot be re-parameterised; exclude it"))
    code = graph.python_code(root_module="self")
    names = tuple(sorted(code.globals.items()))
    source_globals = tuple((name, *_global_spec(value)) for name, value in names)
    block_module.__class__ = _block_class(type(block_module), code.src, source_globals)


# A re-parameterised block's class is made at run time: a subclass of the block's own class whose
# forward is the traced one. pickle stores a class by its qualified name, which names the original
# class, so such a block pickles as a call that remakes its class from the original class and
# the forward's source (module-level functions only: no closure, nothing local to a call).
_GlobalSpec = tuple[str, str, object]
#: What remakes a block class: the original class, the forward's source and its globals.
_BlockSpec = tuple[type[nn.Module], str, tuple[_GlobalSpec, ...]]
_block_classes: dict[tuple[type, str, tuple[str, ...]], type[nn.Module]] = {}
_block_specs: dict[type, _BlockSpec] = {}


def _global_spec(value: object) -> tuple[str, object]:
    """How a global of the traced forward is stored: a module by its name, anything else as is."""
    if isinstance(value, types.ModuleType):
        return "module", value.__name__
    return "object", value


def _global_value(name: str, kind: str, value: object) -> object:
    """A stored global of a traced forward, as the forward's source reads it."""
    if kind != "module":
        return value
    if not isinstance(value, str):  # only a pickle not written by _reduce_block holds this
        raise InvalidInputError(format_message(
            "A re-parameterised block names a module global by something else than its name",
            where=name, got=repr(value), expected="a module name such as 'torch'",
            hint="load a block pickled by bnsurgery"))
    return importlib.import_module(value)


def _block_class(original: type[nn.Module], source: str,
                 source_globals: tuple[_GlobalSpec, ...]) -> type[nn.Module]:
    """The subclass of ``original`` whose forward is ``source``, made once and cached."""
    key = (original, source, tuple(name for name, _, _ in source_globals))
    cls = _block_classes.get(key)
    if cls is None:
        namespace = {name: _global_value(name, kind, value)
                     for name, kind, value in source_globals}
        exec(compile(source, f"<re-parameterised {original.__qualname__}.forward>", "exec"),
             namespace)
        cls = type(original.__name__, (original,), {
            "forward": namespace["forward"], "__module__": original.__module__,
            "__qualname__": original.__qualname__, "__reduce_ex__": _reduce_block,
            "reparameterized_from": original, "reparameterized_source": source,
            "reparameterized_globals": source_globals})
        _block_classes[key] = cls
        _block_specs[cls] = (original, source, source_globals)
    return cls


def _reduce_block(self: nn.Module, protocol: int) -> tuple[object, ...]:
    """pickle / deepcopy support: rebuild the class from the original class and the source."""
    # Only classes made by _block_class carry this method; a subclass of one inherits its spec.
    spec = next(_block_specs[c] for c in type(self).__mro__ if c in _block_specs)
    state = self.__getstate__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    return (_new_block, spec, state)


def _new_block(original: type[nn.Module], source: str, source_globals: tuple[_GlobalSpec, ...]
               ) -> nn.Module:
    """An empty re-parameterised block, its state to be set by pickle (``__setstate__``)."""
    cls = _block_class(original, source, source_globals)
    return cls.__new__(cls)


def _has_attribute(module: nn.Module, path: str) -> bool:
    try:
        for part in path.split("."):
            module = getattr(module, part)
    except AttributeError:
        return False
    return True


def reparameterize_branches(model: nn.Module, example_inputs: object = None, *,
                            inplace: bool = False, plan: ReparamPlan | None = None,
                            methods: Sequence[str] = DISCOVERY_METHODS,
                            check: bool = True) -> nn.Module:
    """Merge every mergeable sum of conv/BatchNorm branches into its largest conv.

    Each merged block's forward becomes its traced eval-mode forward with the sum replaced by one
    call of the largest branch conv, which receives the merged kernel and bias (float64 sum,
    rounded once to its dtype); the other branch modules become ``nn.Identity``. The rest of the
    model, its class and its module names are unchanged. Re-parameterised blocks are meant for
    inference: their forward is the eval-mode one. The whole model can be pickled, deep-copied
    and saved with ``torch.save(model)`` (loading it needs ``weights_only=False`` and bnsurgery);
    ``state_dict`` or an export is still the safer way to ship it.

    Args:
        model: The model, in eval mode.
        example_inputs: Example forward arguments. When given, the result is checked against the
            original on them (and :class:`~bnsurgery.NumericMismatchError` raised on a mismatch).
        inplace: Change ``model`` itself instead of a deep copy.
        plan: A plan from :func:`plan_reparameterization` for this model.
        methods: See :func:`plan_reparameterization`.
        check: Compare with the original on ``example_inputs`` (when given).

    Returns:
        The re-parameterised model (``model`` itself when ``inplace=True``).

    Raises:
        InvalidInputError: Bad options, or a plan made for another model.
        NumericMismatchError: The check on ``example_inputs`` failed (nothing is returned).
    """
    if plan is None:
        plan = plan_reparameterization(model, example_inputs, methods=methods)
    work = model if inplace else copy.deepcopy(model)
    reference = copy.deepcopy(model) if (inplace and check and example_inputs is not None
                                         and plan.merged) else model
    by_block: dict[str, list[MergedBlock]] = {}
    for record in plan.merged:
        by_block.setdefault(record.block, []).append(record)
    branches_of = {id(r): [_Branch(b.kind, b.conv, b.batchnorm, -1, b.batchnorm or b.conv or "")
                           for b in r.branches] for r in plan.merged}
    with torch.no_grad():
        weights = {id(r): _merged_weights(work, r) for r in plan.merged}
        for block, records in by_block.items():
            _rewrite_forward(work.get_submodule(block), block, records, branches_of)
        for record in plan.merged:
            weight, bias = weights[id(record)]
            conv = _plan_conv(work, record.conv)
            conv.weight.copy_(weight)
            if conv.bias is None:
                conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
            else:
                conv.bias.copy_(bias)
            for branch in record.branches:
                for name in (branch.conv, branch.batchnorm):
                    if name and name != record.conv:
                        _set_module(work, name, nn.Identity())
    if check and example_inputs is not None and plan.merged:
        from bnsurgery.validate import as_input_tuple, compare_models

        report = compare_models(reference, work, as_input_tuple(as_forward_args(example_inputs)),
                                float64_baseline=False)
        if not report.passed:
            raise NumericMismatchError(
                "The re-parameterised model does not compute the original's outputs on "
                f"example_inputs.\n{report}\nHint: report this model; pass check=False only to "
                "inspect the result")
    logger.info("merged %d sums of branches, left %d", len(plan.merged), len(plan.not_merged))
    return work


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    module.training = getattr(parent, child).training
    setattr(parent, child, module)
