"""The one error hierarchy of bnsurgery.

Every error a user can cause derives from :class:`BnSurgeryError` *and* from the builtin it
naturally is (``ValueError``, ``TypeError``, ...), so callers may catch either. Messages follow one
shape: what failed, where (a module's qualified name or a file), the offending value, what was
expected, then a line starting with ``Hint:`` that says how to fix it. :func:`format_message`
builds that shape so every raise site reads the same.
"""

from __future__ import annotations

__all__ = [
    "BackendRunError",
    "BatchNormDtypeError",
    "BatchNormRuntimeError",
    "BatchNormTypeError",
    "BnSurgeryError",
    "DistributedRunError",
    "ExportError",
    "ExportMismatchError",
    "FileWriteError",
    "FusionError",
    "IncompatibleModuleError",
    "InvalidInputError",
    "KernelUnavailableError",
    "MissingDependencyError",
    "NonFiniteReferenceError",
    "NumericMismatchError",
    "ReplacementError",
    "RunTimeoutError",
    "UnsafeFileError",
    "format_message",
]


def format_message(what: str, *, where: str | None = None, got: object = None,
                   expected: object = None, hint: str | None = None) -> str:
    """Build a message in the house shape: what, where, got vs expected, then a hint.

    Args:
        what: One sentence saying what failed.
        where: The module qualified name, file or argument the problem is in.
        got: The offending value (omitted when ``None``).
        expected: What would have been accepted (omitted when ``None``).
        hint: How to fix it; rendered on its own line as ``Hint: ...``.

    Returns:
        The formatted message.
    """
    text = what.rstrip(".")
    if where:
        text += f" (at {where})"
    text += "."
    if got is not None or expected is not None:
        parts = []
        if got is not None:
            parts.append(f"got {got}")
        if expected is not None:
            parts.append(f"expected {expected}")
        joined = "; ".join(parts)
        text += " " + joined[0].upper() + joined[1:] + "."
    if hint:
        text += f"\nHint: {hint}"
    return text


class BnSurgeryError(Exception):
    """Base class of every error bnsurgery raises on purpose."""


class InvalidInputError(BnSurgeryError, ValueError):
    """An argument or tensor has the wrong shape, rank, dtype or value."""


class BatchNormRuntimeError(InvalidInputError, RuntimeError):
    """A batch_norm argument torch's own kernel rejects with ``RuntimeError``.

    A channel-count mismatch, missing running statistics in evaluation mode, running statistics
    that require grad: ``except RuntimeError`` written for torch's BatchNorm catches it too.
    """


class BatchNormTypeError(InvalidInputError, TypeError):
    """A batch_norm input that is not a tensor, which torch rejects with ``TypeError``."""


class BatchNormDtypeError(InvalidInputError, NotImplementedError):
    """A batch_norm input of a non-float dtype, which torch rejects with ``NotImplementedError``."""


class KernelUnavailableError(InvalidInputError, RuntimeError):
    """A BatchNorm kernel that was asked for by name (``BNSURGERY_KERNEL``) cannot run here."""


class NonFiniteReferenceError(InvalidInputError):
    """The original model's own output is NaN or infinite, so nothing can be compared with it."""


class IncompatibleModuleError(BnSurgeryError, TypeError):
    """A module is of a type the operation cannot handle."""


class ReplacementError(BnSurgeryError, RuntimeError):
    """A BatchNorm layer could not be swapped (or swapped back)."""


class FusionError(BnSurgeryError, RuntimeError):
    """BatchNorm folding could not be done as asked (raised by ``strict=True``)."""


class ExportError(BnSurgeryError, RuntimeError):
    """Exporting a model (ONNX, TensorRT, torch.export) failed."""


class BackendRunError(BnSurgeryError, RuntimeError):
    """A backend (onnxruntime) loaded a file but failed to run it on the inputs given."""


class DistributedRunError(BnSurgeryError, RuntimeError):
    """Another process of a distributed run failed its part of a collective step."""


class NumericMismatchError(BnSurgeryError, RuntimeError):
    """Two models that should compute the same numbers do not."""


class ExportMismatchError(ExportError, NumericMismatchError):
    """An exported file does not compute what the original model computes (it is not written).

    Both an export failure and a numeric mismatch: ``except ExportError`` catches it, and the
    command line exits with the mismatch code (1), not the bad-input code (2).
    """


class UnsafeFileError(BnSurgeryError, ValueError):
    """A file would need arbitrary code to be unpickled to load; it was refused."""


class MissingDependencyError(BnSurgeryError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class FileWriteError(BnSurgeryError, OSError):
    """An output file could not be written (full disk, read-only folder, a file in the way).

    The message names the destination the caller asked for, never a temporary file.
    """


class RunTimeoutError(BnSurgeryError, TimeoutError):
    """A run (e.g. of an ONNX file in onnxruntime) did not finish within its time limit."""
