"""Swap the BatchNorm layers of an existing model for bnsurgery's, and back, losing nothing.

A swap changes only the class of a layer object: the new module takes over the old one's whole
state (parameters, buffers, child modules, hooks, the training flag, any extra attribute), so
values, dtypes, devices, ``requires_grad``, ``state_dict`` keys and the very Parameter objects an
optimizer holds all survive. The original class is recorded on the swapped module, which is what
lets :func:`restore_batchnorm` give back a model that computes bit-identical outputs.

Which classes are swapped, and for what, is decided by *exact type* in the one class registry
(:mod:`bnsurgery._bn_registry`), never by a bare ``isinstance``: a BatchNorm subclass with
behaviour of its own (timm's ``BatchNormAct2d`` applies dropout and an activation after
normalising) must be swapped for a class that keeps that behaviour, or not at all. The class
swapped in subclasses the replaced class too, so ``isinstance`` checks elsewhere keep working.
Layers that are left alone are reported with the reason.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from bnsurgery._bn_registry import (
    ReplacementHandle,
    add_replacement,
    batchnorm_kind,
    default_restore_class,
    is_bnsurgery_class,
    looks_like_batchnorm,
    swap_class,
)
from bnsurgery.copying import copy_model
from bnsurgery.errors import InvalidInputError, ReplacementError, format_message
from bnsurgery.results import JsonResult

__all__ = [
    "ReplacementHandle",
    "ReplacementPlan",
    "ReplacementRecord",
    "convert_sync_batchnorm",
    "plan_replacement",
    "register_replacement",
    "replace_batchnorm",
    "restore_batchnorm",
]

logger = logging.getLogger(__name__)

#: Attribute set on a swapped module: ``(original class, attribute names the swap added)``.
_ORIGIN = "_bnsurgery_origin"


@dataclass(frozen=True)
class ReplacementRecord(JsonResult):
    """One layer that is (or would be) swapped.

    Attributes:
        name: Qualified name of the layer in the model (``""`` for the model itself).
        source: Fully qualified class name before the swap.
        target: Fully qualified class name after the swap.
    """

    name: str
    source: str
    target: str


@dataclass(frozen=True)
class ReplacementPlan(JsonResult):
    """What a replacement (or restoration) does to a model.

    Attributes:
        replaced: The layers swapped, in module order.
        skipped: BatchNorm-like layers left alone, qualified name -> reason in plain words.
    """

    replaced: tuple[ReplacementRecord, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.replaced)} layer(s) swapped, {len(self.skipped)} left alone"]
        lines += [f"  swap  {r.name or '<model>'}: {r.source} -> {r.target}"
                  for r in self.replaced]
        lines += [f"  skip  {name or '<model>'}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_replacement(source: type, target: type) -> ReplacementHandle:
    """Teach :func:`replace_batchnorm` to swap ``source`` layers for ``target``, undoably.

    Use it for your own BatchNorm subclasses: ``target`` must compute what ``source`` computes,
    keep its state in the same attributes (it is given the source layer's whole state without its
    ``__init__`` being called) and normalise with bnsurgery's maths, typically by subclassing
    :class:`bnsurgery.BatchNorm2d` and repeating the subclass's extra steps. A swapped layer is an
    instance of both ``target`` and ``source``; restoring gives back ``source``.

    The replacement holds until the returned handle is removed, so it does not leak into other
    code (tests, other models)::

        with bnsurgery.register_replacement(MyBN, MyScratchBN):
            model = bnsurgery.replace_batchnorm(model)

    For a single call, ``replace_batchnorm(model, mapping={MyBN: MyScratchBN})`` needs no
    registration at all.

    Args:
        source: The exact class to swap out.
        target: The class to swap in.

    Returns:
        A handle: ``handle.remove()`` (or leaving its ``with`` block) undoes the registration.

    Raises:
        InvalidInputError: Either argument is not an ``nn.Module`` subclass.
    """
    _check_mapping({source: target}, "register_replacement")
    return add_replacement(source, target)


def _check_mapping(mapping: Mapping[type, type], function: str) -> None:
    for source, target in mapping.items():
        for label, cls in (("source", source), ("target", target)):
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise InvalidInputError(format_message(
                    f"{function} takes module classes", where=label, got=repr(cls),
                    expected="a subclass of torch.nn.Module",
                    hint="pass the classes themselves, e.g. {MyBatchNorm: MyScratchBatchNorm}"))


def _original_class(module: nn.Module) -> type:
    """The class a layer stands for: the one a swap recorded, else its own."""
    origin = getattr(module, _ORIGIN, None)
    return origin[0] if origin is not None else type(module)


def _uninitialized_lazy(name: str, module: nn.Module) -> ReplacementError:
    return ReplacementError(format_message(
        f"{type(module).__name__} '{name or '<model>'}' has not been initialised",
        got="uninitialised parameters (num_features is not known yet)",
        expected="a layer that has seen one forward pass",
        hint="run one forward pass on an example input before replacing"))


def _decide_replace(name: str, module: nn.Module, *, sync: bool,
                    mapping: Mapping[type, type] | None) -> tuple[type | None, str | None]:
    """(target class, None) to swap this module, (None, reason) to skip, (None, None) if not BN
    or nothing to do."""
    cls = type(module)
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise _uninitialized_lazy(name, module)
    source = _original_class(module)
    target = swap_class(source, sync=sync, mapping=mapping)
    if target is not None:
        return (None, None) if target is cls else (target, None)
    if is_bnsurgery_class(cls):
        return None, None  # already from scratch: nothing to do, nothing to report
    kind = batchnorm_kind(module)
    if kind is not None and kind.frozen:
        return None, ("frozen BatchNorm: a fixed per-channel affine with no batch statistics "
                      "to compute, left as it is (fuse_batchnorm folds it)")
    if isinstance(module, _BatchNorm):
        return None, (f"{_qualname(cls)} subclasses BatchNorm with its own forward, whose extra "
                      "behaviour would be lost; register a replacement that keeps it with "
                      "bnsurgery.register_replacement or pass mapping=")
    if looks_like_batchnorm(module):
        return None, (f"{_qualname(cls)} looks like a BatchNorm (running statistics) but is not "
                      "one bnsurgery knows, left as it is")
    return None, None


def _decide_restore(name: str, module: nn.Module) -> tuple[type | None, str | None]:
    cls = type(module)
    if not is_bnsurgery_class(cls):
        return None, None
    origin = getattr(module, _ORIGIN, None)
    target = origin[0] if origin else default_restore_class(cls)
    if target is None:
        return None, (f"{_qualname(cls)} was built directly and the class it stands in for "
                      "(timm's BatchNormAct classes, or a registered source) is not known; "
                      "import timm first")
    return target, None


def _swap(module: nn.Module, target: type, *, restoring: bool, extra: dict[str, object]
          ) -> nn.Module:
    """A ``target`` instance that takes over ``module``'s whole state.

    The state containers (parameter, buffer, child and hook dictionaries) are shared, not copied,
    so hook handles the caller holds still remove their hooks and optimizers keep their Parameter
    objects.
    """
    module_class: type[nn.Module] = target
    new = module_class.__new__(module_class)
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


#: Per module (qualified name, module): the class to swap in, or ``None`` and why not.
_Decide = Callable[[str, nn.Module], tuple[type | None, str | None]]


def _walk(model: nn.Module, decide: _Decide, *, apply: bool, restoring: bool,
          extra: dict[str, object] | None = None) -> tuple[nn.Module, ReplacementPlan]:
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
                result = _swap(module, target, restoring=restoring, extra=extra or {})
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


def plan_replacement(model: nn.Module, *, sync: bool = False,
                     mapping: Mapping[type, type] | None = None) -> ReplacementPlan:
    """What :func:`replace_batchnorm` would swap and skip, without changing anything.

    Args:
        model: The model to inspect.
        sync: Plan a conversion to :class:`bnsurgery.SyncBatchNorm`.
        mapping: Extra swaps for this call, as for :func:`replace_batchnorm`.

    Returns:
        The plan.
    """
    _check_model(model, "plan_replacement")
    _check_mapping(mapping or {}, "plan_replacement(mapping=...)")
    decide = functools.partial(_decide_replace, sync=sync, mapping=mapping)
    return _walk(model, decide, apply=False, restoring=False)[1]


def replace_batchnorm(model: nn.Module, *, inplace: bool = False, sync: bool = False,
                      process_group: object = None, strict: bool = False,
                      mapping: Mapping[type, type] | None = None) -> nn.Module:
    """Swap every BatchNorm layer of ``model`` for bnsurgery's from-scratch one.

    Swapped: ``torch.nn.BatchNorm1d/2d/3d``, initialised ``LazyBatchNorm*`` (which have become
    plain BatchNorms), ``torch.nn.SyncBatchNorm`` (to :class:`bnsurgery.SyncBatchNorm`), timm's
    ``BatchNormAct2d`` (activation and dropout kept), subclasses that do not change the
    computation, and classes given in ``mapping`` or to :func:`register_replacement`. A swapped
    layer stays an instance of the class it replaced (timm's ``freeze_batch_norm_2d`` and
    ``convert_sync_batchnorm`` see what they saw before) and is also an instance of the
    bnsurgery class, whose forward it runs; torch's ``SyncBatchNorm`` family is the exception
    (see :class:`bnsurgery.SyncBatchNorm`). Other BatchNorm-like layers are left alone and
    reported: each one is logged as a warning, and ``strict=True`` turns them into an error.

    Args:
        model: The model, in any mode, on any device.
        inplace: Swap inside ``model`` itself (its Parameter objects stay in place, so an
            optimizer built on it keeps working). By default a deep copy is swapped and
            ``model`` is left untouched.
        sync: Swap to :class:`bnsurgery.SyncBatchNorm` instead, for distributed training.
        process_group: The process group the synced layers reduce over (``None``: the world).
        strict: Raise if any BatchNorm-like layer cannot be swapped.
        mapping: Extra swaps for this call only, exact source class -> class to swap in (see
            :func:`register_replacement` for what that class must do); they win over the
            built-in ones.

    Returns:
        The model with swapped layers (``model`` itself when ``inplace``).

    Raises:
        ReplacementError: An uninitialised lazy BatchNorm, or a layer that cannot be swapped
            with ``strict=True``.
        InvalidInputError: ``model`` is not a module, or ``mapping`` holds something else than
            module classes.
    """
    _check_model(model, "replace_batchnorm")
    _check_mapping(mapping or {}, "replace_batchnorm(mapping=...)")
    decide = functools.partial(_decide_replace, sync=sync, mapping=mapping)
    plan = _walk(model, decide, apply=False, restoring=False)[1]
    _report_skipped(plan, strict, "replaced")
    if not inplace:
        model = copy_model(model, what="replace_batchnorm")
    extra = {"process_group": process_group} if sync else {}
    model, plan = _walk(model, decide, apply=True, restoring=False, extra=extra)
    logger.info("replace_batchnorm: %d layer(s) swapped", len(plan.replaced))
    return model


def convert_sync_batchnorm(module: nn.Module, process_group: object = None) -> nn.Module:
    """Convert every BatchNorm of ``module`` to bnsurgery's synced layers, in place.

    The counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, whose layers refuse CPU
    tensors: this is ``replace_batchnorm(module, inplace=True, sync=True)``, which also keeps
    timm's activation-carrying BatchNorms intact and is undone by :func:`restore_batchnorm`.

    Args:
        module: The model (or a single BatchNorm layer).
        process_group: The group the layers reduce over; ``None`` for the whole world.

    Returns:
        The converted module (a new object when ``module`` itself was a BatchNorm).
    """
    return replace_batchnorm(module, inplace=True, sync=True, process_group=process_group)


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
    plan = _walk(model, _decide_restore, apply=False, restoring=True)[1]
    _report_skipped(plan, strict, "restored")
    if not inplace:
        model = copy_model(model, what="restore_batchnorm")
    return _walk(model, _decide_restore, apply=True, restoring=True)[0]


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
