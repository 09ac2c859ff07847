"""The ``bnsurgery`` command line: demo, inspect, replace, fuse, export, validate, recalibrate.

Every subcommand builds a MODEL (``torchvision:NAME``, ``timm:NAME`` or
``package.module:factory``), optionally with ``--weights`` (a state_dict file, loaded without
unpickling code, or ``DEFAULT`` for the library's pretrained weights). Without ``--weights`` the
model gets random weights from ``--seed`` and calibrated BatchNorm state, so two commands with
the same seed build the same model: ``export`` then ``validate`` agree.

Exit codes: 0 success, 1 numeric mismatch (a check ran and failed), 2 bad input (a one-line
error naming the problem; ``--debug`` adds the traceback). ``--json`` prints one JSON document
on stdout; progress goes to stderr. Every file is written atomically. :func:`main` takes the
argument list and returns the exit code, so the CLI is testable in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pickle
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from bnsurgery.errors import (
    BnSurgeryError,
    ExportError,
    InvalidInputError,
    MissingDependencyError,
    NumericMismatchError,
    RunTimeoutError,
    format_message,
)
from bnsurgery.messages import first_line
from bnsurgery.tables import render_table

if TYPE_CHECKING:  # torch loads inside the commands: ``bnsurgery --help`` must not wait for it
    from torch import Tensor, nn

__all__ = ["build_parser", "cli_spelling", "main"]

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2

_MODEL_HELP = ("torchvision:NAME, timm:NAME, package.module:factory (also found in the current "
               "folder) or path/to/file.py:factory (e.g. torchvision:resnet18)")
_SAVE_SUFFIXES = (".pt2", ".pt", ".pth", ".safetensors")
#: What ``add_subparsers`` returns; generic only in typeshed, so the alias stays a string.
_Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class _Progress:
    """Step lines on stderr with the time elapsed since the command started."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"bnsurgery [{elapsed:6.1f} s] {message}\n")
            self.stream.flush()


class _Context:
    """What a command needs besides its arguments."""

    def __init__(self, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> None:
        self.args = args
        self.stdout = stdout
        self.stderr = stderr
        self.progress = _Progress(stderr, not args.quiet)

    def emit(self, text: str, payload: dict[str, Any]) -> None:
        """Print ``text`` for people, or ``payload`` as JSON with ``--json``."""
        if self.args.json:
            self.stdout.write(json.dumps(payload, indent=2) + "\n")
        else:
            self.stdout.write(text.rstrip("\n") + "\n")


def _document(ctx: _Context, *, reports: Sequence[Any] = (), loaded: Any = None,
              inputs: Any = None, plan: Any = None, output: str | None = None,
              file_format: str | None = None, status: str | None = None,
              **extra: Any) -> dict[str, Any]:
    """The JSON document of a command, with the keys every command shares (report_schema.json).

    ``status`` defaults to what the reports say: failed if one failed, passed if one ran,
    skipped if none did (then ``passed`` is null: nothing was checked).
    """
    from bnsurgery.schema import SCHEMA_VERSION, overall_status, passed_value, report_entry

    entries = [report_entry(r) for r in reports]
    status = status or overall_status(e["status"] for e in entries)
    weights = loaded.weights if loaded is not None else getattr(ctx.args, "weights", None)
    return {"schema_version": SCHEMA_VERSION, "command": ctx.args.command, "status": status,
            "passed": passed_value(status),
            "exit_code": EXIT_MISMATCH if status == "failed" else EXIT_OK,
            "model": loaded.to_dict() if loaded is not None else None,
            "input_shape": list(inputs.shape) if inputs is not None else None,
            "seed": getattr(ctx.args, "seed", None), "weights": weights or "random",
            "reports": entries,
            "plan": plan if plan is None or isinstance(plan, dict) else plan.to_dict(),
            "output": output, "format": file_format, **extra}


def _document_exit(document: dict[str, Any]) -> int:
    return int(document["exit_code"])


# ---------------------------------------------------------------------------------------------
# Shared steps.
# ---------------------------------------------------------------------------------------------

def _load(ctx: _Context) -> tuple[Any, nn.Module, Tensor]:
    """Build the MODEL (seeded), load or calibrate its weights, and draw example inputs."""
    import torch

    from bnsurgery.calibrate import calibrate_batchnorm
    from bnsurgery.copying import copy_model
    from bnsurgery.models import (
        WeightsCastWarning,
        check_input_size,
        check_seed,
        load_model,
        parse_input_shape,
    )

    args = ctx.args
    check_seed(args.seed, where="--seed")
    shape = parse_input_shape(args.input_shape) if args.input_shape else None
    ctx.progress(f"building {args.model}"
                 + (f" with weights {args.weights}" if args.weights else f" (seed {args.seed})"))
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", WeightsCastWarning)  # listed below instead
        torch.manual_seed(args.seed)
        loaded = load_model(args.model, weights=args.weights)
    if loaded.cast:
        ctx.progress(f"note: {len(loaded.cast)} tensors of {args.weights} were cast to the "
                     f"model's dtype: {', '.join(loaded.cast)}")
    shape = shape or loaded.input_shape
    check_input_size(shape, where="--input-shape", hint="pass a smaller --input-shape")
    # Every command works on copies; say so now, in this interface's words, if none can be made.
    copy_model(loaded.model, what=f"bnsurgery {args.command}",
               hint="no command-line flag avoids the copy: make the model copyable, or use "
                    "the Python API with inplace=True")
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    model = loaded.model
    try:
        if args.weights is None:
            ctx.progress("calibrating BatchNorm state on random data (no --weights given)")
            # Train-mode BatchNorm needs more than one value per channel.
            calibration = inputs if shape[0] >= 2 else torch.cat([inputs, inputs])
            model = calibrate_batchnorm(model, calibration, seed=args.seed).eval()
        else:
            with torch.no_grad():
                model(inputs)  # a wrong --input-shape fails here, with a clear message
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise InvalidInputError(format_message(
            "The model does not run on inputs of this shape", where=args.model,
            got=f"{list(shape)} -> {type(exc).__name__}: {first_line(exc)}",
            expected="the shape the model was built for",
            hint="pass --input-shape, e.g. --input-shape 1,3,224,224")) from exc
    return loaded, model, inputs


def _check_save_path(path: Path, ctx: _Context | None = None) -> None:
    """Refuse an output type, an unwritable destination or one that is an input, up front."""
    from bnsurgery.files import check_output_path, same_file

    check_output_path(path, hint="pass another path to -o")
    weights = getattr(ctx.args, "weights", None) if ctx is not None else None
    if weights and weights != "DEFAULT" and same_file(weights, path):
        raise InvalidInputError(format_message(
            "The output would overwrite the input weights", where=str(path),
            got=f"-o {path} is the same file as --weights {weights}",
            expected="a different output file",
            hint="pass another path to -o; the input keeps its BatchNorm statistics"))
    if path.suffix.lower() not in _SAVE_SUFFIXES:
        raise InvalidInputError(format_message(
            "Unknown output file type", where=str(path), got=repr(path.suffix),
            expected=f"one of {', '.join(_SAVE_SUFFIXES)}",
            hint="use .pt2 for a torch.export program or "
                 ".safetensors/.pt for a state_dict"))


def _check_side_outputs(ctx: _Context) -> None:
    """Refuse an unwritable ``--report``/``--plot`` before any work, so no success is undone."""
    from bnsurgery.files import check_output_path, same_file

    args = ctx.args
    others = [(flag, getattr(args, name, None)) for flag, name in
              (("-o", "output"), ("--weights", "weights"), ("FILE", "file"))]
    for flag, name in (("--report", "report"), ("--plot", "plot")):
        path = getattr(args, name, None)
        if not path:
            continue
        check_output_path(path, what=flag[2:], hint=f"pass another path to {flag}")
        for other_flag, other in others:
            if other and other != "DEFAULT" and same_file(path, other):
                raise InvalidInputError(format_message(
                    f"{flag} would overwrite another file of this command", where=str(path),
                    got=f"{flag} {path} is the same file as {other_flag} {other}",
                    expected="a different file", hint=f"pass another path to {flag}"))


def _artifact_metadata(ctx: _Context, loaded: Any, plan: Any = None) -> dict[str, str]:
    """What a saved file says about itself: how to rebuild the model, and what was folded."""
    from bnsurgery import __version__

    metadata = {"bnsurgery.version": __version__, "bnsurgery.command": str(ctx.args.command),
                "bnsurgery.model": loaded.spec.text, "bnsurgery.weights": loaded.weights,
                "bnsurgery.seed": str(ctx.args.seed)}
    if plan is not None:
        metadata["bnsurgery.folded"] = json.dumps(
            [{"batchnorm": r.batchnorm, "into": r.target, "direction": r.direction}
             for r in plan.folded])
        metadata["bnsurgery.not_folded"] = json.dumps(dict(plan.skipped))
    return metadata


def _save_model(model: nn.Module, inputs: Tensor, path: Path,
                metadata: dict[str, str] | None = None) -> str:
    """Save as a torch.export program (``.pt2``) or a state_dict; return the format's name.

    ``metadata`` goes into the file: the ``.safetensors`` header, or ``bnsurgery.json`` among
    a ``.pt2`` archive's extra files (``.pt`` state_dicts have no place for it).
    """
    import io

    import torch

    from bnsurgery.files import write_bytes
    from bnsurgery.tensors import export_inputs

    _check_save_path(path)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        example = export_inputs((inputs,), True)
        batch = torch.export.Dim("batch", min=1)
        try:
            program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
        except Exception as exc:  # torch.export raises many types; keep it as the cause
            raise ExportError(format_message(
                "torch.export could not capture the model", where=type(model).__name__,
                got=f"{type(exc).__name__}: {first_line(exc)}",
                hint="save a state_dict instead (-o model.safetensors)")) from exc
        # Serialised in memory, then written by Python: a full disk is one clear error, not an
        # abort inside the C++ archive writer.
        buffer = io.BytesIO()
        torch.export.save(program, buffer,
                          extra_files={"bnsurgery.json": json.dumps(metadata or {})})
        write_bytes(path, buffer.getbuffer())
        return "torch.export program; load it with bnsurgery.pt2.load_exported_program"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        from bnsurgery._lazy import require

        safetensors_torch = require("safetensors.torch", purpose="Saving .safetensors")
        data: Any = safetensors_torch.save(state, metadata={"format": "pt", **(metadata or {})})
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()
    write_bytes(path, data)
    return "state_dict"


def _plot(ctx: _Context, report: Any) -> None:
    """Write the per-layer PNG asked for with ``--plot``."""
    path = getattr(ctx.args, "plot", None)
    if not path:
        return
    from bnsurgery.report import plot_layer_errors

    if not report.layers:
        raise InvalidInputError(format_message(
            "No per-layer errors to plot", where=path, got="no module boundary was compared",
            expected="a model with module boundaries between its inputs and outputs",
            hint="drop --plot for this model"))
    plot_layer_errors(report, path)
    ctx.progress(f"wrote {path}")


def _check_extra_outputs(ctx: _Context) -> None:
    """Refuse an unwritable --report or --plot path, or --plot without matplotlib, up front."""
    _check_side_outputs(ctx)
    if getattr(ctx.args, "plot", None):
        from bnsurgery._lazy import require

        require("matplotlib", purpose="--plot")


def _write_report(ctx: _Context, document: dict[str, Any]) -> None:
    """Write the command's document, with the environment and a summary, to ``--report``."""
    if not getattr(ctx.args, "report", None):
        return
    from bnsurgery.files import write_text
    from bnsurgery.report import collect_environment

    statuses = [entry["status"] for entry in document["reports"]]
    full = {**document, "summary": {key: statuses.count(key)
                                    for key in ("passed", "failed", "skipped")},
            "environment": collect_environment()}
    path = write_text(ctx.args.report, json.dumps(full, indent=2) + "\n", what="report")
    ctx.progress(f"wrote {path}")


def _finish(ctx: _Context, text: str, document: dict[str, Any],
            report: Any = None) -> int:
    """Write --report and --plot, then print the result; a failure there keeps the result.

    The check has finished when this runs: an error writing the report or the plot is printed
    as one line and ends the command with exit code 2, but the result is still printed.
    """
    failed: BaseException | None = None
    try:
        _write_report(ctx, document)
        if report is not None:
            _plot(ctx, report)
    except (BnSurgeryError, OSError) as exc:
        failed = exc
        document = {**document, "exit_code": EXIT_BAD_INPUT,
                    "notes": [*document.get("notes", []), f"not written: {first_line(exc)}"]}
    ctx.emit(text, document)
    if failed is not None:
        summary, _ = _error_text(failed)
        ctx.stderr.write(f"bnsurgery {ctx.args.command}: error: {summary}\n")
        return EXIT_BAD_INPUT
    return _document_exit(document)


# ---------------------------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------------------------

def _cmd_demo(ctx: _Context) -> int:
    from bnsurgery.demo import run_demo
    from bnsurgery.models import parse_input_shape

    args = ctx.args
    if args.providers:
        from bnsurgery.ort_session import resolve_providers

        resolve_providers(args.providers)  # an unavailable provider fails before the demo
    result = run_demo(args.out, weights=args.weights,
                      input_shape=parse_input_shape(args.input_shape),
                      providers=args.providers, plot=not args.no_plot, seed=args.seed,
                      progress=ctx.progress)
    details = result.to_dict()
    document = _document(ctx, reports=result.reports, output=details["report_path"],
                         file_format="report", rows=details["rows"], notes=details["notes"],
                         onnx=details["onnx_path"], plot=details["plot_path"],
                         **{key: details[key] for key in ("model", "input_shape", "plan")})
    ctx.emit(str(result), document)
    return _document_exit(document)


def _cmd_inspect_onnx(ctx: _Context) -> int:
    """``inspect FILE.onnx``: the graph's summary, without a MODEL and without running it."""
    from bnsurgery.onnx_inspect import inspect_onnx

    summary = inspect_onnx(ctx.args.model)
    document = _document(ctx, onnx=ctx.args.model, graph=summary.to_dict(), status="skipped")
    document["seed"] = document["weights"] = None  # nothing was built
    ctx.emit(str(summary), document)
    return _document_exit(document)


def _cmd_inspect(ctx: _Context) -> int:
    if str(ctx.args.model).lower().endswith(".onnx"):
        return _cmd_inspect_onnx(ctx)
    from bnsurgery._bn_registry import looks_like_batchnorm
    from bnsurgery.fuse import plan_fusion

    loaded, model, inputs = _load(ctx)
    ctx.progress("planning BatchNorm folding")
    plan = plan_fusion(model, inputs)
    folded = {r.batchnorm: r for r in plan.folded}
    rows = []
    for name, module in model.named_modules():
        if not name or not looks_like_batchnorm(module):
            continue
        record = folded.get(name)
        if record is not None:
            rows.append({"name": name, "type": type(module).__name__, "status": "folds",
                         "into": record.target, "direction": record.direction,
                         "reason": f"folds into {record.target} ({record.direction}, found by "
                                   f"{record.method})"})
        else:
            rows.append({"name": name, "type": type(module).__name__, "status": "skipped",
                         "into": None, "direction": None,
                         "reason": plan.skipped.get(name, "not reached by the plan")})
    header = ("BatchNorm", "type", "status", "reason")
    table = [(r["name"], r["type"], r["status"], r["reason"]) for r in rows]
    lines = [f"{_model_name(ctx)}: {len(rows)} BatchNorm layers, {len(plan.folded)} fold, "
             f"{len(rows) - len(plan.folded)} skipped (dataflow from "
             f"{plan.method or 'no graph'})", *render_table(header, table, rule=False)]
    check = plan.check.status if plan.check is not None else "not run"
    document = _document(ctx, loaded=loaded, inputs=inputs, plan=plan, batchnorms=rows,
                         status={"passed": "passed", "failed": "failed"}.get(check, "skipped"))
    ctx.emit("\n".join(lines), document)
    return _document_exit(document)


def _model_name(ctx: _Context) -> str:
    """The MODEL argument as given (for messages)."""
    return str(ctx.args.model)


def _cmd_replace(ctx: _Context) -> int:
    from bnsurgery.replace import replace_batchnorm
    from bnsurgery.validate import compare_models

    _check_save_path(Path(ctx.args.output), ctx)
    _check_extra_outputs(ctx)
    loaded, model, inputs = _load(ctx)
    ctx.progress("replacing BatchNorm with the from-scratch BatchNorm")
    replaced = replace_batchnorm(model, inplace=False).eval()
    ctx.progress("comparing with the original")
    report = compare_models(model, replaced, inputs, rtol=ctx.args.rtol, atol=ctx.args.atol,
                            per_layer=True if ctx.args.plot else None,
                            reference_name=f"original {_model_name(ctx)}",
                            candidate_name=f"{_model_name(ctx)} with bnsurgery BatchNorm")
    return _finish_model_command(ctx, "replace", loaded, replaced, inputs, report)


def _cmd_fuse(ctx: _Context) -> int:
    if str(ctx.args.model).lower().endswith(".onnx"):
        return _cmd_fuse_onnx(ctx)
    from bnsurgery.fuse import fuse_batchnorm, plan_fusion
    from bnsurgery.validate import compare_models

    _check_save_path(Path(ctx.args.output), ctx)
    _check_extra_outputs(ctx)
    loaded, model, inputs = _load(ctx)
    ctx.progress("folding BatchNorm")
    plan = plan_fusion(model, inputs)
    fused = fuse_batchnorm(model, inputs, plan=plan, strict=ctx.args.strict).eval()
    ctx.progress("comparing with the original")
    report = compare_models(model, fused, inputs, rtol=ctx.args.rtol, atol=ctx.args.atol,
                            per_layer=True if ctx.args.plot else None,
                            reference_name=f"original {_model_name(ctx)}",
                            candidate_name=f"fused {_model_name(ctx)}")
    return _finish_model_command(ctx, "fuse", loaded, fused, inputs, report, plan=plan)


def _finish_model_command(ctx: _Context, command: str, loaded: Any, model: nn.Module,
                          inputs: Tensor, report: Any, plan: Any = None) -> int:
    out = Path(ctx.args.output)
    text = ([str(plan)] if plan is not None else []) + [str(report)]
    output = kind = None
    if report.passed:
        ctx.progress(f"saving {out}")
        kind = _save_model(model, inputs, out, _artifact_metadata(ctx, loaded, plan))
        output = str(out)
        text.append(f"saved {out} ({kind})")
    else:
        text.append(f"not saved: the {command}d model does not match the original")
    document = _document(ctx, reports=[report], loaded=loaded, inputs=inputs, plan=plan,
                         output=output, file_format=kind)
    return _finish(ctx, "\n".join(text), document, report)


def _batchnorm_nodes(path: Path) -> int:
    """How many BatchNormalization nodes the written ONNX file still has (subgraphs too)."""
    from bnsurgery._lazy import require

    onnx = require("onnx", purpose="Counting BatchNormalization nodes")
    graph = onnx.load(str(path), load_external_data=False).graph
    count, graphs = 0, [graph]
    while graphs:
        for node in graphs.pop().node:
            count += node.op_type == "BatchNormalization"
            graphs += [a.g for a in node.attribute if a.HasField("g")]
            graphs += list(next((a.graphs for a in node.attribute if a.graphs), []))
    return count


def _opset_range(legacy: bool) -> tuple[int, int]:
    """The opsets the chosen torch.onnx exporter can write."""
    import torch.onnx

    from bnsurgery.onnx_export import MIN_DYNAMO_OPSET

    constants = getattr(torch.onnx, "_constants", None)  # torch keeps its limits there
    if legacy:
        return (getattr(constants, "ONNX_MIN_OPSET", 7),
                getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    return MIN_DYNAMO_OPSET, getattr(constants, "ONNX_MAX_OPSET", 23)


def _check_onnx_output(ctx: _Context) -> None:
    """Refuse an -o that is not a writable .onnx path, or an --opset the exporter lacks."""
    from bnsurgery.files import check_output_path

    args = ctx.args
    out = check_output_path(args.output, what="ONNX file", hint="pass another path to -o")
    if out.suffix.lower() != ".onnx":
        raise InvalidInputError(format_message(
            "Unknown output file type", where=str(out), got=repr(out.suffix),
            expected=".onnx", hint="pass -o FILE.onnx"))
    low, high = _opset_range(args.legacy_exporter)
    if not low <= args.opset <= high:
        legacy_low, legacy_high = _opset_range(True)
        other = ("" if args.legacy_exporter
                 else f" (--legacy-exporter writes {legacy_low} to {legacy_high})")
        raise InvalidInputError(format_message(
            f"The {'legacy' if args.legacy_exporter else 'torch.export-based'} ONNX exporter "
            "cannot write this opset", where="--opset", got=args.opset,
            expected=f"{low} to {high}{other}", hint="leave --opset out (18)"))


def _cmd_export(ctx: _Context) -> int:
    from bnsurgery.onnx_export import export_onnx
    from bnsurgery.ort_session import resolve_providers
    from bnsurgery.tensorrt import (
        export_tensorrt,
        save_path_for,
        tensorrt_unavailable_reason,
        validate_tensorrt,
    )
    from bnsurgery.validate import validate_onnx

    args = ctx.args
    if args.tensorrt:
        reason = tensorrt_unavailable_reason()
        if reason is not None:  # asked for explicitly: an error, before any work is done
            raise MissingDependencyError(format_message(
                f"--tensorrt {args.tensorrt} is not possible here: {reason}",
                hint="pip install 'bnsurgery[gpu]' on a machine with an NVIDIA GPU and CUDA"))
    if args.validate and args.providers:
        resolve_providers(args.providers)  # an unavailable provider fails before the export
    _check_extra_outputs(ctx)
    _check_onnx_output(ctx)
    loaded, model, inputs = _load(ctx)
    out = Path(args.output)
    ctx.progress(f"exporting to {out} (opset {args.opset}, "
                 f"{'legacy exporter' if args.legacy_exporter else 'dynamo=True'}"
                 f"{', folding BatchNorm' if not args.no_fuse else ''})")
    with _timeout_hint():
        export_onnx(model, inputs, out, fuse=not args.no_fuse, opset=args.opset,
                    dynamic_batch=not args.static_batch,
                    exporter="legacy" if args.legacy_exporter else "dynamo",
                    timeout=args.timeout)
    left = _batchnorm_nodes(out)
    payload: dict[str, Any] = {"onnx": str(out), "size_bytes": out.stat().st_size,
                               "fused": not args.no_fuse, "opset": args.opset,
                               "exporter": "legacy" if args.legacy_exporter else "dynamo",
                               "batchnorm_nodes": left}
    text = [f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset}, "
            f"{'fused' if not args.no_fuse else 'not fused'}; onnx.checker clean; batch 1 and "
            "a larger batch ran)" if not args.static_batch else
            f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, static batch)"]
    if args.no_fuse and not left:
        text.append("note: --no-fuse: bnsurgery folded nothing, but the file has no "
                    "BatchNormalization node: torch.onnx's own optimiser folded Conv+BatchNorm")
    reports = []
    if args.validate:
        ctx.progress("validating in onnxruntime against the original model")
        with _timeout_hint():
            reports.append(validate_onnx(model, out, inputs, providers=args.providers,
                                         rtol=args.rtol, atol=args.atol,
                                         per_layer=True if args.plot else None,
                                         timeout=args.timeout))
    if args.tensorrt:
        trt_path = save_path_for(out, args.tensorrt)
        ctx.progress(f"compiling with TensorRT ({args.tensorrt})")
        compiled = export_tensorrt(model, inputs, precision=args.tensorrt,
                                   fuse=not args.no_fuse, path=trt_path)
        reports.append(validate_tensorrt(model, inputs, precision=args.tensorrt,
                                         compiled=compiled, rtol=args.rtol, atol=args.atol))
        payload["tensorrt"] = str(trt_path)
        text.append(f"wrote {trt_path}")
    text += [str(r) for r in reports]
    document = _document(ctx, reports=reports, loaded=loaded, inputs=inputs, output=str(out),
                         file_format="onnx", **payload)
    return _finish(ctx, "\n".join(text), document, reports[0] if args.validate else None)


def _input_shape_from_file(ctx: _Context, path: str) -> None:
    """Default --input-shape to the ONNX file's own; refuse one the file cannot take."""
    from bnsurgery.models import parse_input_shape
    from bnsurgery.onnx_inputs import check_input_shape, format_shape, onnx_input_shapes

    shapes = list(onnx_input_shapes(path).values())
    if len(shapes) != 1:
        return  # several inputs: the model's own example inputs decide
    (declared,) = shapes
    if ctx.args.input_shape:
        check_input_shape(declared, parse_input_shape(ctx.args.input_shape), where=path,
                          hint=f"pass --input-shape {format_shape(declared).replace('N', '1')}"
                               " or leave it out to use the file's")
    elif declared and all(d is not None for d in declared[1:]):
        ctx.args.input_shape = ",".join(str(d or 1) for d in declared)  # batch 1 when dynamic
        ctx.progress(f"input shape {ctx.args.input_shape} from {path}")


def _cmd_validate(ctx: _Context) -> int:
    if str(ctx.args.model).lower().endswith(".onnx"):
        return _cmd_validate_onnx(ctx)
    from bnsurgery.ort_session import resolve_providers
    from bnsurgery.validate import validate_onnx

    args = ctx.args
    if not Path(args.file).is_file():
        raise InvalidInputError(format_message(
            "The ONNX file does not exist", where=args.file, got="no such file",
            expected="a file written by bnsurgery export", hint="check the path"))
    resolve_providers(args.providers)
    _check_extra_outputs(ctx)
    _input_shape_from_file(ctx, args.file)
    loaded, model, inputs = _load(ctx)
    ctx.progress(f"validating {args.file} in onnxruntime against {args.model}")
    with _timeout_hint():
        report = validate_onnx(model, args.file, inputs, providers=args.providers,
                               rtol=args.rtol, atol=args.atol,
                               per_layer=True if args.per_layer or args.plot else None,
                               timeout=args.timeout)
    document = _document(ctx, reports=[report], loaded=loaded, inputs=inputs, onnx=args.file)
    return _finish(ctx, str(report), document, report)


def _onnx_only_options(ctx: _Context) -> Any:
    """Refuse --weights for an ONNX MODEL (its weights are in the file), and a --report or
    --plot that would overwrite it; the --input-shape."""
    from bnsurgery.files import same_file
    from bnsurgery.models import parse_input_shape

    args = ctx.args
    if getattr(args, "weights", None):
        raise InvalidInputError(format_message(
            "--weights applies to a MODEL built in Python, not to an ONNX file",
            where=args.model, got=f"--weights {args.weights}",
            expected="no --weights (the file holds its weights)", hint="drop --weights"))
    for flag in ("--report", "--plot"):
        path = getattr(args, flag[2:], None)
        if path and same_file(path, args.model):
            raise InvalidInputError(format_message(
                f"{flag} would overwrite the ONNX file read", where=str(path),
                got=f"{flag} {path} is MODEL {args.model}", expected="a different file",
                hint=f"pass another path to {flag}"))
    return parse_input_shape(args.input_shape) if args.input_shape else None


def _onnx_inputs_entry(report: Any) -> list[dict[str, Any]]:
    return [{"name": name, **spec} for name, spec in report.details["inputs"].items()]


def _cmd_validate_onnx(ctx: _Context) -> int:
    """``validate A.onnx B.onnx``: two ONNX files against each other, no MODEL built."""
    from bnsurgery.onnx_compare import compare_onnx

    args = ctx.args
    shape = _onnx_only_options(ctx)
    _check_extra_outputs(ctx)
    ctx.progress(f"comparing {args.file} with {args.model} in onnxruntime")
    with _timeout_hint():
        report = compare_onnx(args.model, args.file, input_shape=shape, providers=args.providers,
                              rtol=args.rtol, atol=args.atol,
                              per_tensor=True if args.per_layer or args.plot else None,
                              seed=args.seed, timeout=args.timeout)
    inputs = _onnx_inputs_entry(report)
    document = _document(ctx, reports=[report], onnx=args.file, onnx_reference=args.model,
                         onnx_inputs=inputs)
    document["weights"] = None  # nothing was built: the files hold their weights
    document["input_shape"] = inputs[0]["shape"] if len(inputs) == 1 else None
    return _finish(ctx, str(report), document, report)


def _cmd_fuse_onnx(ctx: _Context) -> int:
    """``fuse X.onnx -o Y.onnx``: fold BatchNormalization nodes inside the graph, check, write."""
    from bnsurgery.files import check_output_path
    from bnsurgery.onnx_fold import fold_onnx_batchnorm

    args = ctx.args
    shape = _onnx_only_options(ctx)
    out = check_output_path(args.output, what="ONNX file", hint="pass another path to -o")
    if out.suffix.lower() != ".onnx":
        raise InvalidInputError(format_message(
            "Unknown output file type for an ONNX MODEL", where=str(out), got=repr(out.suffix),
            expected=".onnx", hint="pass -o FILE.onnx"))
    _check_extra_outputs(ctx)
    ctx.progress(f"folding BatchNormalization nodes of {args.model}")
    with _timeout_hint():
        result = fold_onnx_batchnorm(args.model, output=out, input_shape=shape,
                                     strict=args.strict, providers=args.providers,
                                     rtol=args.rtol, atol=args.atol,
                                     per_tensor=True if args.plot else None,
                                     seed=args.seed, timeout=args.timeout)
    rows = [{"name": b.name, "type": "BatchNormalization",
             "status": "folded" if b.folded else "skipped",
             "into": b.producer if b.folded else None, "direction": "after" if b.folded else None,
             "reason": b.reason} for b in result.batchnorms]
    text = [str(result), f"saved {out}" if result.output else
            f"not saved: the folded graph does not match {args.model}"]
    reports = [result.check] if result.check is not None else []
    document = _document(ctx, reports=reports, onnx=args.model, batchnorms=rows,
                         output=result.output, file_format="onnx" if result.output else None)
    document["weights"] = None
    return _finish(ctx, "\n".join(text), document, result.check)


# ---------------------------------------------------------------------------------------------
# Parser and entry point.
# ---------------------------------------------------------------------------------------------

def _cmd_recalibrate(ctx: _Context) -> int:
    """Re-estimate BatchNorm statistics from a tensor file, check the result runs, save it."""
    import torch
    from torch import Tensor

    from bnsurgery.recalibrate import recalibrate_batchnorm

    args = ctx.args
    _check_save_path(Path(args.output))
    _check_extra_outputs(ctx)
    if args.batch_size < 1 or (args.num_batches is not None and args.num_batches < 1):
        raise InvalidInputError(format_message(
            "--batch-size and --num-batches must be positive", where="--batch-size",
            got=f"{args.batch_size} / {args.num_batches}", hint="e.g. --batch-size 32"))
    path = Path(args.data)
    if not path.is_file():
        raise InvalidInputError(format_message(
            "The data file does not exist", where=str(path), hint="pass --data FILE"))
    from bnsurgery.archive import check_not_inflating

    check_not_inflating(path, what="data file",
                        hint="save the inputs with torch.save(images, FILE) or as .safetensors")
    ctx.progress(f"loading {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from bnsurgery._lazy import require

            stored = require("safetensors.torch", purpose="Reading .safetensors data").load_file(
                str(path), device="cpu")
        else:
            stored = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise InvalidInputError(format_message(
            "The data file cannot be read without unpickling code", where=str(path),
            got=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            expected="a tensor saved with torch.save, or a .safetensors file",
            hint="save the images as one (N, C, H, W) tensor")) from exc
    if isinstance(stored, dict) and len(stored) == 1:
        stored = next(iter(stored.values()))
    if not isinstance(stored, Tensor) or stored.dim() < 2 or not stored.is_floating_point():
        raise InvalidInputError(format_message(
            "The data file must hold one floating-point tensor of inputs", where=str(path),
            got=type(stored).__name__ if not isinstance(stored, Tensor)
            else f"{stored.dtype} {list(stored.shape)}",
            expected="one (N, C, ...) float tensor", hint="torch.save(images, FILE)"))
    loaded, model, _ = _load(ctx)
    batches = list(torch.split(stored, args.batch_size))
    report = recalibrate_batchnorm(model, batches, num_batches=args.num_batches,
                                   progress=not args.quiet)
    recalibrated = report.model.eval()
    with torch.no_grad():
        output = recalibrated(batches[0])
    finite = all(bool(torch.isfinite(t).all()) for t in
                 (output if isinstance(output, (tuple, list)) else [output])
                 if isinstance(t, Tensor))
    text = [str(report)]
    output = kind = None
    if finite:
        kind = _save_model(recalibrated, batches[0], Path(args.output),
                           _artifact_metadata(ctx, loaded))
        output = args.output
        text.append(f"checked: finite outputs on the first batch; saved {args.output} ({kind})")
    else:
        text.append("not saved: the recalibrated model gives non-finite outputs")
    document = _document(ctx, loaded=loaded, inputs=batches[0], output=output,
                         file_format=kind, status="passed" if finite else "failed",
                         data=str(path), recalibration=report.to_dict())
    return _finish(ctx, "\n".join(text), document)


def _cmd_kernels(ctx: _Context) -> int:
    """``kernels``: which BatchNorm backend runs on each device, and why the others do not."""
    import torch

    from bnsurgery.kernels import kernel_info

    payload: dict[str, Any] = {}
    text = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reasons are printed below, or raised
        if ctx.args.build:
            from bnsurgery.kernel_cpp import build

            ctx.progress("building the C++ CPU kernel (about a minute the first time)")
            library = build()
            payload["cpp_library"] = str(library)
            text.append(f"cpp kernel: {library}")
        else:
            ctx.progress("checking the kernels (the first check builds the C++ one)")
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        infos = [kernel_info(device) for device in devices]
    payload["devices"] = [info.to_dict() for info in infos]
    for info in infos:
        text.append(f"{info.device}: {info.backend} ({info.reason})")
        text.extend(f"  {name}: not used: {why}" for name, why in info.unavailable.items())
    # Nothing is compared here, so the status is "skipped" (``passed`` null), as for inspect.
    document = _document(ctx, status="skipped", **payload)
    document["seed"] = document["weights"] = None  # no model was built
    ctx.emit("\n".join(text), document)
    return _document_exit(document)


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On subcommands the defaults are SUPPRESSed so "bnsurgery --json export ..." also works.
    default: Any = False if top else argparse.SUPPRESS
    parser.add_argument("--json", action="store_true", default=default,
                        help="print one JSON document on stdout instead of text")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of errors")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress lines on stderr")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--weights", metavar="PATH|DEFAULT",
                        help="state_dict file (.pt/.pth loaded with weights_only=True, or "
                             ".safetensors), or DEFAULT for the library's pretrained weights; "
                             "without it: random weights (--seed) with calibrated BatchNorm")
    parser.add_argument("--input-shape", metavar="N,C,H,W",
                        help="example input shape (default: the model's, e.g. 1,3,224,224)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights and inputs (default 0)")


def _tolerances(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rtol", type=float, help="override the documented relative tolerance")
    parser.add_argument("--atol", type=float, help="override the documented absolute tolerance")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


#: ``ort_session.DEFAULT_TIMEOUT_S``, repeated because importing that module imports torch, which
#: ``bnsurgery --help`` must not wait for; a test keeps the two equal.
DEFAULT_TIMEOUT_S = 300.0


def _timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="time limit of each onnxruntime run (default "
                             f"{DEFAULT_TIMEOUT_S:g}); Ctrl-C stops a run too")


@contextlib.contextmanager
def _timeout_hint() -> Iterator[None]:
    """Name the flag in a time-limit error: the library's message names its keyword."""
    try:
        yield
    except RunTimeoutError as exc:
        raise RunTimeoutError(str(exc).replace("pass timeout=", "pass --timeout ")) from exc


def _report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", metavar="PATH", help="also write report.json there")
    parser.add_argument("--plot", metavar="PATH.png",
                        help="also plot the error per layer into a PNG (needs matplotlib)")


def _add_demo_parser(sub: _Subcommands) -> None:
    """``bnsurgery demo``: the resnet18 walk-through."""
    demo = sub.add_parser("demo", help="resnet18: replace, fuse, export, validate; write a "
                                       "report and a plot")
    demo.add_argument("--out", default="bnsurgery-demo", metavar="DIR",
                      help="output folder (default bnsurgery-demo/)")
    demo.add_argument("--weights", metavar="PATH|DEFAULT",
                      help="DEFAULT for torchvision's pretrained resnet18 (downloads), or a "
                           "state_dict file; default: random weights with calibrated BatchNorm")
    demo.add_argument("--input-shape", default="2,3,224,224", metavar="N,C,H,W",
                      help="demo batch (default 2,3,224,224)")
    demo.add_argument("--providers", metavar="LIST",
                      help="onnxruntime providers, e.g. cuda,cpu (default: CUDA if available)")
    demo.add_argument("--no-plot", action="store_true", help="do not write layer_errors.png")
    demo.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    _common(demo, top=False)
    demo.set_defaults(handler=_cmd_demo)


def _add_inspect_parser(sub: _Subcommands) -> None:
    """``bnsurgery inspect``: BatchNorm or ONNX summary."""
    inspect = sub.add_parser("inspect", help="list every BatchNorm with its fold status and "
                                             "reason; or summarise FILE.onnx (inputs, ops, "
                                             "parameters, MACs, BatchNormalization nodes)")
    _model_options(inspect)
    _common(inspect, top=False)
    inspect.set_defaults(handler=_cmd_inspect)


def _add_replace_parser(sub: _Subcommands) -> None:
    """``bnsurgery replace``: swap in the from-scratch BatchNorm."""
    replace = sub.add_parser("replace", help="swap in the from-scratch BatchNorm, compare, save")
    _model_options(replace)
    replace.add_argument("-o", "--output", required=True, metavar="OUT",
                         help="output: .pt2 (torch.export program), .safetensors or .pt "
                              "(state_dict)")
    _tolerances(replace)
    _report_options(replace)
    _common(replace, top=False)
    replace.set_defaults(handler=_cmd_replace)



def _add_fuse_parser(sub: _Subcommands) -> None:
    """``bnsurgery fuse``: fold BatchNorm into neighbours (or inside an ONNX graph)."""
    fuse = sub.add_parser("fuse", help="fold BatchNorm into neighbouring layers, compare, save; "
                                       "a MODEL.onnx has its BatchNormalization nodes folded "
                                       "inside the graph (-o OUT.onnx)")
    _model_options(fuse)
    fuse.add_argument("-o", "--output", required=True, metavar="OUT",
                      help="output: .pt2 (torch.export program; load it with "
                           "bnsurgery.pt2.load_exported_program, which refuses archives that "
                           "would run code), .safetensors or .pt (state_dict of the fused model); "
                           ".onnx for a MODEL.onnx")
    fuse.add_argument("--strict", action="store_true",
                      help="fail if any BatchNorm cannot be folded")
    fuse.add_argument("--providers", metavar="LIST",
                      help="MODEL.onnx only: onnxruntime providers of the check, e.g. cpu")
    _tolerances(fuse)
    _timeout_option(fuse)
    _report_options(fuse)
    _common(fuse, top=False)
    fuse.set_defaults(handler=_cmd_fuse)


def _add_export_parser(sub: _Subcommands) -> None:
    """``bnsurgery export``: ONNX (and TensorRT) export."""
    export = sub.add_parser("export", help="export to one ONNX file (folded by default)")
    _model_options(export)
    export.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="ONNX file")
    export.add_argument("--no-fuse", action="store_true",
                        help="do not fold BatchNorm first (torch.onnx's optimiser still folds "
                             "the Conv+BatchNorm pairs it recognises; the JSON says how many "
                             "BatchNormalization nodes are left)")
    export.add_argument("--validate", action="store_true",
                        help="run the file in onnxruntime and compare with the original model")
    export.add_argument("--providers", metavar="LIST",
                        help="onnxruntime providers for --validate, e.g. cpu or cuda,cpu "
                             "(default: CUDA if available, then CPU)")
    export.add_argument("--tensorrt", choices=("fp32", "fp16"),
                        help="also compile with TensorRT at this precision and validate it")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument("--legacy-exporter", action="store_true",
                        help="use the legacy TorchScript exporter (recorded in the file)")
    export.add_argument("--static-batch", action="store_true",
                        help="export a fixed batch size instead of a dynamic batch axis")
    _tolerances(export)
    _timeout_option(export)
    _report_options(export)
    _common(export, top=False)
    export.set_defaults(handler=_cmd_export)



def _add_validate_parser(sub: _Subcommands) -> None:
    """``bnsurgery validate``: compare an ONNX file with the model, or two ONNX files."""
    validate = sub.add_parser("validate", help="compare an ONNX file with the original model, "
                                               "or two ONNX files (validate A.onnx B.onnx)")
    _model_options(validate)
    validate.add_argument("file", metavar="FILE.onnx", help="the ONNX file to check")
    validate.add_argument("--providers", metavar="LIST",
                          help="onnxruntime providers, e.g. cpu or cuda,cpu (default: CUDA if "
                               "available, then CPU)")
    validate.add_argument("--per-layer", action="store_true",
                          help="compare module boundaries even when the outputs agree")
    _tolerances(validate)
    _timeout_option(validate)
    _report_options(validate)
    _common(validate, top=False)
    validate.set_defaults(handler=_cmd_validate)


def _add_recalibrate_parser(sub: _Subcommands) -> None:
    """``bnsurgery recalibrate``: re-estimate BatchNorm statistics."""
    recalibrate = sub.add_parser("recalibrate", help="re-estimate BatchNorm statistics from "
                                                     "a tensor file, save the model")
    _model_options(recalibrate)
    recalibrate.add_argument("--data", required=True, metavar="FILE",
                             help="one (N, C, ...) input tensor: a torch.save file (loaded with "
                                  "weights_only=True) or a .safetensors file")
    recalibrate.add_argument("--batch-size", type=int, default=32,
                             help="inputs per batch (default 32)")
    recalibrate.add_argument("--num-batches", type=int, help="stop after this many batches")
    recalibrate.add_argument("-o", "--output", required=True, metavar="OUT",
                             help="output: .pt2, .safetensors or .pt (state_dict)")
    recalibrate.add_argument("--report", metavar="PATH", help="also write the report as JSON")
    _common(recalibrate, top=False)
    recalibrate.set_defaults(handler=_cmd_recalibrate)


def _add_kernels_parser(sub: _Subcommands) -> None:
    """``bnsurgery kernels``: which kernel runs where."""
    kernels = sub.add_parser("kernels", help="which BatchNorm kernel runs on each device, and why")
    kernels.add_argument("--build", action="store_true",
                         help="build the C++ CPU kernel now and print where it lives")
    _common(kernels, top=False)
    kernels.set_defaults(handler=_cmd_kernels)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bnsurgery`` command.

    Each subcommand is declared by its own ``_add_<command>_parser`` function, so that adding a
    command is one new function and one line here.
    """
    from bnsurgery._version import __version__

    parser = argparse.ArgumentParser(
        prog="bnsurgery",
        description="BatchNorm model surgery and deployment: replace, fold, export to "
                    "ONNX/TensorRT, and prove with numbers that what ships computes what was "
                    "trained.",
        epilog="Exit codes: 0 ok, 1 numeric mismatch, 2 bad input.")
    parser.add_argument("--version", action="version", version=f"bnsurgery {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo_parser(sub)
    _add_inspect_parser(sub)
    _add_replace_parser(sub)
    _add_fuse_parser(sub)
    _add_export_parser(sub)
    _add_validate_parser(sub)
    _add_recalibrate_parser(sub)
    _add_kernels_parser(sub)
    return parser


#: Python keyword arguments in library hints, and how the command line spells them.
_CLI_SPELLING: tuple[tuple[str, str], ...] = (
    (r"print\(plan_fusion\(model, example_inputs\)\)", "bnsurgery inspect MODEL"),
    (r"(?:pass )?strict=False", "drop --strict"),
    (r"(?:pass )?dynamic_batch=False", "pass --static-batch"),
    (r"(?:pass |use )?(?:the default )?exporter='dynamo'", "leave out --legacy-exporter"),
    (r"(?:pass )?exporter='legacy'(?: explicitly)?", "pass --legacy-exporter"),
    (r"providers=\['cpu'\]", "--providers cpu"),
    (r"fuse=False", "--no-fuse"),
    (r"(?:use |leave )?opset=(\d+)", r"pass --opset \1"),
    (r"per_layer=True", "--per-layer"),
    (r"num_batches=None", "no --num-batches"),
    (r"export_onnx", "bnsurgery export"),
    (r"example_inputs", "--input-shape"),
)


def cli_spelling(text: str) -> str:
    """``text`` with the keyword arguments of each ``Hint:`` line in command-line spelling."""
    import re

    lines = []
    for line in text.splitlines():
        head, marker, hint = line.partition("Hint:")
        if marker:
            for pattern, flag in _CLI_SPELLING:
                hint = re.sub(pattern, flag, hint)
        lines.append(head + marker + hint)
    return "\n".join(lines)


def _error_text(exc: BaseException) -> tuple[str, str]:
    """The one-line summary of an error and, for a long message (a listing), the whole text."""
    from bnsurgery.messages import printable

    text = cli_spelling(str(exc)) if str(exc).strip() else type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) <= 2:  # a sentence and its Hint: one line
        return printable(" ".join(" ".join(lines).split())), ""
    return printable(lines[0].strip()), "\n".join(printable(line) for line in lines[1:])


@contextlib.contextmanager
def _notes(command: str, stream: TextIO, *, quiet: bool) -> Iterator[None]:
    """Show library warnings and log records as one line each: ``bnsurgery CMD: note: ...``.

    bnsurgery's own warnings show also under ``-q`` (they say something about the result);
    other packages' warnings (torch's deprecation notices on import) only without it.
    """
    import logging
    import warnings

    package = str(Path(__file__).resolve().parent)
    seen: set[str] = set()

    def note(text: str) -> None:
        summary, _ = _error_text(RuntimeError(text))
        if summary not in seen:  # a warning raised once per layer is said once
            seen.add(summary)
            stream.write(f"bnsurgery {command}: note: {summary}\n")

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if not quiet or str(Path(filename).resolve()).startswith(package):
            note(str(message))

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            note(record.getMessage())

    logger = logging.getLogger("bnsurgery")
    handler = Handler(logging.WARNING)
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # no second copy from logging's last-resort handler
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bnsurgery`` command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 ok, 1 numeric mismatch, 2 bad input.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version and usage errors (argparse exits 2)
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    stdout, stderr = sys.stdout, sys.stderr
    ctx = _Context(args, stdout, stderr)
    handler: Callable[[_Context], int] = args.handler
    from bnsurgery.files import Terminated, cleanup_on_termination

    try:
        with cleanup_on_termination(), _notes(args.command, stderr, quiet=args.quiet):
            return handler(ctx)
    except Exception as exc:  # bugs too: the CLI ends with one line; --debug shows the traceback
        code = EXIT_MISMATCH if isinstance(exc, NumericMismatchError) else EXIT_BAD_INPUT
        if args.debug:
            traceback.print_exception(exc, file=stderr)
        summary, rest = _error_text(exc)
        if not isinstance(exc, (BnSurgeryError, OSError)):
            summary = (f"unexpected {type(exc).__name__}: {summary} (--debug shows the "
                       "traceback)")
        stderr.write(f"bnsurgery {args.command}: error: {summary}\n")
        if rest:
            stderr.write(rest + "\n")
        if args.json:
            from bnsurgery.schema import SCHEMA_VERSION

            stdout.write(json.dumps({
                "schema_version": SCHEMA_VERSION, "command": args.command, "status": "error",
                "passed": None, "exit_code": code, "model": None, "input_shape": None,
                "seed": getattr(args, "seed", None), "weights": getattr(args, "weights", None),
                "reports": [], "plan": None, "output": None, "format": None,
                "error": {"type": type(exc).__name__, "message": cli_spelling(str(exc))}},
                indent=2) + "\n")
        return code
    except Terminated as exc:
        stderr.write(f"bnsurgery: {exc}; temporary files removed\n")
        return 128 + exc.signal_number
    except KeyboardInterrupt:
        stderr.write("bnsurgery: interrupted\n")
        return 130
