"""The input shapes an ONNX file declares, and a check of a requested shape against them.

``bnsurgery validate MODEL FILE.onnx`` takes its default ``--input-shape`` from the file, and
refuses a shape the file cannot take as bad input before anything runs, instead of letting
onnxruntime fail mid-check with a message about a dimension index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from bnsurgery._lazy import require
from bnsurgery.errors import InvalidInputError, format_message

__all__ = ["check_input_shape", "format_shape", "onnx_input_shapes"]

#: A declared dimension: its size, or ``None`` when it is symbolic (a dynamic batch axis).
Dim = int | None


def onnx_input_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[Dim, ...]]:
    """Name and declared shape of each graph input of the ONNX file at ``path``.

    Initializers listed as inputs (older exporters do that) are left out; weights stored in
    external data files are not read.

    Raises:
        InvalidInputError: The file is not a readable ONNX model.
        MissingDependencyError: onnx is not installed.
    """
    onnx = require("onnx", purpose="Reading an ONNX file's input shapes")
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError ...
        raise InvalidInputError(format_message(
            "The file is not a readable ONNX model", where=os.fspath(path),
            got=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            expected="a .onnx file", hint="check that it is not truncated")) from exc
    weights = {initializer.name for initializer in model.graph.initializer}
    shapes: dict[str, tuple[Dim, ...]] = {}
    for value in model.graph.input:
        if value.name in weights:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                   for d in dims)
    return shapes


def format_shape(shape: Sequence[Dim]) -> str:
    """``1,3,32,32``; a symbolic dimension shows as ``N``."""
    return ",".join("N" if d is None else str(d) for d in shape)


def check_input_shape(declared: Sequence[Dim], requested: Sequence[int], *, where: str,
                      hint: str) -> None:
    """Refuse ``requested`` when its rank or a fixed dimension differs from ``declared``.

    Raises:
        InvalidInputError: Saying "the file expects 1,3,32,32, got 1,3,224,224".
    """
    fits = len(declared) == len(requested) and all(
        d is None or d == r for d, r in zip(declared, requested, strict=True))
    if not fits:
        raise InvalidInputError(format_message(
            f"The input shape does not fit the ONNX file: the file expects "
            f"{format_shape(declared)}, got {format_shape(requested)}", where=where,
            hint=hint))
