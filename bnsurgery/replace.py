"""Swap the BatchNorm layers of an existing model for bnsurgery's, and back, losing nothing.

A swap changes only the class of a layer object: the new module takes over the old one's whole
state (parameters, buffers, child modules, hooks, the training flag, any extra attribute), so
values, dtypes, devices, ``requires_grad``, ``state_dict`` keys and the very Parameter objects an
optimizer holds all survive. The original class is recorded on the swapped module, which is what
lets :func:`restore_batchnorm` give back a model that computes bit-identical outputs.

Which classes are swapped is decided by *exact type* through an explicit table, never by a bare
``isinstance``: a BatchNorm subclass with behaviour of its own (timm's ``BatchNormAct2d`` applies
dropout and an activation after normalising) must be swapped for a class that keeps that
behaviour, or not at all. Layers that are left alone are reported with the reason.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from bnsurgery import batchnorm as scratch
from bnsurgery.errors import InvalidInputError, ReplacementError, format_message

__all__ = [
    "ReplacementPlan",
    "ReplacementRecord",
    "plan_replacement",
    "register_replacement",
    "replace_batchnorm",
    "restore_batchnorm",
]

logger = logging.getLogger(__name__)

#: Attribute set on a swapped module: ``(original class, attribute names the swap added)``.
_ORIGIN = "_bnsurgery_origin"

#: User-registered swaps, source class -> bnsurgery class (see :func:`register_replacement`).
_USER_TABLE: dict[type, type] = {}


@dataclass(frozen=True)
class ReplacementRecord:
    """One layer that is (or would be) swapped.

    Attributes:
        name: Qualified name of the layer in the model (``""`` for the model itself).
        source: Fully qualified class name before the swap.
        target: Fully qualified class name after the swap.
    """

    name: str
    source: str
    target: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"name": self.name, "source": self.source, "target": self.target}


@dataclass(frozen=True)
class ReplacementPlan:
    """What a replacement (or restoration) does to a model.

    Attributes:
        replaced: The layers swapped, in module order.
        skipped: BatchNorm-like layers left alone, qualified name -> reason in plain words.
    """

    replaced: tuple[ReplacementRecord, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"replaced": [r.to_dict() for r in self.replaced], "skipped": dict(self.skipped)}

    def __str__(self) -> str:
        lines = [f"{len(self.replaced)} layer(s) swapped, {len(self.skipped)} left alone"]
        lines += [f"  swap  {r.name or '<model>'}: {r.source} -> {r.target}"
                  for r in self.replaced]
        lines += [f"  skip  {name or '<model>'}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _loaded_class(module_name: str, class_name: str) -> type | None:
    """A class from an optional package, only if that package is already imported.

    A model that contains timm layers has imported timm; a model that does not cannot contain
    them, so there is no reason to import timm (slow, optional) just to look.
    """
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def _sync_classes() -> tuple[type, type] | None:
    """bnsurgery's SyncBatchNorm and SyncBatchNormAct, or None if they cannot be imported."""
    try:
        from bnsurgery.sync_batchnorm import SyncBatchNorm, SyncBatchNormAct
    except ImportError:
        return None
    return SyncBatchNorm, SyncBatchNormAct


def _forward_table(sync: bool) -> dict[type, type]:
    """Exact source class -> bnsurgery class, for replace_batchnorm."""
    timm_act = _loaded_class("timm.layers.norm_act", "BatchNormAct2d")
    timm_sync_act = _loaded_class("timm.layers.norm_act", "SyncBatchNormAct")
    plain = {nn.BatchNorm1d: scratch.BatchNorm1d, nn.BatchNorm2d: scratch.BatchNorm2d,
             nn.BatchNorm3d: scratch.BatchNorm3d}
    acts = [scratch.BatchNormAct2d] + ([timm_act] if timm_act else [])
    table: dict[type, type] = {}
    synced = _sync_classes()
    if synced is not None:
        sync_bn, sync_act = synced
        table[nn.SyncBatchNorm] = sync_bn
        if timm_sync_act:
            table[timm_sync_act] = sync_act
        if sync:
            table.update({cls: sync_bn for cls in [*plain, *plain.values()]})
            table.update({cls: sync_act for cls in acts})
    if not sync:
        table.update(plain)
        if timm_act:
            table[timm_act] = scratch.BatchNormAct2d
    table.update(_USER_TABLE)
    return table


def _default_origin(cls: type) -> type | None:
    """The class a bnsurgery layer that was built directly (not swapped in) restores to."""
    defaults: dict[type, type | None] = {
        scratch.BatchNorm1d: nn.BatchNorm1d, scratch.BatchNorm2d: nn.BatchNorm2d,
        scratch.BatchNorm3d: nn.BatchNorm3d,
        scratch.BatchNormAct2d: _loaded_class("timm.layers.norm_act", "BatchNormAct2d"),
    }
    synced = _sync_classes()
    if synced is not None:
        defaults[synced[0]] = nn.SyncBatchNorm
        defaults[synced[1]] = _loaded_class("timm.layers.norm_act", "SyncBatchNormAct")
    return defaults.get(cls)


def _scratch_classes() -> set[type]:
    classes = {scratch.BatchNorm1d, scratch.BatchNorm2d, scratch.BatchNorm3d,
               scratch.BatchNormAct2d, *_USER_TABLE.values()}
    synced = _sync_classes()
    if synced is not None:
        classes.update(synced)
    return classes


def _inherits_torch_forward(cls: type) -> type | None:
    """For a BatchNorm subclass that adds nothing to the computation, its torch base class.

    Such a subclass (one that only adds attributes or methods) computes exactly what its base
    computes, so it can be swapped like the base and restored to itself later.
    """
    for base in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if issubclass(cls, base) and cls.forward is base.forward and (
                cls._check_input_dim is base._check_input_dim):
            return base
    return None


def register_replacement(source: type, target: type) -> None:
    """Teach :func:`replace_batchnorm` to swap ``source`` layers for ``target``.

    Use it for your own BatchNorm subclasses: ``target`` must compute what ``source`` computes,
    keep its state in the same attributes (it is given the source layer's whole state without its
    ``__init__`` being called) and normalise with bnsurgery's maths, typically by subclassing
    :class:`bnsurgery.BatchNorm2d` and repeating the subclass's extra steps. Restoring gives back
    ``source``.

    Args:
        source: The exact class to swap out.
        target: The class to swap in.

    Raises:
        InvalidInputError: Either argument is not an ``nn.Module`` subclass.
    """
    for label, cls in (("source", source), ("target", target)):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InvalidInputError(format_message(
                "register_replacement takes module classes", where=label, got=repr(cls),
                expected="a subclass of torch.nn.Module"))
    _USER_TABLE[source] = target


def _uninitialized_lazy(name: str, module: nn.Module) -> ReplacementError:
    return ReplacementError(format_message(
        f"{type(module).__name__} '{name or '<model>'}' has not been initialised",
        got="uninitialised parameters (num_features is not known yet)",
        expected="a layer that has seen one forward pass",
        hint="run one forward pass on an example input before replacing"))


def _decide_replace(name: str, module: nn.Module, table: dict[type, type]
                    ) -> tuple[type | None, str | None]:
    """(target class, None) to swap this module, (None, reason) to skip, (None, None) if not BN."""
    cls = type(module)
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise _uninitialized_lazy(name, module)
    if cls in table:
        return table[cls], None
    if cls in _scratch_classes():
        return None, None  # already from scratch: nothing to do, nothing to report
    if cls.__name__.startswith("FrozenBatchNorm"):
        return None, ("frozen BatchNorm: a fixed per-channel affine with no batch statistics "
                      "to compute, left as it is (fuse_batchnorm folds it)")
    if isinstance(module, _BatchNorm):
        base = _inherits_torch_forward(cls)
        if base is not None and base in table:
            return table[base], None
        return None, (f"{_qualname(cls)} subclasses BatchNorm with its own forward, whose extra "
                      "behaviour would be lost; register a replacement that keeps it with "
                      "bnsurgery.register_replacement")
    return None, None


def _decide_restore(name: str, module: nn.Module) -> tuple[type | None, str | None]:
    cls = type(module)
    if cls not in _scratch_classes():
        return None, None
    origin = getattr(module, _ORIGIN, None)
    target = origin[0] if origin else _default_origin(cls)
    if target is None:
        return None, (f"{_qualname(cls)} was built directly and its counterpart (timm's "
                      "BatchNormAct classes) is not imported; import timm first")
    return target, None


def _swap(module: nn.Module, target: type, *, restoring: bool, extra: dict) -> nn.Module:
    """A ``target`` instance that takes over ``module``'s whole state.

    The state containers (parameter, buffer, child and hook dictionaries) are shared, not copied,
    so hook handles the caller holds still remove their hooks and optimizers keep their Parameter
    objects.
    """
    new = target.__new__(target)
    state = dict(module.__dict__)
    if restoring:
        _, added = state.pop(_ORIGIN, (None, ()))
        for key in added:
            state.pop(key, None)
    else:
        origin = state.get(_ORIGIN)
        added = tuple(key for key in extra if key not in state)
        if origin is None:
            state[_ORIGIN] = (type(module), added)
        else:  # a second swap (e.g. to SyncBatchNorm): keep the first origin
            state[_ORIGIN] = (origin[0], tuple(sorted(set(origin[1]) | set(added))))
        state.update(extra)
    new.__dict__.update(state)
    return new


def _walk(model: nn.Module, decide: Callable, apply: bool, restoring: bool, extra: dict
          ) -> tuple[nn.Module, ReplacementPlan]:
    """Visit every module once (shared modules stay shared), deciding and optionally swapping."""
    replaced: list[ReplacementRecord] = []
    skipped: dict[str, str] = {}
    swapped: dict[int, nn.Module] = {}

    def visit(name: str, module: nn.Module) -> nn.Module:
        if id(module) in swapped:
            return swapped[id(module)]
        target, reason = decide(name, module)
        result = module
        if target is not None:
            replaced.append(ReplacementRecord(name, _qualname(type(module)), _qualname(target)))
            if apply:
                result = _swap(module, target, restoring=restoring, extra=extra)
        elif reason is not None:
            skipped[name] = reason
        swapped[id(module)] = result
        # _modules, not named_children(): the latter yields a module registered under two names
        # (self.alias_bn = self.bn) once, and the other name would keep the old class.
        for child_name, child in list(result._modules.items()):
            if child is None:
                continue
            new_child = visit(f"{name}.{child_name}" if name else child_name, child)
            if apply and new_child is not child:
                result._modules[child_name] = new_child
        return result

    root = visit("", model)
    return root, ReplacementPlan(tuple(replaced), skipped)


def _check_model(model: object, function: str) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidInputError(format_message(
            f"{function} needs a torch.nn.Module", where="model", got=type(model).__name__,
            expected="an nn.Module instance"))


def plan_replacement(model: nn.Module, *, sync: bool = False) -> ReplacementPlan:
    """What :func:`replace_batchnorm` would swap and skip, without changing anything.

    Args:
        model: The model to inspect.
        sync: Plan a conversion to :class:`bnsurgery.SyncBatchNorm`.

    Returns:
        The plan.
    """
    _check_model(model, "plan_replacement")
    table = _forward_table(sync)
    return _walk(model, lambda n, m: _decide_replace(n, m, table), False, False, {})[1]


def replace_batchnorm(model: nn.Module, *, inplace: bool = False, sync: bool = False,
                      process_group: object = None, strict: bool = False) -> nn.Module:
    """Swap every BatchNorm layer of ``model`` for bnsurgery's from-scratch one.

    Swapped: ``torch.nn.BatchNorm1d/2d/3d``, initialised ``LazyBatchNorm*`` (which have become
    plain BatchNorms), ``torch.nn.SyncBatchNorm`` (to :class:`bnsurgery.SyncBatchNorm`), timm's
    ``BatchNormAct2d`` (to :class:`bnsurgery.BatchNormAct2d`, activation and dropout kept),
    subclasses that do not change the computation, and classes given to
    :func:`register_replacement`. Other BatchNorm-like layers are left alone and reported: each
    one is logged as a warning, and ``strict=True`` turns them into an error.

    Args:
        model: The model, in any mode, on any device.
        inplace: Swap inside ``model`` itself (its Parameter objects stay in place, so an
            optimizer built on it keeps working). By default a deep copy is swapped and
            ``model`` is left untouched.
        sync: Swap to :class:`bnsurgery.SyncBatchNorm` instead, for distributed training.
        process_group: The process group the synced layers reduce over (``None``: the world).
        strict: Raise if any BatchNorm-like layer cannot be swapped.

    Returns:
        The model with swapped layers (``model`` itself when ``inplace``).

    Raises:
        ReplacementError: An uninitialised lazy BatchNorm, a layer that cannot be swapped with
            ``strict=True``, or ``sync=True`` without bnsurgery's SyncBatchNorm available.
    """
    _check_model(model, "replace_batchnorm")
    if sync and _sync_classes() is None:
        raise ReplacementError(format_message(
            "replace_batchnorm(sync=True) needs bnsurgery.sync_batchnorm, which failed to import",
            hint="reinstall bnsurgery"))
    table = _forward_table(sync)
    decide = lambda name, module: _decide_replace(name, module, table)  # noqa: E731
    plan = _walk(model, decide, False, False, {})[1]
    _report_skipped(plan, strict, "replaced")
    if not inplace:
        model = copy.deepcopy(model)
    extra = {"process_group": process_group} if sync else {}
    model, plan = _walk(model, decide, True, False, extra)
    logger.info("replace_batchnorm: %d layer(s) swapped", len(plan.replaced))
    return model


def restore_batchnorm(model: nn.Module, *, inplace: bool = False, strict: bool = False
                      ) -> nn.Module:
    """Undo :func:`replace_batchnorm`: every bnsurgery BatchNorm becomes its original class again.

    Layers swapped in by :func:`replace_batchnorm` get back the exact class they had (a timm
    ``BatchNormAct2d``, a subclass, a SyncBatchNorm ...), with the same state, so the restored
    model computes bit-identical outputs to the model before replacement. bnsurgery layers built
    directly become the matching torch class. This is also the inverse torch lacks for
    ``SyncBatchNorm``: a BatchNorm2d converted with ``sync=True`` comes back as a BatchNorm2d.

    Args:
        model: The model.
        inplace: Restore inside ``model`` itself instead of a deep copy.
        strict: Raise if any bnsurgery layer cannot be restored.

    Returns:
        The restored model (``model`` itself when ``inplace``).

    Raises:
        ReplacementError: A layer cannot be restored and ``strict=True``.
    """
    _check_model(model, "restore_batchnorm")
    plan = _walk(model, _decide_restore, False, True, {})[1]
    _report_skipped(plan, strict, "restored")
    if not inplace:
        model = copy.deepcopy(model)
    return _walk(model, _decide_restore, True, True, {})[0]


def _report_skipped(plan: ReplacementPlan, strict: bool, verb: str) -> None:
    if not plan.skipped:
        return
    listing = "\n".join(f"  {name or '<model>'}: {reason}" for name, reason in plan.skipped.items())
    if strict:
        raise ReplacementError(
            f"{len(plan.skipped)} BatchNorm-like layer(s) cannot be {verb}:\n{listing}\n"
            "Hint: pass strict=False to leave them as they are, or register a replacement with "
            "bnsurgery.register_replacement")
    warnings.warn(f"{len(plan.skipped)} BatchNorm-like layer(s) left as they are:\n{listing}",
                  stacklevel=3)
