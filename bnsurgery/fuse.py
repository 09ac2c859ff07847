"""Fold inference-mode BatchNorms into neighbouring layers, keeping the model's own class and tree.

:func:`plan_fusion` decides what can be folded (pairs from :mod:`bnsurgery.pairs`, then a
precision check for half-precision weights) and explains every BatchNorm it leaves alone;
:func:`fuse_batchnorm` applies a plan to a deep copy of the model (or to the model itself with
``inplace=True``). The result is the *same* ``nn.Module`` class with the same submodule names, not
a ``GraphModule``: ``model.fc``, ``model.forward_features()`` and the user's own methods keep
working. Each folded BatchNorm becomes ``nn.Identity``; a norm+act class (timm's or bnsurgery's
``BatchNormAct2d``) becomes a :class:`FoldedBatchNormAct` that keeps its ``drop`` and ``act``
children, so its activation is not lost. The weight arithmetic lives in :mod:`bnsurgery.fold`.

Whenever example inputs are given, the plan is checked before anything is handed out: a fused
copy is run against the original (:mod:`bnsurgery.fusion_check`) on the inputs and at another
batch size, and a fold that breaks the check is found by bisection and left unfolded with the
reason. ``plan.check`` says what was checked, or that nothing could be.

Example:
    >>> plan = plan_fusion(model, example_inputs)
    >>> print(plan)                       # what is folded where, and why the rest is not
    >>> fused = fuse_batchnorm(model, example_inputs, strict=True)
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import textwrap
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bnsurgery._bn_registry import batchnorm_kind
from bnsurgery.copying import copy_model
from bnsurgery.errors import FusionError, InvalidInputError, format_message
from bnsurgery.fold import (
    FoldedWeights,
    PrecisionReport,
    batchnorm_scale_shift,
    fold_layer_weights,
    precision_report,
    split_scale_shift,
)
from bnsurgery.fusion_check import FusionCheck, ReferenceRuns, bisect_failures, inputs_fingerprint
from bnsurgery.pairs import (
    DISCOVERY_METHODS,
    TRANSPOSED_CONVS,
    DiscoveryAttempt,
    FoldPair,
    as_forward_args,
    channels_out,
    find_fold_pairs,
)
from bnsurgery.results import JsonResult
from bnsurgery.tables import render_table
from bnsurgery.tensors import module_tensor

__all__ = [
    "PRECISION_POLICIES",
    "FoldRecord",
    "FoldedBatchNormAct",
    "FusionPlan",
    "fuse_batchnorm",
    "plan_fusion",
]

logger = logging.getLogger(__name__)

#: ``"skip"``: leave unfolded any pair whose folded weights overflow or newly turn subnormal in
#: the half-precision dtype; ``"skip_overflow"``: leave unfolded only those that overflow;
#: ``"fold"``: fold everything and only report.
PRECISION_POLICIES: tuple[str, ...] = ("skip", "skip_overflow", "fold")

_HALF = (torch.float16, torch.bfloat16)


class FoldedBatchNormAct(nn.Module):
    """What is left of a norm+act layer once its normalisation is folded: ``act(drop(x))``.

    Keeps the original ``drop`` and ``act`` modules (same objects, same names), so code that
    reaches ``model.bn1.act`` still finds it and the activation still runs.
    """

    def __init__(self, drop: nn.Module | None, act: nn.Module | None) -> None:
        super().__init__()
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.act(self.drop(x))  # Module calls are untyped
        return output


@dataclass(frozen=True)
class FoldRecord(JsonResult):
    """One folded BatchNorm.

    Attributes:
        batchnorm: Qualified name of the BatchNorm.
        batchnorm_type: Its class, dotted.
        targets: The layer(s) that absorbed it (several for a BatchNorm after a concatenation,
            one channel slice each, in concatenation order).
        direction: ``"preceding"`` (into the layer before it) or ``"following"`` (the one after).
        method: How the pair was found: ``"fx"``, ``"export"`` or ``"hooks"``.
        replacement: What the BatchNorm becomes: ``"Identity"`` or ``"FoldedBatchNormAct"``.
        precision: What rounding the folded weights to a half-precision dtype does, when the
            model or the requested dtype is float16/bfloat16; else ``None``.
    """

    json_derived = ("target",)

    batchnorm: str
    batchnorm_type: str
    targets: tuple[str, ...]
    direction: str
    method: str
    replacement: str
    precision: PrecisionReport | None = None

    @property
    def target(self) -> str:
        """The absorbing layer's name (names joined with ``+`` for a concatenation)."""
        return "+".join(self.targets)


@dataclass(frozen=True)
class FusionPlan(JsonResult):
    """What :func:`fuse_batchnorm` folds and why it leaves the rest.

    Attributes:
        folded: One record per BatchNorm that is folded.
        skipped: BatchNorm qualified name -> the reason it is left alone, in plain words.
        attempts: The dataflow builders tried, in order (see :mod:`bnsurgery.pairs`).
        method: The builder whose graph was used, or ``None`` when none worked.
        dtype: The dtype precision was checked against (``None``: each layer's own dtype).
        precision_policy: One of :data:`PRECISION_POLICIES`.
        check: How a fused copy compared with the original on the example inputs (``None``
            for a plan built by hand).
    """

    folded: tuple[FoldRecord, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    attempts: tuple[DiscoveryAttempt, ...] = ()
    method: str | None = None
    dtype: str | None = None
    precision_policy: str = "skip"
    check: FusionCheck | None = None

    def __str__(self) -> str:
        total = len(self.folded) + len(self.skipped)
        how = self.method or "no dataflow graph"
        lines = [f"BatchNorm fusion plan: {len(self.folded)} of {total} folded, "
                 f"{len(self.skipped)} skipped (dataflow from {how})"]
        if self.folded:
            header = ("BatchNorm", "into", "direction", "found by", "becomes")
            rows = [(r.batchnorm, r.target, r.direction, r.method, r.replacement)
                    for r in self.folded]
            lines += render_table(header, rows, pad_last=True)
        for record in self.folded:
            p = record.precision
            if p is None or p.ok:
                continue
            lines.append(f"note: {record.batchnorm} folded with {p.overflow} overflowing and "
                         f"{p.subnormal} new subnormal values in {p.dtype}")
        if self.check is not None:
            lines.append(f"check: {self.check.status}: {self.check.detail}")
            lines += [f"  note: {note}" for note in self.check.notes]
        if self.skipped:
            lines.append("skipped:")
            for name, reason in self.skipped.items():
                lines.append(textwrap.fill(f"{name}: {reason}", width=100,
                                           initial_indent="  ", subsequent_indent="      "))
        return "\n".join(lines)


def _weight(layer: nn.Module) -> torch.Tensor:
    """A fold target's weight (every conv, conv-transpose and linear layer has one)."""
    weight = module_tensor(layer, "weight")
    if weight is None:
        raise FusionError(f"{type(layer).__name__} has no weight tensor to fold into")
    return weight


def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    running_mean, running_var = module_tensor(bn, "running_mean"), module_tensor(bn, "running_var")
    eps = getattr(bn, "eps", None)
    if running_mean is None or running_var is None or not isinstance(
            eps, (int, float, torch.Tensor)):
        # plan_fusion only pairs BatchNorms that have both statistics and an eps
        raise FusionError(f"{type(bn).__name__} has no running statistics or eps to fold")
    return batchnorm_scale_shift(running_mean, running_var, eps=float(eps),
                                 weight=module_tensor(bn, "weight"), bias=module_tensor(bn, "bias"))


def _layer_folds(model: nn.Module, pairs: Sequence[FoldPair]
                 ) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Target layer name -> ``{"before": (scale, shift), "after": (scale, shift)}`` in float64."""
    folds: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for pair in pairs:
        bn = model.get_submodule(pair.batchnorm)
        scale, shift = _scale_shift(bn)
        if pair.direction == "following":
            folds.setdefault(pair.targets[0], {})["before"] = (scale, shift)
            continue
        layers = [model.get_submodule(t) for t in pair.targets]
        parts = split_scale_shift(scale, shift, [channels_out(layer) for layer in layers])
        for name, part in zip(pair.targets, parts, strict=True):
            folds.setdefault(name, {})["after"] = part
    return folds


def _fold_layer(layer: nn.Module, sides: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                keep_float64: bool = False) -> FoldedWeights:
    return fold_layer_weights(_weight(layer), module_tensor(layer, "bias"),
                              before=sides.get("before"),
                              after=sides.get("after"),
                              transposed=isinstance(layer, TRANSPOSED_CONVS),
                              groups=getattr(layer, "groups", 1), keep_float64=keep_float64)


def _check_dtype(layer: nn.Module, dtype: torch.dtype | None,
                 sides: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.dtype | None:
    """The dtype the layer's folded weights must be checked against, or ``None``.

    Half-precision dtypes are always checked (overflow and subnormals). Wider dtypes can only
    overflow, which needs a factor near the square root of their range; only then is the fold
    computed to count the values that turn infinite.
    """
    weight = _weight(layer)
    wanted = dtype if dtype is not None else weight.dtype
    if wanted in _HALF:
        return wanted
    if not wanted.is_floating_point:
        return None
    limit = torch.finfo(wanted).max ** 0.5
    largest = max((float(t.abs().max()) for pair in sides.values() for t in pair if t.numel()),
                  default=0.0)
    weights = float(weight.detach().abs().max()) if weight.numel() else 0.0
    return wanted if max(largest, weights) > limit or not torch.isfinite(
        torch.tensor(largest)) else None


def _hazard(report: PrecisionReport, policy: str) -> str | None:
    if report.overflow and policy in ("skip", "skip_overflow"):
        return (f"{report.overflow} folded values would overflow {report.dtype} (largest "
                f"magnitude {report.max_abs:.3g})")
    half = report.dtype in (str(torch.float16), str(torch.bfloat16))
    if report.subnormal and policy == "skip" and half:
        return (f"{report.subnormal} folded values would turn subnormal or zero in "
                f"{report.dtype} (smallest magnitude {report.min_abs_nonzero:.3g}) and lose "
                "precision")
    return None


def _check_precision_options(dtype: torch.dtype | None, precision_policy: str) -> None:
    """Refuse an unknown ``precision_policy`` or a ``dtype`` that is not a floating dtype."""
    if precision_policy not in PRECISION_POLICIES:
        raise InvalidInputError(format_message(
            "Unknown precision policy", where="precision_policy", got=repr(precision_policy),
            expected=f"one of {list(PRECISION_POLICIES)}", hint="use 'skip' (the default)"))
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise InvalidInputError(format_message(
            "dtype must be a floating torch.dtype", where="dtype", got=dtype,
            expected="e.g. torch.float16", hint="pass dtype=None to check each layer's own dtype"))


def _precision_problems(model: nn.Module, pairs: Sequence[FoldPair], dtype: torch.dtype | None,
                        precision_policy: str) -> tuple[dict[str, PrecisionReport],
                                                        dict[str, str]]:
    """Fold every target layer in float64 and check it against the dtype it will run in.

    Returns:
        Layer -> its precision report (layers that need a check), and layer -> the problem
        the policy does not accept.
    """
    reports, bad_layers = {}, {}
    for name, sides in _layer_folds(model, pairs).items():
        layer = model.get_submodule(name)
        check = _check_dtype(layer, dtype, sides)
        if check is None:
            continue
        folded = _fold_layer(layer, sides, keep_float64=True)
        weight64 = folded.weight if folded.weight64 is None else folded.weight64
        report = precision_report([weight64, folded.bias64],
                                  [_weight(layer), module_tensor(layer, "bias")], check)
        reports[name] = report
        problem = _hazard(report, precision_policy)
        if problem:
            bad_layers[name] = problem
    return reports, bad_layers


def _drop_lossy_pairs(model: nn.Module, pairs: list[FoldPair], skipped: dict[str, str],
                      dtype: torch.dtype | None, precision_policy: str
                      ) -> tuple[list[FoldPair], dict[str, PrecisionReport]]:
    """The pairs whose folded weights fit the dtype, and their layers' precision reports.

    Dropping a pair changes its layers' folds (a layer with two BatchNorms loses one side), so
    the check repeats until nothing more is dropped. Each dropped pair is recorded in
    ``skipped`` (changed in place) with the reason.
    """
    while True:
        reports, bad_layers = _precision_problems(model, pairs, dtype, precision_policy)
        if not bad_layers:
            return pairs, reports
        keep = []
        for pair in pairs:
            problems = [f"in '{t}', {bad_layers[t]}" for t in pair.targets if t in bad_layers]
            if problems:
                skipped[pair.batchnorm] = (
                    "folding it would be lossy: " + "; ".join(problems)
                    + f" (precision_policy={precision_policy!r}; 'fold' folds it anyway)")
            else:
                keep.append(pair)
        pairs = keep


def _fold_records(model: nn.Module, pairs: Sequence[FoldPair],
                  reports: dict[str, PrecisionReport]) -> list[FoldRecord]:
    """One plan record per pair to fold: what it is, where it goes, what replaces it."""
    records = []
    for pair in pairs:
        bn = model.get_submodule(pair.batchnorm)
        kind = batchnorm_kind(bn)
        merged = _merge_reports([reports[t] for t in pair.targets if t in reports])
        records.append(FoldRecord(
            batchnorm=pair.batchnorm,
            batchnorm_type=kind.label if kind else type(bn).__qualname__,
            targets=pair.targets, direction=pair.direction, method=pair.method,
            replacement="FoldedBatchNormAct" if kind and kind.keeps else "Identity",
            precision=merged))
    return records


def plan_fusion(model: nn.Module, example_inputs: object = None, *,
                dtype: torch.dtype | None = None, precision_policy: str = "skip",
                methods: Sequence[str] = DISCOVERY_METHODS) -> FusionPlan:
    """Decide which BatchNorms of ``model`` fold into which layers, without changing anything.

    With ``example_inputs``, the plan is checked: a fused copy is compared with the original
    (both deep copies; ``model`` never runs) on the inputs, at another batch size and, when
    torch.fx could not trace the model, at another spatial size. Folds that break the check
    are found by bisection and moved to ``skipped`` with the reason; ``plan.check`` records what
    was compared.

    Args:
        model: The model (typically in eval mode).
        example_inputs: A tensor or a tuple of positional forward arguments. Optional, but
            needed when ``torch.fx`` cannot trace the model, to check Linear layers' ranks, and
            to check the fused model against the original.
        dtype: The dtype the fused model will run in, when it differs from the weights' dtype
            (e.g. ``torch.float16`` for a float32 model you will ``.half()`` later). Folded
            weights are checked for overflow and new subnormals when this, or a layer's own
            dtype, is float16 or bfloat16; wider dtypes are checked for overflow only.
        precision_policy: What to do with pairs whose folded weights do not fit that dtype:
            ``"skip"`` (default) leaves pairs unfolded that overflow or turn subnormal,
            ``"skip_overflow"`` only those that overflow, ``"fold"`` folds them all anyway. Every
            case is reported in the plan.
        methods: Dataflow builders to try, in order (see :func:`bnsurgery.pairs.find_fold_pairs`).

    Returns:
        The plan; ``print(plan)`` shows a table.

    Raises:
        InvalidInputError: An unknown ``precision_policy`` or ``methods`` entry, a ``dtype``
            that is not a floating dtype, or a model that does not run on ``example_inputs`` or
            returns no tensor.
        NonFiniteReferenceError: The model's own output on ``example_inputs`` is NaN or Inf
            (the message names where it first becomes so).
    """
    _check_precision_options(dtype, precision_policy)
    search = find_fold_pairs(model, example_inputs, methods=methods)
    skipped = dict(search.skipped)
    pairs, reports = _drop_lossy_pairs(model, list(search.pairs), skipped, dtype,
                                       precision_policy)
    records = _fold_records(model, pairs, reports)
    if search.method == "hooks" and records:
        warnings.warn(
            f"{len(records)} BatchNorm pair(s) were found by running the model on "
            "example_inputs because torch.fx and torch.export could not trace it; only the "
            "path those inputs take was seen, so check the fused model on inputs that take "
            "other branches", UserWarning, stacklevel=2)
    plan = FusionPlan(folded=tuple(records), skipped=_in_model_order(model, skipped),
                      attempts=search.attempts, method=search.method,
                      dtype=None if dtype is None else str(dtype),
                      precision_policy=precision_policy)
    args = as_forward_args(example_inputs)
    if args is None:
        return dataclasses.replace(plan, check=FusionCheck(
            "not run", "no example inputs: the fused model was not compared with the original"))
    return _checked(model, plan, args)


def _in_model_order(model: nn.Module, skipped: dict[str, str]) -> dict[str, str]:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(skipped.items(), key=lambda item: order.get(item[0], len(order))))


def _checked(model: nn.Module, plan: FusionPlan, args: tuple[object, ...]) -> FusionPlan:
    """``plan`` with every fold that makes a fused copy differ from the original left out.

    Fused copies are built from ``model`` (never run themselves) and compared with a deep copy
    of the original; failing folds are found by bisection, so one bad pair does not cost the rest.
    """
    fingerprint = inputs_fingerprint(args)
    if not plan.folded:
        return dataclasses.replace(plan, check=FusionCheck(
            "not run", "nothing is folded, so the result computes what the original does",
            fingerprint=fingerprint))
    runs = ReferenceRuns(model, args, other_shapes=plan.method != "fx")
    ratios: dict[tuple[str, ...], float] = {}

    def failure(records: list[FoldRecord]) -> str | None:
        candidate = _fused_copy(model, dataclasses.replace(plan, folded=tuple(records)),
                                inplace=False)
        reason, ratio = runs.compare(candidate)
        if reason is None:
            ratios[tuple(r.batchnorm for r in records)] = ratio
        return reason

    kept, dropped = bisect_failures(list(plan.folded), failure)
    skipped = dict(plan.skipped)
    for index, reason in dropped.items():
        name = plan.folded[index].batchnorm
        skipped[name] = ("the fused model did not match the original with it folded ("
                         f"{reason}), so it is left as it is")
        logger.warning("left %s unfolded: %s", name, reason)
    shapes = runs.shapes
    detail = (f"{len(kept)} fold(s) checked against the original on inputs of shapes "
              f"{[list(s) for s in shapes]} ({runs.tolerance.label} tolerance)")
    if dropped:
        detail += f"; {len(dropped)} fold(s) broke the check and were left out"
    check = FusionCheck("passed", detail, inputs=shapes, tolerance=runs.tolerance.label,
                        max_error_ratio=ratios.get(tuple(r.batchnorm for r in kept), 0.0),
                        notes=tuple(runs.notes), fingerprint=fingerprint)
    return dataclasses.replace(plan, folded=tuple(kept), skipped=_in_model_order(model, skipped),
                               check=check)


def _merge_reports(reports: list[PrecisionReport]) -> PrecisionReport | None:
    if not reports:
        return None
    nonzero = [r.min_abs_nonzero for r in reports if r.min_abs_nonzero > 0]
    return PrecisionReport(dtype=reports[0].dtype, overflow=sum(r.overflow for r in reports),
                           subnormal=sum(r.subnormal for r in reports),
                           max_abs=max(r.max_abs for r in reports),
                           min_abs_nonzero=min(nonzero) if nonzero else 0.0)


def _strict_error(plan: FusionPlan) -> FusionError:
    total = len(plan.folded) + len(plan.skipped)
    lines = [f"{len(plan.skipped)} of {total} BatchNorm layers could not be folded "
             "(strict=True):"]
    lines += [f"  - {name}: {reason}" for name, reason in plan.skipped.items()]
    lines.append("Hint: print(plan_fusion(model, example_inputs)) shows the whole plan; fix the "
                 "layers above (eval mode, example_inputs, ...) or pass strict=False to fold the "
                 "others and keep these")
    return FusionError("\n".join(lines))


def _validate_plan(model: nn.Module, plan: FusionPlan) -> None:
    modules = dict(model.named_modules())
    for record in plan.folded:
        bn = modules.get(record.batchnorm)
        kind = None if bn is None else batchnorm_kind(bn)
        if kind is None or kind.label != record.batchnorm_type:
            raise InvalidInputError(format_message(
                "The fusion plan does not match the model", where=record.batchnorm,
                got="missing" if bn is None else type(bn).__qualname__,
                expected=record.batchnorm_type,
                hint="pass the plan made by plan_fusion for this very model"))
        for target in record.targets:
            if not hasattr(modules.get(target), "weight"):
                raise InvalidInputError(format_message(
                    "The fusion plan names a layer the model lacks", where=target,
                    hint="pass the plan made by plan_fusion for this very model"))


def _replacement(bn: nn.Module, memo: dict[int, object] | None) -> nn.Module:
    """``nn.Identity``, or a :class:`FoldedBatchNormAct` holding ``bn``'s drop and act (copied
    through ``memo`` when the model is being copied, so shared modules stay shared)."""
    kind = batchnorm_kind(bn)
    if kind is not None and kind.keeps:
        kept = [getattr(bn, name, None) for name in ("drop", "act")]
        if memo is not None:
            kept = [None if m is None else copy.deepcopy(m, memo) for m in kept]
        new: nn.Module = FoldedBatchNormAct(*kept)
    else:
        new = nn.Identity()
    new.training = bn.training  # the kept children keep their own flags
    return new


def _fused_copy(model: nn.Module, plan: FusionPlan, *, inplace: bool,
                journal: list[tuple[nn.Module, str, object]] | None = None) -> nn.Module:
    """Apply ``plan`` to ``model`` itself or to a deep copy of it.

    For a copy, the folded weights and the BatchNorm replacements are seeded into
    ``copy.deepcopy``'s memo, so the copy is built with them directly: the parameters that are
    about to be overwritten (most of a CNN's weights) are never cloned, and every reference to a
    folded BatchNorm (a plain list, a second attribute) leads to its replacement. In place,
    ``journal`` (when given) records what :func:`_undo` needs to restore the model.
    """
    pairs = [FoldPair(r.batchnorm, r.targets, r.direction, r.method) for r in plan.folded]
    with torch.no_grad():
        folded = {name: (model.get_submodule(name), _fold_layer(model.get_submodule(name), sides))
                  for name, sides in _layer_folds(model, pairs).items()}
    batchnorms = {id(bn): bn for bn in (model.get_submodule(r.batchnorm) for r in plan.folded)}
    seeded: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if inplace:
        work = model
        replacements = {key: _replacement(bn, None) for key, bn in batchnorms.items()}
    else:
        memo: dict[int, object] = {}
        for name, (layer, weights) in folded.items():
            old_weight, old_bias = _weight(layer), module_tensor(layer, "bias")
            weight = _new_parameter(old_weight, weights.weight)
            bias = None if old_bias is None else _new_parameter(old_bias, weights.bias)
            memo[id(old_weight)] = weight
            if bias is not None:
                memo[id(old_bias)] = bias
            seeded[name] = (weight, bias)
        replacements = {key: _replacement(bn, memo) for key, bn in batchnorms.items()}
        memo.update(replacements)
        work = copy_model(model, what="fuse_batchnorm", memo=memo)
    for name, (_, weights) in folded.items():
        layer = work.get_submodule(name)
        new_weight, new_bias = seeded[name] if name in seeded else (None, None)
        layer_weight, layer_bias = _weight(layer), module_tensor(layer, "bias")
        with torch.no_grad():
            if journal is not None:
                journal.append((layer, "weight", layer_weight.detach().clone()))
                journal.append((layer, "bias", None if layer_bias is None
                                else layer_bias.detach().clone()))
            if layer_weight is not new_weight:  # in place, or a class with its own __deepcopy__
                layer_weight.copy_(weights.weight)
            if layer_bias is None:
                layer.bias = nn.Parameter(weights.bias, requires_grad=layer_weight.requires_grad)
            elif layer_bias is not new_bias:
                layer_bias.copy_(weights.bias)
    for parent in list(work.modules()):
        for child_name, child in list(parent._modules.items()):  # every alias, not just one
            if id(child) in replacements:
                if journal is not None:
                    journal.append((parent, child_name, child))
                setattr(parent, child_name, replacements[id(child)])
    return work


def _undo(journal: list[tuple[nn.Module, str, object]]) -> None:
    """Put back what an in-place :func:`_fused_copy` changed, newest change first."""
    with torch.no_grad():
        for owner, name, old in reversed(journal):
            current = module_tensor(owner, name)
            if isinstance(old, torch.Tensor) and current is not None:
                current.copy_(old)  # a folded weight or bias: its old values back
            else:
                setattr(owner, name, old)  # a replaced module, or a bias the fold created


def _outside_references(model: nn.Module, plan: FusionPlan) -> FusionPlan:
    """``plan`` without the BatchNorms that something outside the module tree also holds.

    In place, a folded BatchNorm is swapped out of its parents; a plain list, dict or attribute
    that also holds it would keep running it on the folded output. (A deep copy redirects those
    references to the replacement, so only ``inplace=True`` needs this.)
    """
    tree = {id(m._modules) for m in model.modules()}
    gc.collect()
    keep, skipped = [], dict(plan.skipped)
    for record in plan.folded:
        bn = model.get_submodule(record.batchnorm)
        holders = sorted({type(ref).__name__ for ref in gc.get_referrers(bn)
                          if id(ref) not in tree and not isinstance(ref, types.FrameType)})
        if holders:
            skipped[record.batchnorm] = (
                f"it is also reachable outside the module tree (held by a {', a '.join(holders)}"
                "), which would keep running it on the folded output if it were folded in "
                "place; use inplace=False (a copy redirects every reference)")
        else:
            keep.append(record)
    if len(keep) == len(plan.folded):
        return plan
    return dataclasses.replace(plan, folded=tuple(keep), skipped=_in_model_order(model, skipped))


def _new_parameter(old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if type(old) is nn.Parameter:
        return nn.Parameter(value, requires_grad=old.requires_grad)
    if isinstance(old, nn.Parameter):  # a Parameter subclass: keep its class via a real copy
        new = copy.deepcopy(old)
        with torch.no_grad():
            new.copy_(value)
        return new
    return value.requires_grad_(old.requires_grad)


def _plan_to_apply(model: nn.Module, example_inputs: object, args: tuple[object, ...] | None,
                   plan: FusionPlan | None, *, dtype: torch.dtype | None,
                   precision_policy: str | None, methods: Sequence[str] | None) -> FusionPlan:
    """The plan :func:`fuse_batchnorm` applies: a new one, or the given one validated against
    the model and checked again unless it was checked on these very inputs."""
    if plan is None:
        return plan_fusion(model, example_inputs, dtype=dtype,
                           precision_policy="skip" if precision_policy is None
                           else precision_policy,
                           methods=DISCOVERY_METHODS if methods is None else methods)
    given = [name for name, value in (("dtype", dtype), ("precision_policy", precision_policy),
                                      ("methods", methods)) if value is not None]
    if given:
        raise InvalidInputError(format_message(
            "fuse_batchnorm got a plan and options that the plan already fixed",
            where=", ".join(given), got=f"plan= and {', '.join(g + '=' for g in given)}",
            expected="either a plan or those options",
            hint=f"pass {', '.join(g + '=' for g in given)} to plan_fusion, or leave "
                 "plan=None"))
    _validate_plan(model, plan)
    if args is not None and (plan.check is None
                             or plan.check.fingerprint != inputs_fingerprint(args)):
        plan = _checked(model, plan, args)
    return plan


def _fuse_in_place_checked(model: nn.Module, plan: FusionPlan,
                           args: tuple[object, ...] | None) -> nn.Module:
    """Apply ``plan`` to ``model`` itself; with inputs, compare with outputs recorded before
    folding and restore the model if they differ."""
    runs = (ReferenceRuns(model, args, other_shapes=plan.method != "fx")
            if args is not None and plan.folded else None)
    journal: list[tuple[nn.Module, str, object]] = []
    work = _fused_copy(model, plan, inplace=True, journal=journal)
    if runs is not None:
        reason, _ = runs.compare(copy.deepcopy(work))
        if reason is not None:
            _undo(journal)
            raise FusionError(format_message(
                "Folding in place made the model differ from the original; it has been "
                "restored", where=type(model).__name__, got=reason,
                expected="the same outputs as before folding",
                hint="use inplace=False (a copy redirects every reference to a folded "
                     "BatchNorm)"))
    return work


def fuse_batchnorm(model: nn.Module, example_inputs: object = None, *, inplace: bool = False,
                   strict: bool = False, dtype: torch.dtype | None = None,
                   precision_policy: str | None = None, methods: Sequence[str] | None = None,
                   plan: FusionPlan | None = None) -> nn.Module:
    """Fold every foldable BatchNorm of ``model`` into its neighbouring conv/Linear layer.

    The result has the model's own class and module tree; folded BatchNorms become
    ``nn.Identity`` (norm+act layers a :class:`FoldedBatchNormAct` keeping ``drop`` and ``act``).
    Weights are computed in float64 and rounded once to each layer's dtype; a layer that had no
    bias gets one, a ``Parameter`` with the weight's ``requires_grad``.

    With ``example_inputs``, the result is checked against the original before it is returned
    (see :func:`plan_fusion`); a fold that breaks the check is left out. In place, the folded
    model is checked once more against outputs recorded beforehand, and restored if it fails.

    Args:
        model: The model, in eval mode (BatchNorms in training mode are never folded).
        example_inputs: A tensor or a tuple of positional forward arguments; see
            :func:`plan_fusion`.
        inplace: Fold into ``model`` itself instead of a deep copy.
        strict: Raise if any BatchNorm cannot be folded (nothing is changed then).
        dtype: See :func:`plan_fusion`.
        precision_policy: See :func:`plan_fusion` (``None``: ``"skip"``).
        methods: See :func:`plan_fusion` (``None``: every method).
        plan: A plan from :func:`plan_fusion` for this model, to skip planning again. It fixes
            ``dtype``, ``precision_policy`` and ``methods``, so passing any of them too is an
            error. It is checked again unless it was checked on these very example inputs.

    Returns:
        The fused model (``model`` itself when ``inplace=True``).

    Raises:
        FusionError: ``strict=True`` and some BatchNorm cannot be folded (the message lists
            every one with its reason), or an in-place fold failed its check (the model is
            restored).
        InvalidInputError: Bad options, a ``plan`` made for another model, or a model that
            returns no tensor on ``example_inputs``.
        NonFiniteReferenceError: The original returns NaN or Inf on ``example_inputs``.
    """
    args = as_forward_args(example_inputs)
    plan = _plan_to_apply(model, example_inputs, args, plan, dtype=dtype,
                          precision_policy=precision_policy, methods=methods)
    if inplace and plan.folded:
        plan = _outside_references(model, plan)
    if strict and plan.skipped:
        raise _strict_error(plan)
    if not plan.folded and model.training and plan.skipped:
        # The usual slip: a model straight from training folds nothing, and silence would
        # look like success.
        warnings.warn(
            f"fuse_batchnorm folded none of {len(plan.skipped)} BatchNorm layer(s): the model "
            "is in training mode, where BatchNorm normalises with the statistics of each batch, "
            "which cannot be folded into weights; call model.eval() first", UserWarning,
            stacklevel=2)
    if args is None and plan.folded:
        logger.warning("fuse_batchnorm without example_inputs: the fused model was not "
                       "compared with the original")
    if inplace:
        work = _fuse_in_place_checked(model, plan, args)
    else:
        work = _fused_copy(model, plan, inplace=False)
    logger.info("folded %d BatchNorm layers, skipped %d", len(plan.folded), len(plan.skipped))
    return work
