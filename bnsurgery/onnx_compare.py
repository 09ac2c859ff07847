"""Two ONNX files against each other: ``bnsurgery validate a.onnx b.onnx``.

The check a graph optimiser (onnxslim, onnx-simplifier, Polygraphy's surgeon, an in-graph
BatchNorm fold) needs: the optimised file must compute what the original computes. Both files
run in onnxruntime on the same inputs (random ones drawn from the first file's input shapes and
dtypes, or given ones) and every output is judged with the package's documented tolerances
(:func:`bnsurgery.comparison.select_tolerance`). When an output is out of tolerance, in-memory
copies of both graphs expose every intermediate tensor the two graphs share by name as extra
outputs; the shared tensors are compared in the first graph's topological order and the first
one out of tolerance is reported, with the nodes of the second graph that computed it from
values that still agreed. The files under test are never changed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnsurgery._lazy import require
from bnsurgery.comparison import (
    OutputComparison,
    Tolerance,
    compare_output,
    run_and_compare,
    select_tolerance,
)
from bnsurgery.errors import InvalidInputError, NonFiniteReferenceError, format_message
from bnsurgery.messages import first_line
from bnsurgery.onnx_inputs import check_input_shape, format_shape
from bnsurgery.ort_session import DEFAULT_TIMEOUT_S, OnnxRunner, resolve_providers
from bnsurgery.report import EquivalenceReport, LayerError, collect_environment

__all__ = ["compare_onnx", "graph_signature", "random_onnx_inputs"]

#: One graph input or output: (name, element type name, dims; a symbolic dim is its name or "?").
Signature = tuple[str, str, tuple[int | str, ...]]


def _load(onnx: Any, path: str | os.PathLike[str]) -> Any:
    shown = os.fspath(path)
    if not Path(shown).is_file():
        raise InvalidInputError(format_message(
            "The ONNX file does not exist", where=shown, got="no such file",
            expected="an .onnx file", hint="check the path"))
    try:
        return onnx.load(shown)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError ...
        raise InvalidInputError(format_message(
            "The file is not a readable ONNX model", where=shown,
            got=f"{type(exc).__name__}: {first_line(exc)}", expected="a .onnx file",
            hint="check that it is not truncated")) from exc


def graph_signature(proto: Any) -> tuple[tuple[Signature, ...], tuple[Signature, ...]]:
    """The inputs (initializers left out) and outputs of a model: name, dtype and dims."""
    onnx = require("onnx", purpose="Reading ONNX graph signatures")
    weights = {t.name for t in proto.graph.initializer}

    def describe(value: Any) -> Signature:
        tensor = value.type.tensor_type
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in tensor.shape.dim)
        return value.name, kind, dims

    return (tuple(describe(v) for v in proto.graph.input if v.name not in weights),
            tuple(describe(v) for v in proto.graph.output))


def _same_dims(first: tuple[int | str, ...], second: tuple[int | str, ...]) -> bool:
    """Equal ranks and fixed sizes; two symbolic dims match whatever their names."""
    return len(first) == len(second) and all(
        x == y or (isinstance(x, str) and isinstance(y, str))
        for x, y in zip(first, second, strict=True))


def _signature_differences(kind: str, first: Sequence[Signature], second: Sequence[Signature]
                           ) -> list[str]:
    found = []
    left, right = {s[0]: s for s in first}, {s[0]: s for s in second}
    only_a, only_b = sorted(set(left) - set(right)), sorted(set(right) - set(left))
    if only_a:
        found.append(f"{kind} only in the first file: {', '.join(only_a)}")
    if only_b:
        found.append(f"{kind} only in the second file: {', '.join(only_b)}")
    for name in [s[0] for s in first if s[0] in right]:
        (_, dtype_a, dims_a), (_, dtype_b, dims_b) = left[name], right[name]
        if dtype_a != dtype_b:
            found.append(f"{kind} {name}: dtype {dtype_a} against {dtype_b}")
        elif not _same_dims(dims_a, dims_b):
            found.append(f"{kind} {name}: shape {format_shape(_dims(dims_a))} against "
                         f"{format_shape(_dims(dims_b))}")
    return found


def _dims(dims: tuple[int | str, ...]) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) else None for d in dims)


def _check_signatures(a_path: str, b_path: str, a: Any, b: Any) -> tuple[Signature, ...]:
    """Refuse two files whose inputs or outputs differ; return the first file's inputs."""
    (inputs_a, outputs_a), (inputs_b, outputs_b) = graph_signature(a), graph_signature(b)
    found = (_signature_differences("input", inputs_a, inputs_b)
             + _signature_differences("output", outputs_a, outputs_b))
    if found:
        raise InvalidInputError(format_message(
            "The two ONNX files do not have the same inputs and outputs: "
            + "; ".join(found), where=f"{a_path} and {b_path}",
            expected="the same names, dtypes and shapes in both files",
            hint="compare two versions of one model (before and after a graph optimiser)"))
    return inputs_a


def random_onnx_inputs(runner: OnnxRunner, *, seed: int = 0,
                       shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Tensor]:
    """Inputs for every input of ``runner``'s file, drawn from ``seed``.

    Float inputs are standard normal, integer inputs 0 or 1 (valid indices of any table), bool
    inputs random. A symbolic dimension is 1 unless ``shapes`` gives the input's shape.

    Raises:
        InvalidInputError: A shape in ``shapes`` does not fit the file, names an input the file
            does not have, or an input's dtype has no torch equivalent.
    """
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - set(runner.input_names))
    if unknown:
        raise InvalidInputError(format_message(
            "An input shape names an input the file does not have", where=str(runner.path),
            got=", ".join(unknown), expected=f"one of {', '.join(runner.input_names)}",
            hint="pass input_shape as {input name: shape}"))
    generator = torch.Generator().manual_seed(seed)
    drawn: dict[str, Tensor] = {}
    for name, dtype, declared in zip(runner.input_names, runner.input_dtypes,
                                     runner.input_shapes, strict=True):
        declared_dims = [d if isinstance(d, int) else None for d in declared]
        if name in shapes:
            shape = [int(d) for d in shapes[name]]
            check_input_shape(declared_dims, shape, where=f"{runner.path} input {name}",
                              hint="pass input_shape="
                                   f"{format_shape(declared_dims).replace('N', '1')!r}")
        else:
            shape = [d or 1 for d in declared_dims]
        if dtype is None:
            raise InvalidInputError(format_message(
                "An input has a dtype random inputs cannot be drawn for",
                where=f"{runner.path} input {name}", got="a non-tensor or unknown type",
                hint="pass inputs={name: tensor} yourself"))
        if dtype.is_floating_point:
            drawn[name] = torch.randn(shape, generator=generator).to(dtype)
        else:
            drawn[name] = torch.randint(0, 2, shape, generator=generator).to(dtype)
    return drawn


class _Ordered:
    """A runner whose outputs come back in a given order of output names."""

    def __init__(self, runner: OnnxRunner, names: Sequence[str]) -> None:
        self.runner, self.names = runner, list(names)

    def __call__(self, *inputs: Tensor) -> list[Tensor]:
        values = dict(zip(self.runner.output_names, self.runner(*inputs), strict=True))
        return [values[name] for name in self.names]


def _given_inputs(runner: OnnxRunner, inputs: Mapping[str, Tensor] | Sequence[Tensor] | Tensor
                  ) -> dict[str, Tensor]:
    """Given inputs keyed by the file's input names (a sequence goes in the file's order)."""
    if isinstance(inputs, Tensor):
        inputs = [inputs]
    if not isinstance(inputs, Mapping):
        runner.feed(list(inputs))  # refuses a wrong number of inputs, naming the file's
        inputs = dict(zip(runner.input_names, inputs, strict=True))
    missing = [n for n in runner.input_names if n not in inputs]
    extra = sorted(set(inputs) - set(runner.input_names))
    if missing or extra:
        raise InvalidInputError(format_message(
            "The inputs do not name the file's inputs", where=str(runner.path),
            got=f"missing {missing}, unknown {extra}",
            expected=", ".join(runner.input_names), hint="pass inputs={input name: tensor}"))
    return {name: inputs[name] for name in runner.input_names}


def _shapes(runner: OnnxRunner, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None
            ) -> dict[str, Sequence[int]]:
    """``input_shape`` keyed by input name; a bare shape is the shape of a one-input file."""
    if input_shape is None or isinstance(input_shape, Mapping):
        return dict(input_shape or {})
    if len(runner.input_names) != 1:
        raise InvalidInputError(format_message(
            "One input shape for a file with several inputs", where=str(runner.path),
            got=list(input_shape), expected=f"a shape per input ({', '.join(runner.input_names)})",
            hint="pass input_shape={input name: shape}"))
    return {runner.input_names[0]: input_shape}


def _provider_failures(requested: Sequence[str], runners: Sequence[OnnxRunner]) -> list[str]:
    return [f"{requested[0]} was requested but onnxruntime used {r.providers_used[0]} for "
            f"{r.path.name} (it falls back silently when the provider cannot be loaded)"
            for r in runners if requested[0] not in r.providers_used]


def _shared_tensors(a: Any, b: Any) -> list[str]:
    """Tensors computed by nodes of both graphs, in the first graph's (topological) order."""
    produced_b = {value for node in b.graph.node for value in node.output if value}
    order = [value for node in a.graph.node for value in node.output
             if value and value in produced_b]
    return list(dict.fromkeys(order))


def _exposed(onnx: Any, proto: Any, names: Sequence[str]) -> tuple[Any, list[str]]:
    """A copy of ``proto`` with ``names`` added as outputs, and the names that could be.

    A tensor is exposed only when shape inference (or the file) knows its element type: an
    output declared with a wrong type would make onnxruntime refuse the copy. Shapes are left
    out of the declaration, so a symbolic dimension cannot be declared wrongly either.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy).graph
    except Exception:  # noqa: BLE001 - a graph onnx cannot infer still has its declared types
        inferred = copy.graph
    known = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    present = {o.name for o in copy.graph.output}
    exposed = []
    for name in names:
        if not known.get(name):
            continue
        exposed.append(name)
        if name not in present:
            output = copy.graph.output.add()
            output.name = name
            output.type.tensor_type.elem_type = known[name]
    return copy, exposed


def _run_exposed(onnx: Any, proto: Any, names: Sequence[str], feed: Sequence[Tensor], *,
                 providers: Sequence[str], timeout: float, stem: str) -> dict[str, Tensor]:
    """The values of ``names`` in a debug copy of ``proto`` run on ``feed``."""
    copy, exposed = _exposed(onnx, proto, names)
    with tempfile.TemporaryDirectory(prefix="bnsurgery-debug-") as folder:
        path = Path(folder) / f"{stem}.debug.onnx"
        onnx.save(copy, str(path))
        runner = OnnxRunner(path, providers, timeout=timeout)
        values = dict(zip(runner.output_names, runner(*feed), strict=True))
    return {name: values[name] for name in exposed}


def _suspects(b: Any, tensor: str, agreeing: set[str]) -> tuple[str, ...]:
    """Nodes of ``b`` that compute ``tensor`` from tensors that still agree (or from inputs)."""
    producer = {value: index for index, node in enumerate(b.graph.node)
                for value in node.output if value}
    found: set[int] = set()
    stack = [tensor]
    while stack:
        index = producer.get(stack.pop())
        if index is None or index in found:
            continue
        found.add(index)
        stack += [v for v in b.graph.node[index].input if v and v not in agreeing]
    nodes = [b.graph.node[i] for i in sorted(found)]
    return tuple(f"{n.op_type} {n.name or n.output[0]}" for n in nodes)


def _tensor_divergence(onnx: Any, a: Any, b: Any, feed: Sequence[Tensor], *,
                       runners: tuple[OnnxRunner, OnnxRunner], providers: Sequence[str],
                       tolerance: Tolerance, output_failed: bool
                       ) -> tuple[list[LayerError], str | None, tuple[str, ...], list[str]]:
    """Per-tensor errors of the shared tensors, the first diverging one, its suspects, notes.

    When every shared tensor agrees but an output does not (``output_failed``), the divergence
    is ``"output"``: it happens after the last shared tensor.
    """
    shared = _shared_tensors(a, b)
    values_a, values_b = (
        _run_exposed(onnx, proto, shared, feed, providers=providers, timeout=runner.timeout,
                     stem=runner.path.stem) for proto, runner in zip((a, b), runners, strict=True))
    layers: list[LayerError] = []
    agreeing: set[str] = set()
    first: str | None = None
    for name in shared:
        if name not in values_a or name not in values_b:
            continue
        compared = compare_output(name, None, values_a[name], values_b[name], tolerance)
        layers.append(LayerError(name, compared.max_abs_error, compared.max_rel_error,
                                 not compared.passed))
        if compared.passed:
            agreeing.add(name)
        elif first is None:
            first = name
    notes = [f"per-tensor errors of {len(layers)} of the {len(shared)} tensors both graphs "
             f"compute under the same name, in {runners[0].path.name}'s order (debug copies "
             "exposing them as outputs; the files were not changed)"]
    suspects = _suspects(b, first, agreeing) if first is not None else ()
    if first is None and output_failed:
        first = "output"  # every shared tensor agreed: the difference is after them
    return layers, first, suspects, notes


def _open(a_path: str | os.PathLike[str], b_path: str | os.PathLike[str],
          providers: Sequence[str] | str | None, timeout: float
          ) -> tuple[Any, Any, Any, list[str], OnnxRunner, OnnxRunner]:
    """Both files loaded and checked against each other, and a runner for each."""
    onnx = require("onnx", purpose="Comparing ONNX files")
    require("onnxruntime", purpose="Comparing ONNX files")
    a, b = _load(onnx, a_path), _load(onnx, b_path)
    _check_signatures(os.fspath(a_path), os.fspath(b_path), a, b)
    requested = resolve_providers(providers)
    return (onnx, a, b, requested, OnnxRunner(Path(a_path), requested, timeout=timeout),
            OnnxRunner(Path(b_path), requested, timeout=timeout))


def _compare_outputs(runner_a: OnnxRunner, runner_b: OnnxRunner, feed: Mapping[str, Tensor],
                     tolerance: Tolerance) -> tuple[list[OutputComparison], Any]:
    """Both files on ``feed``; one comparison per output, named as in the files."""
    values = list(feed.values())
    batch = int(values[0].shape[0]) if values and values[0].dim() > 0 else None
    try:
        run = run_and_compare(_Ordered(runner_a, runner_a.output_names),  # type: ignore[arg-type]
                              _Ordered(runner_b, runner_a.output_names), values, values,
                              batch=batch, tolerance=tolerance, device=torch.device("cpu"))
    except NonFiniteReferenceError as exc:
        raise NonFiniteReferenceError(format_message(
            f"The reference is not finite: {runner_a.path} returns NaN or infinite values, so "
            "no file can be compared with it", where=str(runner_a.path),
            got=f"inputs {[list(v.shape) for v in values]}", expected="finite outputs",
            hint="pass other inputs (input_shape or inputs), or check the file's weights")
        ) from exc
    outputs = [dataclasses.replace(o, name=name)
               for o, name in zip(run.outputs, runner_a.output_names, strict=True)]
    return outputs, run


def _describe(feed: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    return {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for name, t in feed.items()}


def compare_onnx(
    a_path: str | os.PathLike[str],
    b_path: str | os.PathLike[str],
    *,
    inputs: Mapping[str, Tensor] | Sequence[Tensor] | Tensor | None = None,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    providers: Sequence[str] | str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    per_tensor: bool | None = None,
    seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> EquivalenceReport:
    """Run two ONNX files on the same inputs in onnxruntime and compare every output.

    Args:
        a_path: The reference file (e.g. before a graph optimiser).
        b_path: The file to judge (after it). Its inputs and outputs must match the first
            file's by name, dtype and shape (two symbolic dimensions always match).
        inputs: Inputs by name, or in the first file's input order. Default: drawn from
            ``seed`` (see :func:`random_onnx_inputs`).
        input_shape: Shapes for the drawn inputs: one shape for a one-input file, or
            ``{input name: shape}``. Default: the declared shape, symbolic dimensions 1.
        providers: onnxruntime execution providers (``"cpu"``, ``"cuda"``, ...); default CUDA
            when available, then CPU. Both files run on the same ones.
        rtol: Override the documented relative tolerance (see ``comparison.TOLERANCES``).
        atol: Override the documented absolute tolerance.
        per_tensor: Compare the shared intermediate tensors too (``None``: only when an output
            is out of tolerance).
        seed: Seed of the drawn inputs.
        timeout: Seconds one onnxruntime run may take.

    Returns:
        The report, with ``divergence_kind="tensor"``: ``first_divergence`` is the first shared
        tensor out of tolerance (in the first file's topological order),
        ``divergence_suspects`` the second file's nodes that computed it from tensors that still
        agreed, ``layers`` the error of every shared tensor.

    Raises:
        InvalidInputError: A file is missing or unreadable, the files' inputs or outputs
            differ, or the inputs do not fit the first file.
        NonFiniteReferenceError: The first file's outputs are not finite on these inputs.
        RunTimeoutError: A run took longer than ``timeout``.
    """
    onnx, a, b, requested, runner_a, runner_b = _open(a_path, b_path, providers, timeout)
    feed = (_given_inputs(runner_a, inputs) if inputs is not None else
            random_onnx_inputs(runner_a, seed=seed, shapes=_shapes(runner_a, input_shape)))
    floats = [t.dtype for t in feed.values() if t.is_floating_point()]
    tolerance = select_tolerance(*floats[:1], backend="onnxruntime", rtol=rtol, atol=atol)
    outputs, run = _compare_outputs(runner_a, runner_b, feed, tolerance)
    failures = _provider_failures(requested, [runner_a, runner_b]) + list(run.failures)
    failed = bool(failures) or not all(o.passed for o in outputs)
    diagnosis: tuple[list[LayerError], str | None, tuple[str, ...], list[str]] = (
        [], None, (), [])
    if per_tensor or (per_tensor is None and failed):
        diagnosis = _tensor_divergence(onnx, a, b, list(feed.values()),
                                       runners=(runner_a, runner_b), providers=requested,
                                       tolerance=tolerance,
                                       output_failed=not all(o.passed for o in outputs))
    layers, first, suspects, notes = diagnosis
    return EquivalenceReport(
        check="onnxruntime", reference=f"{runner_a.path.name} in onnxruntime",
        candidate=f"{runner_b.path.name} in onnxruntime",
        backend=f"onnxruntime:{runner_b.providers_used[0]}", tolerance=tolerance,
        outputs=tuple(outputs), failures=tuple(failures), first_divergence=first,
        divergence_suspects=suspects, divergence_kind="tensor", layers=tuple(layers),
        notes=(*run.notes, *notes),
        details={"reference_file": str(runner_a.path), "candidate_file": str(runner_b.path),
                 "inputs": _describe(feed), "seed": None if inputs is not None else seed,
                 "providers_requested": requested, "providers_used": runner_b.providers_used},
        timings={"reference_run_s": run.reference_seconds,
                 "candidate_run_s": run.candidate_seconds},
        environment=collect_environment(device="cpu"))
