"""Lazy imports for heavy optional dependencies.

``import bnsurgery`` must import torch and nothing else heavy: onnx, onnxruntime, torch_tensorrt
and matplotlib load on first use through :func:`require`, which turns a missing package into a
:class:`~bnsurgery.errors.MissingDependencyError` naming the extra that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from bnsurgery.errors import MissingDependencyError

__all__ = ["EXTRAS", "is_available", "require"]

#: Which ``pip install 'bnsurgery[extra]'`` brings each optional top-level module.
EXTRAS: dict[str, str] = {
    "onnx": "bnsurgery",
    "onnxscript": "bnsurgery",
    "onnxruntime": "bnsurgery",
    "safetensors": "bnsurgery",
    "torchvision": "bnsurgery[vision]",
    "timm": "bnsurgery[vision]",
    "torch_tensorrt": "bnsurgery[gpu]",
    "matplotlib": "bnsurgery[plot]",
}


def require(name: str, *, purpose: str) -> ModuleType:
    """Import ``name`` or raise an error that says which extra to install.

    Args:
        name: The module to import, e.g. ``"onnxruntime"`` or ``"matplotlib.pyplot"``.
        purpose: What the caller needs it for, quoted in the error.

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: The module (or one it needs) cannot be imported.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        extra = EXTRAS.get(top, top)
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{top}', which could not be imported "
            f"({exc.__class__.__name__}: {exc}).\nHint: pip install '{extra}'"
        ) from exc


def is_available(name: str) -> bool:
    """Whether ``name`` can be imported, without raising."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
