"""The explicit registry of BatchNorm-like classes that folding understands.

Folding deletes a layer's computation, so it is only correct for classes whose forward is known to
be exactly ``x * scale + shift`` (plus, for norm+act layers, a dropout and an activation applied
afterwards, which must survive the fold). Those classes are matched by **exact type**: timm's
``BatchNormAct2d`` subclasses ``nn.BatchNorm2d``, and a bare ``isinstance(m, nn.BatchNorm2d)``
would fold it and silently drop its activation. Any other ``_BatchNorm`` subclass is reported as
unknown and left alone.

Optional libraries (torchvision, timm) and the sibling modules ``bnsurgery.batchnorm`` and
``bnsurgery.sync_batchnorm`` are never imported here: their classes are looked up in
``sys.modules``. A model can only contain an instance of a class whose module is already loaded,
so this sees every class that matters, costs nothing, and works when a package is absent.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BatchNormKind", "batchnorm_kind", "looks_like_batchnorm", "static_skip_reason"]


@dataclass(frozen=True)
class BatchNormKind:
    """How one BatchNorm-like class behaves, as far as folding is concerned.

    Attributes:
        cls: The exact class.
        label: Its dotted name for reports.
        frozen: The class always normalises with its stored statistics (no training mode).
        keeps: Child modules the forward applies after normalising, in order; they stay in the
            model after the normalisation is folded away.
    """

    cls: type
    label: str
    frozen: bool = False
    keeps: tuple[str, ...] = ()


# (module, class name, frozen, kept children). Order only matters for duplicates (timm re-exports
# torchvision's FrozenBatchNorm2d), where the first label wins.
_ENTRIES: tuple[tuple[str, str, bool, tuple[str, ...]], ...] = (
    ("torch.nn", "BatchNorm1d", False, ()),
    ("torch.nn", "BatchNorm2d", False, ()),
    ("torch.nn", "BatchNorm3d", False, ()),
    ("torch.nn", "SyncBatchNorm", False, ()),
    ("torchvision.ops.misc", "FrozenBatchNorm2d", True, ()),
    ("timm.layers.norm_act", "BatchNormAct2d", False, ("drop", "act")),
    ("timm.layers.norm_act", "SyncBatchNormAct", False, ("drop", "act")),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d", True, ("drop", "act")),
    ("timm.layers.norm_act", "FrozenBatchNorm2d", True, ()),
    ("timm.layers", "FrozenBatchNorm2d", True, ()),
    ("bnsurgery.batchnorm", "BatchNorm1d", False, ()),
    ("bnsurgery.batchnorm", "BatchNorm2d", False, ()),
    ("bnsurgery.batchnorm", "BatchNorm3d", False, ()),
    ("bnsurgery.batchnorm", "BatchNormAct2d", False, ("drop", "act")),
    ("bnsurgery.sync_batchnorm", "SyncBatchNorm", False, ()),
    ("bnsurgery.sync_batchnorm", "SyncBatchNormAct", False, ("drop", "act")),
)


def _registry() -> dict[type, BatchNormKind]:
    kinds: dict[type, BatchNormKind] = {}
    for module_name, class_name, frozen, keeps in _ENTRIES:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and cls not in kinds:
            label = f"{cls.__module__}.{cls.__qualname__}"
            kinds[cls] = BatchNormKind(cls=cls, label=label, frozen=frozen, keeps=keeps)
    return kinds


def batchnorm_kind(module: nn.Module) -> BatchNormKind | None:
    """The registry entry for ``type(module)`` exactly, or ``None`` for any other class."""
    return _registry().get(type(module))


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
