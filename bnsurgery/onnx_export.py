"""Export a model to one self-contained ONNX file that provably runs.

:func:`export_onnx` folds BatchNorm (optional), exports with ``torch.onnx.export`` using the
torch.export-based exporter at a pinned opset, and only then puts the file in place: it is written
into a temporary folder beside the destination, checked with ``onnx.checker``, run in onnxruntime
at batch 1 and at a larger batch when the batch axis is dynamic, compared with the *original*
model (not the fused one) on the example inputs and at another batch size
(:mod:`bnsurgery.fusion_check`), and only then renamed onto the destination. A failed export
never leaves a file behind, and a file that exists is one that loaded, ran and agreed with the
original.

Why export from a batch of at least two: ``torch.export`` specialises a dimension of size 1 to the
constant 1, so a "dynamic" batch exported from a single example is quietly static.

The legacy TorchScript exporter is available only when asked for (``exporter="legacy"``); which
exporter wrote a file is stored in the file's metadata (``bnsurgery.exporter``) and shows in every
report that validates it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from bnsurgery._lazy import require
from bnsurgery._version import __version__
from bnsurgery.copying import copy_model
from bnsurgery.errors import (
    BackendRunError,
    ExportError,
    ExportMismatchError,
    InvalidInputError,
    format_message,
)
from bnsurgery.files import check_output_path, publish, staging_directory
from bnsurgery.messages import first_line
from bnsurgery.ort_session import DEFAULT_TIMEOUT_S, OnnxRunner, check_timeout
from bnsurgery.tensors import (
    as_input_tuple,
    check_eval_mode,
    export_inputs,
    flatten_outputs,
    resize_batch,
)

__all__ = ["EXPORTERS", "MIN_DYNAMO_OPSET", "export_onnx"]

logger = logging.getLogger(__name__)

#: What each ``exporter`` choice calls, as recorded in the file's metadata.
EXPORTERS: dict[str, str] = {
    "dynamo": "torch.onnx.export(dynamo=True)",
    "legacy": "torch.onnx.export(dynamo=False) (legacy TorchScript exporter)",
}

#: The torch.export-based exporter has no implementations below this opset; asked for less, it
#: silently keeps 18 when its version converter fails, so lower opsets are refused up front.
MIN_DYNAMO_OPSET = 18


def _names(count: int, stem: str) -> list[str]:
    return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]


def _output_count(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[int, int | None]:
    """Number of output tensors and the leading size of the first one, from one forward pass."""
    try:
        with torch.no_grad():
            outputs = flatten_outputs(model(*inputs))
    except Exception as exc:  # a user model may raise anything on bad inputs
        raise InvalidInputError(format_message(
            "The model does not run on the example inputs",
            got=f"inputs of shapes {[tuple(t.shape) for t in inputs]} -> {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}",
            expected="inputs the model accepts",
            hint="pass inputs of the shape the model was built for (--input-shape)")) from exc
    if not outputs:
        raise InvalidInputError(format_message(
            "The model returns no tensor", got="no tensor in its output",
            expected="a tensor or a (nested) tuple/list/dict of tensors",
            hint="export a model whose forward returns tensors"))
    first = outputs[0][1]
    return len(outputs), (int(first.shape[0]) if first.dim() > 0 else None)


def _check_options(opset: object, exporter: object) -> None:
    if exporter not in EXPORTERS:
        raise InvalidInputError(format_message(
            "Unknown ONNX exporter", where="exporter", got=repr(exporter),
            expected=f"one of {sorted(EXPORTERS)}",
            hint="leave exporter='dynamo' (the torch.export-based exporter)"))
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise InvalidInputError(format_message(
            "The opset must be an integer", where="opset", got=repr(opset),
            expected=f"an integer >= {MIN_DYNAMO_OPSET}", hint="leave opset=18"))
    if opset < 7:
        raise InvalidInputError(format_message(
            "The opset is older than any ONNX exporter supports", where="opset", got=opset,
            expected=f"an integer >= {MIN_DYNAMO_OPSET}", hint="leave opset=18"))
    if exporter == "dynamo" and opset < MIN_DYNAMO_OPSET:
        raise InvalidInputError(format_message(
            "The torch.export-based ONNX exporter cannot target this opset", where="opset",
            got=opset, expected=f">= {MIN_DYNAMO_OPSET}",
            hint=f"use opset={MIN_DYNAMO_OPSET} or newer, or pass exporter='legacy' explicitly"))


def _metadata(*, exporter: str, fuse: bool, opset: int, dynamic_batch: bool,
              export_batch: int | None) -> dict[str, str]:
    return {
        "bnsurgery.exporter": EXPORTERS[exporter],
        "bnsurgery.fused": "true" if fuse else "false",
        "bnsurgery.opset": str(opset),
        "bnsurgery.dynamic_batch": "true" if dynamic_batch else "false",
        "bnsurgery.export_batch": "" if export_batch is None else str(export_batch),
        "bnsurgery.torch_version": torch.__version__,
        "bnsurgery.version": __version__,
    }


def _export_dynamo(model: nn.Module, inputs: tuple[Tensor, ...], destination: Path, *,
                   opset: int, dynamic_batch: bool, input_names: list[str],
                   output_names: list[str], metadata: dict[str, str]) -> None:
    require("onnxscript", purpose="ONNX export with the torch.export-based exporter")
    dynamic_shapes = None
    if dynamic_batch and inputs[0].dim() > 0:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} if t.dim() > 0 and t.shape[0] == inputs[0].shape[0]
                               else None for t in inputs)
    try:
        with warnings.catch_warnings():
            # Several inputs share the one batch dimension on purpose; the exporter notes that
            # it names the axis once, which is what is wanted.
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
            program = torch.onnx.export(
                model, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                input_names=input_names, output_names=output_names, external_data=False,
                optimize=True, verbose=False, report=False)
    except Exception as exc:  # the exporter raises many types; keep it as the cause
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "Constraints violated" in str(exc) or "specialized" in str(exc):
            hint = _batch_hint(model)
        else:
            hint = ("run with --debug (CLI) or look at the chained exception for the "
                    "exporter's full message; fuse=False or exporter='legacy' may get around it")
        raise ExportError(format_message(
            "torch.onnx.export (torch.export-based exporter) failed",
            where=type(model).__name__, got=f"{type(exc).__name__}: {first_line}",
            hint=hint)) from exc
    if program is None:  # only the legacy exporter returns nothing
        raise ExportError(format_message(
            "torch.onnx.export (torch.export-based exporter) returned no ONNX program",
            where=type(model).__name__, hint="pass exporter='legacy' to use the other exporter"))
    program.model.metadata_props.update(metadata)
    # Weights stay inside the file below 2 GB; above, the ONNX protobuf limit forces a sidecar.
    program.save(str(destination), external_data=False)


def _batch_hint(model: nn.Module) -> str:
    """Why the batch axis came out fixed: a cached input shape when there is one."""
    cached = _cached_shapes(model)
    if cached:
        return (f"{', '.join(cached[:3])} holds an input shape cached by an earlier forward "
                "(ultralytics' Detect head does this); comparing the new shape with it fixes "
                "the batch size: export a freshly built model that has not run, or pass "
                "dynamic_batch=False")
    return ("the model fixes its batch size somewhere (e.g. x.view(1, -1)); use x.flatten(1), "
            "or pass dynamic_batch=False")


def _cached_shapes(model: nn.Module) -> list[str]:
    """Attributes holding a ``torch.Size``: shapes a forward cached on the module."""
    found = []
    for name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if isinstance(value, torch.Size) and len(value) > 0:
                found.append(f"'{name + '.' if name else ''}{attribute}' ({tuple(value)})")
    return found


def _check_against_original(runner: OnnxRunner, original: nn.Module, inputs: tuple[Tensor, ...],
                            *, dynamic_batch: bool, shown: Path) -> None:
    """Refuse a file whose outputs disagree with the original (unfused) model."""
    from bnsurgery.fusion_check import ReferenceRuns

    runs = ReferenceRuns(original, inputs, other_shapes=False, other_batch=dynamic_batch)
    reason, _ = runs.compare(runner)
    if reason is not None:
        raise ExportMismatchError(format_message(
            "The exported file does not compute what the original model computes",
            where=str(shown), got=reason, expected="outputs within the onnxruntime tolerance",
            hint="export with fuse=False to see whether folding is the cause, and report it"))


def _export_legacy(model: nn.Module, inputs: tuple[Tensor, ...], destination: Path, *,
                   opset: int, dynamic_batch: bool, input_names: list[str],
                   output_names: list[str], metadata: dict[str, str]) -> None:
    onnx = require("onnx", purpose="ONNX export")
    dynamic_axes = ({name: {0: "batch"} for name in input_names + output_names}
                    if dynamic_batch else None)
    try:
        with warnings.catch_warnings():
            # It was asked for by name; its deprecation notice adds nothing to that choice.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, inputs, str(destination), dynamo=False,
                              opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes)
    except Exception as exc:  # the exporter raises many types; keep it as the cause
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(format_message(
            "torch.onnx.export (legacy TorchScript exporter) failed",
            where=type(model).__name__, got=f"{type(exc).__name__}: {first_line}",
            hint="use the default exporter='dynamo'")) from exc
    proto = onnx.load(str(destination))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(destination))


def _check_file(destination: Path, opset: int, *, shown: Path) -> None:
    onnx = require("onnx", purpose="Checking the exported ONNX file")
    proto = onnx.load(str(destination), load_external_data=False)
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(format_message(
            "The exported file does not have the requested opset", where=str(shown),
            got=got, expected=opset, hint=f"use opset={MIN_DYNAMO_OPSET}"))
    try:
        # Checking by path handles files with external data too.
        onnx.checker.check_model(str(destination), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(format_message(
            "The exported ONNX file fails onnx.checker", where=str(shown),
            got=str(exc).splitlines()[0], hint="report this with the model that produced it"
        )) from exc


def _load_runner(destination: Path, *, shown: Path, timeout: float) -> OnnxRunner:
    try:
        return OnnxRunner(destination, ["CPUExecutionProvider"], timeout=timeout)
    except InvalidInputError as exc:
        raise ExportError(format_message(
            "onnxruntime cannot load the exported file", where=str(shown),
            got=first_line(exc), hint="try another opset, or fuse=False")) from exc


def _check_runs(runner: OnnxRunner, inputs: tuple[Tensor, ...], sizes: Sequence[int | None],
                leading: int | None, export_batch: int | None, *, shown: Path,
                batch_hint: str = "the model fixes its batch size somewhere; pass "
                                  "dynamic_batch=False") -> None:
    """Run the file in onnxruntime (CPU) at each batch size; a dynamic axis must really be one."""
    for size in sizes:
        batch_inputs = inputs if size is None else resize_batch(inputs, size, seed=0)
        try:
            result = runner(*batch_inputs)
        except BackendRunError as exc:
            cause = exc.__cause__ or exc
            raise ExportError(format_message(
                f"The exported file does not run at batch size {size}", where=str(shown),
                got=f"{type(cause).__name__}: {first_line(cause)}",
                hint=batch_hint)) from exc
        if size is not None and leading == export_batch and result[0].shape[:1] != (size,):
            raise ExportError(format_message(
                "The exported file ignores the batch size", where=str(shown),
                got=f"output shape {tuple(result[0].shape)} for batch {size}",
                expected=f"a leading dimension of {size}", hint=batch_hint))


def _verify(staged: Path, model: nn.Module, original: nn.Module, example: tuple[Tensor, ...], *,
            opset: int, dynamic_batch: bool, leading: int | None, export_batch: int | None,
            shown: Path, timeout: float) -> None:
    """Check the staged file: onnx.checker, runs at each batch size, agrees with the original."""
    _check_file(staged, opset, shown=shown)
    sizes: list[int | None] = [None]
    if dynamic_batch and export_batch is not None:
        sizes = [*sorted({1, max(5, 2 * export_batch)})]
    runner = _load_runner(staged, shown=shown, timeout=timeout)
    _check_runs(runner, example, sizes, leading, export_batch, shown=shown,
                batch_hint=_batch_hint(model))
    _check_against_original(runner, original, example, dynamic_batch=dynamic_batch, shown=shown)


def _put_in_place(staged: Path, destination: Path) -> None:
    """Move the checked file (and any external-data sidecar) onto the destination."""
    sidecars = [p for p in staged.parent.iterdir() if p != staged]
    for sidecar in sidecars:  # external data first: the .onnx must never point at nothing
        logger.warning("weights above 2 GB: ONNX keeps them in %s beside %s",
                       sidecar.name, destination.name)
        publish(sidecar, destination.parent / sidecar.name, what="ONNX external data")
    publish(staged, destination, what="ONNX file")


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    fuse: bool = True,
    dynamic_batch: bool = True,
    opset: int = 18,
    exporter: str = "dynamo",
    verify: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Export ``model`` to one ONNX file, check it, prove it runs, then put it at ``path``.

    Args:
        model: The model, in eval mode (the exported graph uses BatchNorm running statistics;
            a model in training mode would silently be exported as something else). It is not
            modified: folding works on a copy.
        example_inputs: One tensor or a sequence of positional inputs, batch first.
        path: Destination file. Written atomically: a temporary folder beside it, then a rename.
        fuse: Fold BatchNorm into neighbouring layers first (:func:`bnsurgery.fuse_batchnorm`).
        dynamic_batch: Make the batch axis dynamic. The export then uses a batch of at least two
            (duplicating a single example), and the file is run at batch 1 and at a larger batch
            before it is accepted.
        opset: ONNX opset to pin (18 or newer with the default exporter).
        exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, the default) or
            ``"legacy"`` (the TorchScript exporter, only when asked for). Recorded in the file's
            metadata and in validation reports.
        verify: Check with ``onnx.checker`` and run the file in onnxruntime before accepting it.
        timeout: Seconds each onnxruntime run of the check may take.

    Returns:
        The path of the written file. Below 2 GB of weights it is self-contained (no ``.data``
        sidecar); above, ONNX's protobuf limit forces a ``.data`` file next to it.

    Raises:
        InvalidInputError: The model is in training mode, the inputs are not tensors the model
            accepts, or an option is out of range.
        ExportError: The exporter failed, the file fails ``onnx.checker``, has another opset, or
            does not run at some batch size.
        ExportMismatchError: The file does not compute what the original model computes (an
            ``ExportError`` and a ``NumericMismatchError``).
        MissingDependencyError: onnx, onnxscript or onnxruntime is missing.
        RunTimeoutError: An onnxruntime run of the check took longer than ``timeout``.
    """
    _check_options(opset, exporter)
    check_timeout(timeout)
    check_eval_mode(model, what="export_onnx")
    inputs = as_input_tuple(example_inputs, where="example_inputs")
    require("onnx", purpose="ONNX export")
    destination = check_output_path(path, what="ONNX file", hint="pass another file as path=")
    original = model
    if fuse:
        from bnsurgery.fuse import fuse_batchnorm

        model = fuse_batchnorm(model, inputs, inplace=False)
    example = export_inputs(inputs, dynamic_batch)
    # On a copy: a forward may cache state (ultralytics' Detect caches the input shape, which
    # then fixes the exported batch size), and the caller's model must not run at all.
    count, leading = _output_count(copy_model(model, what="export_onnx", hint="make the model "
                                              "copyable: export never runs the caller's model"),
                                   example)
    export_batch = int(example[0].shape[0]) if example[0].dim() > 0 else None
    input_names = _names(len(inputs), "input")
    output_names = _names(count, "output")
    metadata = _metadata(exporter=exporter, fuse=fuse, opset=opset, dynamic_batch=dynamic_batch,
                         export_batch=export_batch)
    with staging_directory(destination, what="ONNX file") as folder:
        staged = folder / destination.name
        export = _export_dynamo if exporter == "dynamo" else _export_legacy
        export(model, example, staged, opset=opset, dynamic_batch=dynamic_batch,
               input_names=input_names, output_names=output_names, metadata=metadata)
        if verify:
            _verify(staged, model, original, example, opset=opset,
                    dynamic_batch=dynamic_batch and export_batch is not None, leading=leading,
                    export_batch=export_batch, shown=destination, timeout=timeout)
        _put_in_place(staged, destination)
    logger.info("exported %s (opset %d, %s, fused=%s)", destination, opset, EXPORTERS[exporter],
                fuse)
    return destination
