"""The one explicit registry of BatchNorm-like classes: what each is, what replaces it, how back.

Every part of bnsurgery that must tell BatchNorm classes apart looks them up here, by **exact
type**: replacement (which bnsurgery class computes the same, synchronised or not, and which
class a layer built directly restores to), folding (which classes are exactly ``x * scale +
shift``, which children survive the fold, which never train) and pair discovery (the input rank a
class accepts). timm's ``BatchNormAct2d`` subclasses ``nn.BatchNorm2d`` and applies a dropout and
an activation after normalising, so a bare ``isinstance(m, nn.BatchNorm2d)`` would fold it or swap
it and silently drop its activation.

A swapped layer stays an instance of the class it replaced: the class swapped in is a subclass of
*both* the bnsurgery class (first in the method order, so its forward runs) and the source class
(so every ``isinstance`` check in other code, timm's ``freeze_batch_norm_2d`` and
``convert_sync_batchnorm`` included, still sees what it saw). Such classes are made once per pair
and cached; :func:`swap_class` returns them.

Optional libraries (torchvision, timm) are never imported here: their classes are looked up in
``sys.modules``. A model can only contain an instance of a class whose module is already loaded,
so this sees every class that matters, costs nothing, and works when a package is absent.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from bnsurgery import batchnorm as scratch
from bnsurgery import sync_batchnorm as synced
from bnsurgery.errors import ReplacementError, format_message

__all__ = [
    "BatchNormKind",
    "ReplacementHandle",
    "add_replacement",
    "batchnorm_input_rank",
    "batchnorm_kind",
    "default_restore_class",
    "is_bnsurgery_class",
    "looks_like_batchnorm",
    "static_skip_reason",
    "swap_class",
]


@dataclass(frozen=True)
class BatchNormKind:
    """One row of the registry: how one exact BatchNorm-like class is handled.

    Attributes:
        cls: The exact class.
        label: Its dotted name for reports.
        frozen: The class always normalises with its stored statistics (no training mode).
        keeps: Child modules the forward applies after normalising, in order; they survive both
            replacement and folding.
        input_rank: The only input rank the class accepts, where it has one.
        scratch: The bnsurgery class that computes what ``cls`` computes (``None``: never
            swapped; ``cls`` itself for bnsurgery's own classes).
        synced: The synchronised bnsurgery class for ``replace_batchnorm(sync=True)``.
        restore: For bnsurgery's own classes, the class a layer built directly (not swapped in)
            restores to; ``None`` for source classes, which swapped layers record themselves.
        subclass_source: The class swapped in also subclasses ``cls``. False only for torch's
            ``SyncBatchNorm`` family: DistributedDataParallel refuses every instance of it in a
            CPU model, and running on CPU is what bnsurgery's synced layers are for.
    """

    cls: type
    label: str
    frozen: bool = False
    keeps: tuple[str, ...] = ()
    input_rank: int | None = None
    scratch: type | None = None
    synced: type | None = None
    restore: type | None = None
    subclass_source: bool = True


_ACT = ("drop", "act")
_TIMM = "timm.layers.norm_act"

#: One row of the table below.
_Row = tuple[type | str, bool, tuple[str, ...], int | None, type | None, type | None,
             type | str | None, bool]

#: The table. A class is given as itself, or as ``"module:Class"`` for optional packages (looked
#: up in ``sys.modules`` only). Columns: source, frozen, kept children, input rank, bnsurgery
#: counterpart, synced counterpart, class a directly built layer restores to, subclass source.
#: Order only matters for duplicates (timm re-exports torchvision's FrozenBatchNorm2d): the first
#: row wins.
_TABLE: tuple[_Row, ...] = (
    (nn.BatchNorm1d, False, (), None, scratch.BatchNorm1d, synced.SyncBatchNorm, None, True),
    (nn.BatchNorm2d, False, (), 4, scratch.BatchNorm2d, synced.SyncBatchNorm, None, True),
    (nn.BatchNorm3d, False, (), 5, scratch.BatchNorm3d, synced.SyncBatchNorm, None, True),
    (nn.SyncBatchNorm, False, (), None, synced.SyncBatchNorm, synced.SyncBatchNorm, None, False),
    ("torchvision.ops.misc:FrozenBatchNorm2d", True, (), 4, None, None, None, True),
    (f"{_TIMM}:BatchNormAct2d", False, _ACT, 4, scratch.BatchNormAct2d, synced.SyncBatchNormAct,
     None, True),
    (f"{_TIMM}:SyncBatchNormAct", False, _ACT, None, synced.SyncBatchNormAct,
     synced.SyncBatchNormAct, None, False),
    (f"{_TIMM}:FrozenBatchNormAct2d", True, _ACT, 4, None, None, None, True),
    (f"{_TIMM}:FrozenBatchNorm2d", True, (), 4, None, None, None, True),
    ("timm.layers:FrozenBatchNorm2d", True, (), 4, None, None, None, True),
    (scratch.BatchNorm1d, False, (), None, scratch.BatchNorm1d, synced.SyncBatchNorm,
     nn.BatchNorm1d, True),
    (scratch.BatchNorm2d, False, (), 4, scratch.BatchNorm2d, synced.SyncBatchNorm,
     nn.BatchNorm2d, True),
    (scratch.BatchNorm3d, False, (), 5, scratch.BatchNorm3d, synced.SyncBatchNorm,
     nn.BatchNorm3d, True),
    (scratch.BatchNormAct2d, False, _ACT, 4, scratch.BatchNormAct2d, synced.SyncBatchNormAct,
     f"{_TIMM}:BatchNormAct2d", True),
    (synced.SyncBatchNorm, False, (), None, synced.SyncBatchNorm, synced.SyncBatchNorm,
     nn.SyncBatchNorm, True),
    (synced.SyncBatchNormAct, False, _ACT, None, synced.SyncBatchNormAct,
     synced.SyncBatchNormAct, f"{_TIMM}:SyncBatchNormAct", True),
)

#: Swapped-in classes made by :func:`swap_class`, (bnsurgery class, source class) -> class.
_DERIVED: dict[tuple[type, type], type] = {}
#: Rows for those classes (only where the bnsurgery class has a row itself).
_DERIVED_KINDS: dict[type, BatchNormKind] = {}


def _label(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(ref: type | str | None) -> type | None:
    if ref is None or isinstance(ref, type):
        return ref
    module_name, class_name = ref.split(":")
    module = sys.modules.get(module_name)
    cls = getattr(module, class_name, None) if module is not None else None
    return cls if isinstance(cls, type) else None


#: The table's ``"module:Class"`` references as ``(module, class)`` pairs, each once, in order:
#: what the rows depend on.
_NAMED_REFS = tuple(dict.fromkeys(
    tuple(ref.split(":")) for row in _TABLE for ref in (row[0], row[6]) if isinstance(ref, str)))
#: The rows built for the classes those references resolve to now (one entry at most).
_ROWS_CACHE: dict[tuple[type | None, ...], Mapping[type, BatchNormKind]] = {}


def _rows() -> Mapping[type, BatchNormKind]:
    """The registry's rows for the classes that can be looked up now.

    Rebuilt only when a named reference resolves differently (its package was imported or
    reloaded since): resolving the names is a few dictionary lookups, building the rows is not,
    and this is asked once per module whenever a model is walked.
    """
    modules = sys.modules
    key = tuple(getattr(modules.get(module), name, None) for module, name in _NAMED_REFS)
    rows = _ROWS_CACHE.get(key)
    if rows is None:
        _ROWS_CACHE.clear()
        rows = _ROWS_CACHE[key] = _build_rows()
    return rows


def _build_rows() -> dict[type, BatchNormKind]:
    kinds: dict[type, BatchNormKind] = {}
    for source, frozen, keeps, rank, counterpart, sync, restore, subclass in _TABLE:
        cls = _resolve(source)
        if cls is not None and cls not in kinds:
            kinds[cls] = BatchNormKind(cls=cls, label=_label(cls), frozen=frozen, keeps=keeps,
                                       input_rank=rank, scratch=counterpart, synced=sync,
                                       restore=_resolve(restore), subclass_source=subclass)
    return kinds


def batchnorm_kind(module: nn.Module) -> BatchNormKind | None:
    """The registry row for ``type(module)`` exactly, or ``None`` for any other class."""
    cls = type(module)
    return _DERIVED_KINDS.get(cls) or _rows().get(cls)


def batchnorm_input_rank(module: nn.Module) -> int | None:
    """The only input rank ``module``'s class accepts, or ``None`` (several, or unknown)."""
    kind = batchnorm_kind(module)
    return kind.input_rank if kind is not None else None


class ReplacementHandle:
    """A replacement added by ``register_replacement``; undo it with :meth:`remove`.

    Also a context manager: the replacement holds inside the ``with`` block only.
    """

    def __init__(self, source: type, target: type) -> None:
        self.source = source
        self.target = target

    def remove(self) -> None:
        """Forget this replacement (a second call does nothing)."""
        if self in _USER_REPLACEMENTS:
            _USER_REPLACEMENTS.remove(self)

    def __enter__(self) -> ReplacementHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"ReplacementHandle({_label(self.source)} -> {_label(self.target)})"


#: Replacements added by users, oldest first; the newest one for a class wins.
_USER_REPLACEMENTS: list[ReplacementHandle] = []


def add_replacement(source: type, target: type) -> ReplacementHandle:
    """Swap ``source`` layers for ``target`` until the returned handle is removed."""
    handle = ReplacementHandle(source, target)
    _USER_REPLACEMENTS.append(handle)
    return handle


def _user_target(source: type, mapping: Mapping[type, type] | None) -> type | None:
    if mapping and source in mapping:
        return mapping[source]
    for handle in reversed(_USER_REPLACEMENTS):
        if handle.source is source:
            return handle.target
    return None


def _inherits_torch_forward(cls: type) -> type | None:
    """For a BatchNorm subclass that adds nothing to the computation, its torch base class.

    Such a subclass (one that only adds attributes or methods) computes exactly what its base
    computes, so it is swapped like the base, and stays an instance of itself.
    """
    for base in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if issubclass(cls, base) and cls.forward is base.forward and (
                cls._check_input_dim is base._check_input_dim):
            return base
    return None


def _derived(target: type, source: type) -> type:
    """A class that subclasses ``target`` first (its forward runs) and ``source`` (so
    ``isinstance(layer, source)`` stays true); made once per pair."""
    if issubclass(target, source):
        return target
    key = (target, source)
    if key not in _DERIVED:
        def __init__(self: nn.Module, *args: object, **kwargs: object) -> None:
            # The source's constructor builds the state a swap would hand over, so
            # ``type(layer)(...)`` takes the arguments the replaced class takes.
            source.__init__(self, *args, **kwargs)  # type: ignore[misc]  # source is a base

        try:
            cls = type(target.__name__, (target, source), {
                "__module__": target.__module__,
                "__qualname__": f"{target.__qualname__}[{_label(source)}]",
                "__doc__": f"{_label(target)} swapped in for {_label(source)}, and an instance "
                           f"of both; built with the arguments {source.__qualname__} takes.",
                "__init__": __init__,
                "__reduce_ex__": _reduce_swapped,
            })
        except TypeError as exc:  # no consistent method order for the two classes
            raise ReplacementError(format_message(
                f"{_label(target)} cannot stand in for {_label(source)}",
                got=str(exc), expected="two classes a common subclass can derive from",
                hint=f"make the replacement subclass {source.__qualname__} itself")) from exc
        _DERIVED[key] = cls
        row = _rows().get(target)
        if row is not None:
            _DERIVED_KINDS[cls] = BatchNormKind(
                cls=cls, label=_label(cls), frozen=row.frozen, keeps=row.keeps,
                input_rank=row.input_rank, scratch=row.scratch, synced=row.synced,
                restore=source)
    return _DERIVED[key]


def _reduce_swapped(self: nn.Module, protocol: int) -> tuple[object, ...]:
    """Pickle a swapped layer by its two classes: the made class has no importable name."""
    target, source = next(key for key, cls in _DERIVED.items() if cls is type(self))
    state = self.__getstate__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    return _rebuild_swapped, (target, source), state


def _rebuild_swapped(target: type, source: type) -> nn.Module:
    cls: type[nn.Module] = _derived(target, source)
    return cls.__new__(cls)


def swap_class(source: type, *, sync: bool = False, mapping: Mapping[type, type] | None = None
               ) -> type | None:
    """The class a layer whose original class is ``source`` becomes, or ``None`` (not swapped).

    Looked up in ``mapping`` first, then in the replacements added with
    :func:`add_replacement` (newest first), then in the table; a subclass of a torch BatchNorm
    that adds nothing to the computation is swapped like its base.
    """
    subclass = True
    target = _user_target(source, mapping)
    if target is None:
        rows = _rows()
        row = rows.get(source)
        if row is None:
            base = _inherits_torch_forward(source)
            row = rows.get(base) if base is not None else None
        if row is None:
            return None
        target = row.synced if sync else row.scratch
        subclass = row.subclass_source
    if target is None:
        return None
    return _derived(target, source) if subclass else target


def default_restore_class(cls: type) -> type | None:
    """The class a bnsurgery layer restores to when it carries no record of its original class
    (it was built directly): the torch or timm class it stands in for; ``None`` if unknown."""
    kind = _DERIVED_KINDS.get(cls) or _rows().get(cls)
    return kind.restore if kind is not None else None


def is_bnsurgery_class(cls: type) -> bool:
    """True for bnsurgery's BatchNorm classes, their subclasses and the classes swapped in."""
    own = (scratch.BatchNorm1d, scratch.BatchNorm2d, scratch.BatchNorm3d, synced.SyncBatchNorm)
    return issubclass(cls, own) or cls in _DERIVED.values() or any(
        handle.target is cls for handle in _USER_REPLACEMENTS)


def looks_like_batchnorm(module: nn.Module) -> bool:
    """True for registered classes, every ``_BatchNorm`` subclass, and other classes named
    ``*BatchNorm*`` that carry running statistics (a detectron2-style ``FrozenBatchNorm2d``).

    These are the modules a fusion report accounts for: each is either folded or listed as
    skipped with a reason.
    """
    if batchnorm_kind(module) is not None or isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return ("batchnorm" in type(module).__name__.lower()
            and isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and isinstance(getattr(module, "running_var", None), torch.Tensor))


def static_skip_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be folded whatever surrounds it, in plain words; ``None`` if it can.

    Checks the class (exact registry match), the mode (a BatchNorm in training mode normalises
    with batch statistics, which no fixed weights reproduce), the presence of running statistics
    and user hooks.
    """
    kind = batchnorm_kind(module)
    cls_name = f"{type(module).__module__}.{type(module).__qualname__}"
    if kind is None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            base = next(c for c in type(module).__mro__[1:]
                        if c.__module__.startswith("torch.nn"))
            return (f"its class {cls_name} subclasses {base.__qualname__} but is not one bnsurgery "
                    "knows; its forward may do more than normalise, so it is left as it is")
        return (f"its class {cls_name} is not a BatchNorm bnsurgery knows how to fold, so it is "
                "left as it is")
    if not kind.frozen and module.training:
        return ("it is in training mode, where it normalises with batch statistics that no fixed "
                "weights reproduce; call model.eval() before fusing")
    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return ("it has no running statistics (track_running_stats=False), so it always "
                "normalises with batch statistics")
    if not (mean.is_floating_point() and var.is_floating_point()):
        return f"its running statistics have dtype {mean.dtype}, not a floating dtype"
    denominator = var.detach().double() + float(getattr(module, "eps", 0.0))
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(denominator).all())
            and bool((denominator > 0).all())):
        return ("its running statistics are not finite or running_var + eps is not positive, "
                "so it has no affine equivalent; recalibrate it")
    if module._forward_hooks or module._forward_pre_hooks:
        return ("it has forward hooks registered, which would see different tensors once it is "
                "folded away; remove the hooks first")
    return None
