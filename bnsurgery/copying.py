"""Copy a model before changing it, with an error a user can act on when it cannot be copied.

Every transformation leaves the caller's model untouched unless ``inplace=True`` is passed, so
it works on ``copy.deepcopy(model)``. A model that holds a lock, an open file, a generator or a
non-leaf tensor cannot be deep-copied, and ``deepcopy`` then raises a bare ``TypeError`` from
deep inside the object graph (``cannot pickle '_thread.lock' object``) that does not say what
to do. :func:`copy_model` says which operation needed the copy and how to avoid it.
"""

from __future__ import annotations

import copy
from typing import TypeVar

from bnsurgery.errors import IncompatibleModuleError, format_message
from bnsurgery.messages import first_line

__all__ = ["copy_model"]

_Model = TypeVar("_Model")


def copy_model(model: _Model, *, what: str, memo: dict[int, object] | None = None,
               hint: str = "pass inplace=True to work on the model itself, or make it "
                           "copyable (drop locks, open files and generators from its attributes)"
               ) -> _Model:
    """``copy.deepcopy(model, memo)``, or an :class:`IncompatibleModuleError` naming ``what``.

    Args:
        model: The model to copy.
        what: The operation that needs the copy, for the message (``"fuse_batchnorm"``).
        memo: ``deepcopy``'s memo, for objects the copy should use as they are.
        hint: How to avoid the copy, in the spelling of the interface used.

    Raises:
        IncompatibleModuleError: ``deepcopy`` failed; the original exception is its cause.
    """
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # deepcopy raises TypeError, RuntimeError, PicklingError, ...
        raise IncompatibleModuleError(format_message(
            f"{what} works on a copy of the model, and the model cannot be deep-copied",
            where=type(model).__qualname__, got=f"{type(exc).__name__}: {first_line(exc)}",
            expected="a model copy.deepcopy can copy", hint=hint)) from exc
