"""What an ONNX file holds, read without running it: ``bnsurgery inspect model.onnx``.

Inputs and outputs with shapes and dtypes, opsets, op counts, parameter count and size,
multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul (from the shapes onnx's shape inference
finds; a symbolic dimension counts as 1), metadata, and every ``BatchNormalization`` node left
with whether it could be folded into the layer before it: decided by
:func:`bnsurgery.onnx_fold.batchnorm_fold_plan`, the rules ``bnsurgery fuse model.onnx`` folds
by, so what is reported foldable here is what ``fuse`` folds, and the rest carry the reason
``fuse`` gives. Only the file's own bytes are read: external weight files are not opened (the
decisions need shapes and dtypes, not values) and nothing is executed.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bnsurgery._lazy import require
from bnsurgery.errors import InvalidInputError, format_message
from bnsurgery.onnx_fold import FOLD_TARGETS, batchnorm_fold_plan
from bnsurgery.results import JsonResult

__all__ = ["FOLD_TARGETS", "OnnxBatchNorm", "OnnxSummary", "inspect_onnx"]


@dataclass(frozen=True)
class OnnxBatchNorm(JsonResult):
    """One ``BatchNormalization`` node and whether it folds into the node before it.

    Attributes:
        name: The node's name (its output's name when it has none).
        producer: The node before it (once the BatchNorms before it have folded), if any.
        producer_op: That node's op type.
        foldable: Whether ``bnsurgery fuse`` folds it.
        reason: ``"folds into Conv conv1"``, or why it does not (the reason ``fuse`` gives).
    """

    name: str
    producer: str | None
    producer_op: str | None
    foldable: bool
    reason: str


@dataclass(frozen=True)
class OnnxSummary:
    """What :func:`inspect_onnx` found in a file."""

    path: str
    inputs: tuple[tuple[str, str, tuple[int | str, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[int | str, ...]], ...]
    opsets: Mapping[str, int]
    op_counts: Mapping[str, int]
    parameters: int
    parameter_bytes: int
    macs: int
    macs_unknown: tuple[str, ...]
    batchnorms: tuple[OnnxBatchNorm, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form.

        Written out by hand: each input and output becomes a ``{name, dtype, shape}`` object
        rather than the tuple it is held as, and ``flops`` is reported next to ``macs``.
        """
        def tensors(items: Sequence[tuple[str, str, tuple[int | str, ...]]]
                    ) -> list[dict[str, Any]]:
            return [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in items]

        return {"path": self.path, "inputs": tensors(self.inputs),
                "outputs": tensors(self.outputs), "opsets": dict(self.opsets),
                "op_counts": dict(self.op_counts), "parameters": self.parameters,
                "parameter_bytes": self.parameter_bytes, "macs": self.macs,
                "flops": 2 * self.macs, "macs_unknown": list(self.macs_unknown),
                "batchnorms": [b.to_dict() for b in self.batchnorms],
                "metadata": dict(self.metadata)}

    def __str__(self) -> str:
        def shape(s: tuple[int | str, ...]) -> str:
            return "[" + ", ".join(str(d) for d in s) + "]"

        folds = sum(b.foldable for b in self.batchnorms)
        opsets = ", ".join(f"{domain or 'ai.onnx'} {version}"
                           for domain, version in self.opsets.items())
        lines = [f"{self.path}: opset {opsets}; "
                 f"{sum(self.op_counts.values())} nodes; {self.parameters:,} parameters "
                 f"({self.parameter_bytes / 1e6:.1f} MB); {self.macs / 1e9:.3g} GMACs "
                 f"({2 * self.macs / 1e9:.3g} GFLOPs) at batch 1"]
        lines += [f"  input  {n}: {d} {shape(s)}" for n, d, s in self.inputs]
        lines += [f"  output {n}: {d} {shape(s)}" for n, d, s in self.outputs]
        lines.append("  ops: " + ", ".join(f"{op} {n}" for op, n in self.op_counts.items()))
        if self.macs_unknown:
            lines.append(f"  MACs not counted (shapes unknown): {', '.join(self.macs_unknown)}")
        lines.append(f"  BatchNormalization nodes left: {len(self.batchnorms)}, {folds} foldable")
        lines += [f"    {b.name}: {b.reason}" for b in self.batchnorms]
        lines += [f"  metadata {k} = {v}" for k, v in self.metadata.items()]
        return "\n".join(lines)


def inspect_onnx(path: str | os.PathLike[str]) -> OnnxSummary:
    """Summarise the ONNX file at ``path`` (see the module docstring).

    Raises:
        InvalidInputError: The file does not exist or is not an ONNX model.
        MissingDependencyError: onnx is not installed.
    """
    onnx = require("onnx", purpose="Inspecting an ONNX file")
    shown = os.fspath(path)
    try:
        model = onnx.load(shown, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError ...
        raise InvalidInputError(format_message(
            "The file is not a readable ONNX model", where=shown,
            got=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            expected="a .onnx file", hint="check the path and that the file is not truncated"
        )) from exc
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # a graph onnx cannot infer still has everything but MACs
        inferred = model.graph
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    shapes: dict[str, tuple[int | str, ...]] = {}
    dtypes: dict[str, str] = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        tensor = value.type.tensor_type
        dtypes[value.name] = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else
                                   (d.dim_param or "?") for d in tensor.shape.dim)
    for name, tensor in initializers.items():
        shapes[name] = tuple(tensor.dims)

    def described(values: Any) -> tuple[tuple[str, str, tuple[int | str, ...]], ...]:
        return tuple((v.name, dtypes.get(v.name, "?"), shapes.get(v.name, ()))
                     for v in values if v.name not in initializers)

    parameters = sum(math.prod(t.dims) for t in initializers.values())
    parameter_bytes = sum(math.prod(t.dims) * _itemsize(onnx, t.data_type)
                          for t in initializers.values())
    macs, unknown = 0, []
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            count = _macs(node, shapes)
            if count is None:
                unknown.append(node.name or node.op_type)
            else:
                macs += count
    return OnnxSummary(
        path=shown, inputs=described(graph.input), outputs=described(graph.output),
        opsets={o.domain: o.version for o in model.opset_import},
        op_counts=dict(Counter(n.op_type for n in graph.node).most_common()),
        parameters=parameters, parameter_bytes=parameter_bytes, macs=macs,
        macs_unknown=tuple(unknown), batchnorms=_batchnorms(onnx, model),
        metadata={p.key: p.value for p in model.metadata_props})


def _itemsize(onnx: Any, data_type: int) -> int:
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize)
    except (KeyError, TypeError, ValueError):  # string tensors and unknown types
        return 0


def _dims(shape: Sequence[int | str]) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]  # symbolic: batch 1


def _macs(node: Any, shapes: Mapping[str, tuple[int | str, ...]]) -> int | None:
    """Multiply-accumulates of one node from its weight and output shapes, or None."""
    output = shapes.get(node.output[0])
    inputs = [shape for shape in (shapes.get(name) for name in node.input[:2]) if shape]
    if not output or len(inputs) != len(node.input[:2]):
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        weight = _dims(inputs[1])  # (Cout, Cin/groups, k...) / (Cin, Cout/groups, k...)
        if node.op_type == "Conv":
            return math.prod(_dims(output)) * math.prod(weight[1:])
        return math.prod(_dims(inputs[0])) * math.prod(weight[1:])
    first = _dims(inputs[0])
    depth = first[-1]
    if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
        depth = first[0]
    return math.prod(_dims(output)) * depth


def _batchnorms(onnx: Any, model: Any) -> tuple[OnnxBatchNorm, ...]:
    return tuple(OnnxBatchNorm(d.name, d.producer, d.producer_op, d.folds,
                               d.reason or f"folds into {d.producer_op} {d.producer}")
                 for d in batchnorm_fold_plan(onnx, model))
