"""Say where a model's output first becomes NaN or infinite.

A comparison needs a finite reference: when the original model itself returns NaN or Inf, every
candidate "fails" and the first divergence found is some layer after the one that overflowed.
:func:`first_non_finite` runs the model once with forward hooks and names the first module whose
output is non-finite although everything it read was finite; :func:`require_finite_reference`
raises :class:`~bnsurgery.errors.NonFiniteReferenceError` (a bad-input error, exit 2 in the
CLI) with that location.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bnsurgery.errors import NonFiniteReferenceError, format_message

__all__ = ["first_non_finite", "non_finite_outputs", "require_finite_reference"]


def _tensors(obj: object, depth: int = 0) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if depth > 6:
        return []
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item, depth + 1)]
    return []


def _finite(tensors: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors
               if t.is_floating_point() or t.is_complex())


def non_finite_outputs(outputs: Sequence[tuple[str, Tensor]]) -> list[str]:
    """Names of the outputs holding a NaN or an infinity."""
    return [name for name, tensor in outputs if not _finite([tensor])]


def first_non_finite(model: nn.Module, inputs: Sequence[object]) -> str | None:
    """Where ``model``'s forward first produces a NaN or an infinity from finite inputs.

    Runs a deep copy of the model (the original is not touched), hooking every module; the first
    module, in call order, whose output is non-finite while its inputs were finite is the answer.

    Args:
        model: The model.
        inputs: Positional forward arguments.

    Returns:
        A phrase such as ``"module 'layer2.conv' (Conv2d)"``, ``"the model inputs"`` when an
        input is already non-finite, ``"code outside any module (after 'fc')"`` when no module
        produced it, or ``None`` when the run is finite (or cannot be repeated).
    """
    if not _finite(_tensors(list(inputs))):
        return "the model inputs"
    try:
        work = copy.deepcopy(model)
        args = copy.deepcopy(tuple(inputs))
    except Exception:  # noqa: BLE001 - locating is best effort; the caller still raises
        return None
    found: list[str] = []
    last: list[str] = []
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            last[:] = [name]
            if not found and _finite(_tensors(list(args))) and not _finite(_tensors(output)):
                found.append(f"module '{name}' ({type(module).__name__})")
        return hook

    for name, module in work.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook_for(name)))
    try:
        with torch.no_grad():
            output = work(*args)
    except Exception:  # noqa: BLE001 - locating is best effort
        return None
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return found[0]
    if not _finite(_tensors(output)):
        after = f" (after '{last[0]}')" if last else ""
        return f"code outside any module{after}"
    return None


def require_finite_reference(model: nn.Module, inputs: Sequence[object],
                             outputs: Sequence[tuple[str, Tensor]], *,
                             what: str = "the original model") -> None:
    """Raise when the reference ``outputs`` of ``model`` on ``inputs`` are not finite.

    Raises:
        NonFiniteReferenceError: Some output holds NaN or Inf; the message names the outputs and
            the module where the values first became non-finite.
    """
    bad = non_finite_outputs(outputs)
    if not bad:
        return
    where = first_non_finite(model, inputs) or "an unknown place (the run could not be repeated)"
    shapes = [tuple(t.shape) for t in _tensors(list(inputs))]
    worst = [n for n, t in outputs if n in bad and bool(torch.isnan(t).any())]
    kind = "NaN" if worst else "infinite values"
    raise NonFiniteReferenceError(format_message(
        f"The reference is not finite: {what} returns {kind} in {', '.join(bad[:3])}, so no "
        "candidate can be compared with it; the values first become non-finite in " + where,
        where=where if where.startswith("module") else None,
        got=f"inputs of shapes {shapes}", expected="finite outputs",
        hint="check the inputs and the weights or BatchNorm statistics of that layer (a zero "
             "running_var, an overflow in float16), then compare again"))


