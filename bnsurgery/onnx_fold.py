"""Folding ``BatchNormalization`` nodes into the Conv, ConvTranspose or Gemm before them, in an
ONNX graph: ``bnsurgery fuse model.onnx -o folded.onnx``.

For files that still carry BatchNorm (legacy exports, other frameworks), when the PyTorch model
is not at hand. The arithmetic is :mod:`bnsurgery.fold`'s (float64, rounded once to the weight's
dtype); this module only decides which nodes may fold and moves initializers. A node folds only
when nothing else can see the difference: the producer's output feeds the BatchNorm alone, the
producer's weight and bias are initializers no other node uses (and no graph input overrides),
the BatchNorm is in inference form (one output, constant statistics) and the producer's
attributes allow a per-output-channel scale. Every BatchNormalization node is reported, folded or
with the reason it was not. :func:`batchnorm_fold_plan` makes these decisions without changing
anything; folding carries them out and ``bnsurgery inspect model.onnx`` reports them, so the
nodes ``inspect`` calls foldable are exactly the ones ``fuse`` folds, and the others carry the
same reasons. The folded graph is run in onnxruntime against the unfolded one
(:func:`bnsurgery.onnx_compare.compare_onnx`, the package's tolerances) before anything is
written, and it is written atomically.

Importing this module does not import torch (the arithmetic and the check import it when a node
folds): ``bnsurgery inspect model.onnx`` reads the graph through the fold plan, without torch.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bnsurgery._lazy import require
from bnsurgery.errors import FusionError, InvalidInputError, format_message
from bnsurgery.files import write_bytes
from bnsurgery.messages import first_line
from bnsurgery.results import JsonResult

if TYPE_CHECKING:
    from torch import Tensor

    from bnsurgery.report import EquivalenceReport

__all__ = [
    "FOLD_TARGETS",
    "BatchNormFoldDecision",
    "OnnxBatchNormFold",
    "OnnxFoldResult",
    "batchnorm_fold_plan",
    "fold_graph_batchnorms",
    "fold_onnx_batchnorm",
]

#: Ops a following BatchNormalization can be folded into (per output channel of their weight).
FOLD_TARGETS = ("Conv", "ConvTranspose", "Gemm")
#: Element types the fold arithmetic can round back to (numpy has no bfloat16).
_FLOAT_TYPES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class BatchNormFoldDecision(JsonResult):
    """Whether one ``BatchNormalization`` node folds, decided before anything is changed.

    Attributes:
        name: The node's name (its output's name when it has none).
        producer: The node before it (once the BatchNorms before it have folded), when there
            is one.
        producer_op: That node's op type.
        reason: Why it does not fold; ``None`` when it folds into ``producer``.
    """

    json_derived: ClassVar[tuple[str, ...]] = ("folds",)

    name: str
    producer: str | None
    producer_op: str | None
    reason: str | None

    @property
    def folds(self) -> bool:
        """Whether the node folds into its producer."""
        return self.reason is None


@dataclass(frozen=True)
class OnnxBatchNormFold(JsonResult):
    """One ``BatchNormalization`` node: folded into its producer, or why not.

    Attributes:
        name: The node's name (its output's name when it has none).
        producer: The node before it, when there is one.
        producer_op: That node's op type.
        folded: Whether the BatchNorm was folded away.
        reason: ``"folded into Conv conv1"`` or why it was kept.
    """

    name: str
    producer: str | None
    producer_op: str | None
    folded: bool
    reason: str


@dataclass(frozen=True)
class OnnxFoldResult(JsonResult):
    """What :func:`fold_onnx_batchnorm` did.

    Attributes:
        source: The file read, or ``"<ModelProto>"``.
        batchnorms: Every BatchNormalization node of the main graph, in graph order.
        check: onnxruntime comparison of the folded graph with the unfolded one; ``None`` when
            nothing was folded (the graph is unchanged).
        output: The file written; ``None`` when none was asked for or the check failed.
        model: The folded ``onnx.ModelProto`` (not part of the JSON form).
    """

    json_omitted: ClassVar[tuple[str, ...]] = ("model",)
    json_derived: ClassVar[tuple[str, ...]] = ("folded", "passed")

    source: str
    batchnorms: tuple[OnnxBatchNormFold, ...]
    check: EquivalenceReport | None
    output: str | None
    model: Any = None

    @property
    def folded(self) -> int:
        """How many BatchNormalization nodes were folded."""
        return sum(b.folded for b in self.batchnorms)

    @property
    def passed(self) -> bool:
        """The folded graph matches the unfolded one (trivially when nothing was folded)."""
        return self.check is None or self.check.passed

    def __str__(self) -> str:
        lines = [f"{self.source}: {len(self.batchnorms)} BatchNormalization nodes, "
                 f"{self.folded} folded"]
        lines += [f"  {b.name}: {b.reason}" for b in self.batchnorms]
        if self.check is not None:
            lines.append(str(self.check))
        return "\n".join(lines)


class _Graph:
    """Lookups over one graph, rebuilt after each fold (a fold changes producers).

    The fold decisions read only names, shapes and dtypes (:meth:`shape`, :meth:`dtype`,
    :meth:`data_type`), never values, so that they can be made on a graph whose initializers
    carry no data.
    """

    def __init__(self, onnx: Any, graph: Any) -> None:
        self.onnx, self.graph = onnx, graph
        self.initializers = {t.name: index for index, t in enumerate(graph.initializer)}
        self.graph_inputs = {v.name for v in graph.input}
        self.producers = {value: node for node in graph.node for value in node.output if value}
        self.consumers: Counter[str] = Counter(v.name for v in graph.output)
        for node in _all_nodes(graph):
            self.consumers.update(name for name in node.input if name)

    def constant(self, name: str) -> bool:
        """An initializer no graph input of the same name can override at run time."""
        return name in self.initializers and name not in self.graph_inputs

    def resolve(self, name: str) -> str:
        """The initializer behind a chain of Identity nodes (legacy exporters add them to share
        one copy of equal tensors); ``name`` itself when there is none."""
        seen = set()
        while name not in self.initializers and name not in seen:
            seen.add(name)
            node = self.producers.get(name)
            if node is None or node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
                break
            name = node.input[0]
        return name

    def array(self, name: str) -> Tensor:
        import torch

        proto = self.graph.initializer[self.initializers[name]]
        return torch.from_numpy(self.onnx.numpy_helper.to_array(proto).copy())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.graph.initializer[self.initializers[name]].dims)

    def data_type(self, name: str) -> int:
        return int(self.graph.initializer[self.initializers[name]].data_type)

    def dtype(self, name: str) -> str:
        proto = self.graph.initializer[self.initializers[name]]
        dtype_name: str = self.onnx.helper.tensor_dtype_to_np_dtype(proto.data_type).name
        return dtype_name

    def set_array(self, name: str, value: Tensor) -> None:
        """Store ``value`` under ``name``, replacing an initializer or adding one."""
        self.set_proto(self.onnx.numpy_helper.from_array(value.numpy(), name))

    def set_proto(self, proto: Any) -> None:
        """Store the initializer ``proto`` under its name, replacing one or adding it."""
        name = proto.name
        if name in self.initializers:
            self.graph.initializer[self.initializers[name]].CopyFrom(proto)
        else:
            self.graph.initializer.append(proto)
            self.initializers[name] = len(self.graph.initializer) - 1


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Every node, subgraphs (If/Loop/Scan bodies) included: they may read outer tensors."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def _attributes(onnx: Any, node: Any) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _label(node: Any) -> str:
    return f"{node.op_type} {node.name or node.output[0]}"


def _batchnorm_reason(g: _Graph, node: Any) -> str | None:
    """Why this BatchNormalization node cannot be folded whatever precedes it, or ``None``."""
    attrs = _attributes(g.onnx, node)
    if any(node.output[1:]) or attrs.get("training_mode", 0) or attrs.get("is_test", 1) == 0:
        return "training-mode node (it outputs or updates running statistics)"
    if attrs.get("spatial", 1) == 0:
        return "spatial=0: statistics per activation, not per channel"
    params = [g.resolve(name) for name in node.input[1:5]]
    if len(params) < 4 or not all(name in g.initializers for name in params):
        return "its scale, bias, mean or variance is computed in the graph, not an initializer"
    if not all(g.constant(name) for name in params):
        return ("its scale, bias, mean or variance is also a graph input, which a caller can "
                "override at run time (export with keep_initializers_as_inputs=False)")
    if node.domain not in ("", "ai.onnx"):
        return f"a BatchNormalization of domain {node.domain!r}, not ONNX's"
    return None


def _weight_reason(g: _Graph, producer: Any, name: str, what: str) -> str | None:
    if name not in g.initializers:
        return f"the {what} of {_label(producer)} is computed in the graph, not an initializer"
    if not g.constant(name):
        return (f"the {what} of {_label(producer)} is also a graph input, which a caller can "
                "override at run time (export with keep_initializers_as_inputs=False)")
    if g.consumers[name] != 1:
        return f"the {what} of {_label(producer)} is shared with another node"
    if g.dtype(name) not in _FLOAT_TYPES:
        return f"the {what} of {_label(producer)} is {g.dtype(name)}, not a float type"
    return None


def _out_channels(g: _Graph, producer: Any) -> tuple[int | None, str | None]:
    """The producer's output channels (its output's axis 1), or why they are not foldable."""
    attrs = _attributes(g.onnx, producer)
    weight = g.shape(producer.input[1])
    if producer.op_type == "Gemm":
        if attrs.get("transA", 0):
            return None, f"{_label(producer)} has transA=1 (only transA=0 is folded)"
        if len(weight) != 2:
            return None, f"the weight of {_label(producer)} is not 2-D"
        channels = weight[0] if attrs.get("transB", 0) else weight[1]
        if len(producer.input) > 2 and producer.input[2]:
            shape = g.shape(producer.input[2])
            if shape not in ((channels,), (1, channels)):
                return None, (f"the C of {_label(producer)} has shape {list(shape)}, not one "
                              f"value per output channel ([{channels}] or [1, {channels}])")
        return int(channels), None
    group = int(attrs.get("group", 1))
    if len(weight) < 3 or group < 1 or weight[0] % group:
        return None, (f"the weight of {_label(producer)} has shape {list(weight)}, which "
                      f"does not fit group={group}")
    if producer.op_type == "ConvTranspose":
        return weight[1] * group, None  # (in, out/group, k...): axis 1 per group
    return weight[0], None


def _fold_reason(g: _Graph, node: Any) -> tuple[Any, str | None]:
    """The producer this BatchNorm folds into, or the reason it does not."""
    reason = _batchnorm_reason(g, node)
    producer = g.producers.get(node.input[0])
    if reason is not None:
        return producer, reason
    if producer is None:
        return None, "its input is a graph input, not a layer's output"
    if producer.op_type not in FOLD_TARGETS or producer.domain not in ("", "ai.onnx"):
        return producer, f"it follows {producer.op_type}, not one of {', '.join(FOLD_TARGETS)}"
    if g.consumers[node.input[0]] != 1:
        return producer, f"the output of {_label(producer)} is also used elsewhere"
    if len(producer.output) != 1:
        return producer, f"{_label(producer)} has more than one output"
    for index, what in ((1, "weight"), (2, "bias")):
        if len(producer.input) > index and producer.input[index]:
            reason = _weight_reason(g, producer, producer.input[index], what)
            if reason is not None:
                return producer, reason
    channels, reason = _out_channels(g, producer)
    if reason is not None:
        return producer, reason
    statistics = g.shape(g.resolve(node.input[3]))
    if statistics != (channels,):
        return producer, (f"it has {list(statistics)} statistics, {_label(producer)} "
                          f"{channels} output channels")
    return producer, None


def _fold_into(g: _Graph, node: Any, producer: Any) -> None:
    """Fold ``node`` into ``producer`` in place (decided foldable by :func:`_fold_reason`)."""
    import torch

    from bnsurgery.fold import batchnorm_scale_shift, fold_layer_weights

    onnx = g.onnx
    bn = _attributes(onnx, node)
    weight_bn, bias_bn, mean, var = (g.array(g.resolve(name)) for name in node.input[1:5])
    scale, shift = batchnorm_scale_shift(mean, var, eps=float(bn.get("epsilon", 1e-5)),
                                         weight=weight_bn, bias=bias_bn)
    attrs = _attributes(onnx, producer)
    weight_name = producer.input[1]
    weight = g.array(weight_name)
    has_bias = _has_bias(producer)
    bias = g.array(producer.input[2]).to(torch.float64).reshape(-1) if has_bias else None
    if producer.op_type == "Gemm":
        transposed_b = bool(attrs.get("transB", 0))
        # Y = alpha * A @ B' + beta * C; scaling B' per output column and C into the new C
        # (beta folded in, so beta becomes 1) gives scale * Y + shift.
        bias = None if bias is None else bias * float(attrs.get("beta", 1.0))
        rows = weight if transposed_b else weight.t().contiguous()
        folded = fold_layer_weights(rows, bias, after=(scale, shift), dtype=weight.dtype)
        new_weight = folded.weight if transposed_b else folded.weight.t().contiguous()
        _set_attribute(onnx, producer, "beta", 1.0)
    else:
        folded = fold_layer_weights(weight, bias, after=(scale, shift),
                                    transposed=producer.op_type == "ConvTranspose",
                                    groups=int(attrs.get("group", 1)), dtype=weight.dtype)
        new_weight = folded.weight
    g.set_array(weight_name, new_weight)
    _splice(g, node, producer,
            lambda name: onnx.numpy_helper.from_array(folded.bias.numpy(), name))


def _has_bias(producer: Any) -> bool:
    return len(producer.input) > 2 and bool(producer.input[2])


def _splice(g: _Graph, node: Any, producer: Any, bias: Callable[[str], Any]) -> None:
    """The graph surgery of a fold: ``producer`` gets the bias ``bias(name)`` (under its own
    bias's name, or a fresh one it now reads) and writes ``node``'s output; ``node`` goes.

    Both a real fold and :func:`batchnorm_fold_plan`'s simulated one make exactly this change,
    so the decisions after it see the same graph either way.
    """
    has_bias = _has_bias(producer)
    bias_name = (producer.input[2] if has_bias
                 else _fresh_name(g, f"{producer.input[1]}.folded_bias"))
    g.set_proto(bias(bias_name))
    if not has_bias:
        del producer.input[2:]
        producer.input.append(bias_name)
    old_output = producer.output[0]
    producer.output[0] = node.output[0]
    g.graph.node.remove(node)
    for index in reversed([i for i, v in enumerate(g.graph.value_info) if v.name == old_output]):
        del g.graph.value_info[index]


def _set_attribute(onnx: Any, node: Any, name: str, value: float) -> None:
    for index in reversed([i for i, a in enumerate(node.attribute) if a.name == name]):
        del node.attribute[index]
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _fresh_name(g: _Graph, base: str) -> str:
    taken = set(g.initializers) | set(g.producers) | g.graph_inputs
    name, count = base, 1
    while name in taken:
        count += 1
        name = f"{base}.{count}"
    return name


def _prune(onnx: Any, graph: Any, names: Sequence[str]) -> None:
    """Remove what fed only the folded statistics (``names``): Identity nodes, then
    initializers, once nothing reads them any more."""
    pending = set(names)
    while pending:
        g = _Graph(onnx, graph)
        unused = {n for n in pending if g.consumers[n] == 0 and n not in g.graph_inputs}
        identities = [node for node in graph.node if node.op_type == "Identity"
                      and node.output[0] in unused]
        for node in identities:
            graph.node.remove(node)
        for index in reversed([i for i, t in enumerate(graph.initializer) if t.name in unused]):
            del graph.initializer[index]
        pending = {node.input[0] for node in identities}


def _skeleton(onnx: Any, graph: Any) -> Any:
    """A copy of ``graph`` whose initializers keep their names, dtypes and shapes but no values:
    enough to decide every fold, at the cost of the nodes alone."""
    copy = onnx.GraphProto()
    copy.node.extend(graph.node)
    copy.input.extend(graph.input)
    copy.output.extend(graph.output)
    copy.initializer.extend(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
                            for t in graph.initializer)
    return copy


def _valueless(onnx: Any, data_type: int, dims: list[Any], name: str) -> Any:
    """An initializer with a name, dtype and shape but no values: a simulated fold's bias."""
    return onnx.TensorProto(name=name, data_type=data_type, dims=dims)


def _node_name(node: Any) -> str:
    name: str = node.name or node.output[0]
    return name


def batchnorm_fold_plan(onnx: Any, model: Any) -> tuple[BatchNormFoldDecision, ...]:
    """Decide, for every BatchNormalization of ``model``'s main graph, whether it folds.

    The one place the folding rules are applied: :func:`fold_graph_batchnorms` folds what this
    decides, and :func:`bnsurgery.onnx_inspect.inspect_onnx` reports it. ``model`` is not
    changed. The decisions are made in graph order on a value-less copy of the graph, where each
    fold decided is carried out as a real one changes the graph (:func:`_splice`), so that a
    BatchNorm after another one is judged on the graph it will meet once the first has folded.
    Only names, shapes and dtypes are read: a file loaded without its external data gets the
    same decisions.

    Args:
        onnx: The ``onnx`` module.
        model: An ``onnx.ModelProto``.

    Returns:
        One decision per BatchNormalization node, in graph order.
    """
    graph = _skeleton(onnx, model.graph)
    decisions = []
    for node in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        g = _Graph(onnx, graph)
        producer, reason = _fold_reason(g, node)
        decisions.append(BatchNormFoldDecision(
            _node_name(node), None if producer is None else _node_name(producer),
            None if producer is None else producer.op_type, reason))
        if reason is None:
            channels, _ = _out_channels(g, producer)
            _splice(g, node, producer, partial(_valueless, onnx, g.data_type(producer.input[1]),
                                               [channels]))
    return tuple(decisions)


def fold_graph_batchnorms(onnx: Any, model: Any) -> list[OnnxBatchNormFold]:
    """Fold every BatchNormalization of ``model``'s main graph that
    :func:`batchnorm_fold_plan` decides foldable, in place.

    A BatchNorm after another one folds too once the first has folded into the layer before
    them both: the lookups are rebuilt after every fold.
    """
    nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    records = []
    released: list[str] = []
    for node, decision in zip(nodes, batchnorm_fold_plan(onnx, model), strict=True):
        if decision.folds:
            g = _Graph(onnx, model.graph)
            released += list(node.input[1:5])
            _fold_into(g, node, g.producers[node.input[0]])
        records.append(OnnxBatchNormFold(
            decision.name, decision.producer, decision.producer_op, decision.folds,
            decision.reason or f"folded into {decision.producer_op} {decision.producer}"))
    _prune(onnx, model.graph, released)
    return records


def _read(onnx: Any, path_or_model: Any) -> tuple[Any, str, Path | None]:
    """A copy of the model to fold, how to name it, and the file it came from."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
        return model, "<ModelProto>", None
    path = Path(os.fspath(path_or_model))
    if not path.is_file():
        raise InvalidInputError(format_message(
            "The ONNX file does not exist", where=str(path), got="no such file",
            expected="an .onnx file", hint="check the path"))
    try:
        return onnx.load(str(path)), str(path), path
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError ...
        raise InvalidInputError(format_message(
            "The file is not a readable ONNX model", where=str(path),
            got=f"{type(exc).__name__}: {first_line(exc)}", expected="a .onnx file",
            hint="check that it is not truncated")) from exc


def _check_folded(onnx: Any, original: Any, source: Path | None, folded: Any,
                  options: Mapping[str, Any]) -> EquivalenceReport:
    """The folded graph against the unfolded one in onnxruntime, through temporary files."""
    from bnsurgery.onnx_compare import compare_onnx

    with tempfile.TemporaryDirectory(prefix="bnsurgery-fold-") as folder:
        reference = source
        if reference is None:
            reference = Path(folder) / "unfolded.onnx"
            onnx.save(original, str(reference))
        candidate = Path(folder) / "folded.onnx"
        onnx.save(folded, str(candidate))
        return compare_onnx(reference, candidate, **options)


def fold_onnx_batchnorm(
    path_or_model: str | os.PathLike[str] | Any,
    *,
    output: str | os.PathLike[str] | None = None,
    strict: bool = False,
    providers: Sequence[str] | str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    per_tensor: bool | None = None,
    seed: int = 0,
    # ort_session.DEFAULT_TIMEOUT_S, repeated because importing that module imports torch; a
    # test keeps the two equal.
    timeout: float = 300.0,
) -> OnnxFoldResult:
    """Fold BatchNormalization nodes into the Conv/ConvTranspose/Gemm before them (see module).

    Args:
        path_or_model: An ONNX file or an ``onnx.ModelProto`` (not changed either way).
        output: Where to write the folded file; written only when the check passes, atomically
            (an existing file keeps its permissions).
        strict: Raise instead of returning when a BatchNormalization node cannot be folded.
        providers: onnxruntime execution providers of the check (default CUDA, then CPU).
        rtol: Override the documented relative tolerance of the check.
        atol: Override the documented absolute tolerance.
        input_shape: Shape of the check's random inputs (see
            :func:`bnsurgery.onnx_compare.compare_onnx`).
        per_tensor: Compare the tensors both graphs share too (``None``: when the check fails).
        seed: Seed of the check's random inputs.
        timeout: Seconds one onnxruntime run may take.

    Returns:
        What was folded, the check, and the file written.

    Raises:
        InvalidInputError: The file is missing or unreadable, or the check's inputs do not fit.
        FusionError: ``strict`` and a node cannot be folded (nothing is written).
        RunTimeoutError: An onnxruntime run took longer than ``timeout``.
    """
    onnx = require("onnx", purpose="Folding BatchNorm in ONNX files")
    original, source, path = _read(onnx, path_or_model)
    folded = onnx.ModelProto()
    folded.CopyFrom(original)
    records = fold_graph_batchnorms(onnx, folded)
    kept = [r for r in records if not r.folded]
    if strict and kept:
        raise FusionError(format_message(
            f"{len(kept)} BatchNormalization nodes cannot be folded: "
            + "; ".join(f"{r.name}: {r.reason}" for r in kept), where=source,
            hint="pass strict=False to fold what can be folded and keep the rest"))
    check = None
    if any(r.folded for r in records):
        check = _check_folded(onnx, original, path, folded, {
            "providers": providers, "rtol": rtol, "atol": atol, "input_shape": input_shape,
            "per_tensor": per_tensor, "seed": seed, "timeout": timeout})
    written = None
    if output is not None and (check is None or check.passed):
        written = str(write_bytes(output, folded.SerializeToString(), what="ONNX file"))
    return OnnxFoldResult(source=source, batchnorms=tuple(records), check=check,
                          output=written, model=folded)
