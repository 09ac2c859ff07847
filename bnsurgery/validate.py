"""Numeric equivalence checks: PyTorch against PyTorch, and PyTorch against onnxruntime.

What ships must compute what was trained. :func:`compare_models` runs a reference model (the
original) and a candidate (the replaced or fused model, possibly in float16/bfloat16, on CPU or
CUDA) on the same inputs; :func:`validate_onnx` runs an exported file in onnxruntime, checks that
the execution provider asked for is the one actually used (onnxruntime silently falls back to the
CPU), sweeps the batch size, and compares every output with the ORIGINAL PyTorch model. Both
return an :class:`~bnsurgery.report.EquivalenceReport`.

Both run the one core :func:`bnsurgery.comparison.run_and_compare` (shared with the TensorRT
check) under the tolerances of :data:`bnsurgery.comparison.TOLERANCES`. When a float32 reference
allows it, the report also holds the error of the candidate and of the reference's own float32
run against a float64 run of the reference: the candidate should be about as accurate as the
reference itself. When a check fails, the first diverging module is named (see
:mod:`bnsurgery.divergence`); onnxruntime runs go through :class:`bnsurgery.ort_session.OnnxRunner`,
which gives each a time limit.

The tensor helpers and the tolerance table that used to live here are importable from this module
still (``as_input_tuple``, ``check_eval_mode``, ``flatten_outputs``, ``resize_batch``,
``select_tolerance``, ``TOLERANCES``, ``run_and_compare``, ``RunComparison``); their homes are
:mod:`bnsurgery.tensors` and :mod:`bnsurgery.comparison`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnsurgery._lazy import require
from bnsurgery.comparison import (
    TOLERANCES,
    OutputComparison,
    RunComparison,
    Tolerance,
    float64_copy,
    run_and_compare,
    select_tolerance,
)
from bnsurgery.divergence import LayerComparison, layer_errors, onnx_layer_errors
from bnsurgery.errors import BackendRunError, InvalidInputError, format_message
from bnsurgery.messages import first_line
from bnsurgery.ort_session import DEFAULT_TIMEOUT_S, OnnxRunner, file_details, resolve_providers
from bnsurgery.report import EquivalenceReport, collect_environment
from bnsurgery.tensors import (
    as_input_tuple,
    batch_size_of,
    cast_inputs,
    check_eval_mode,
    flatten_outputs,
    model_device,
    model_dtype,
    model_on,
    resize_batch,
    tf32_allowed,
)

__all__ = [
    "RunComparison",
    "TOLERANCES",
    "as_input_tuple",
    "check_eval_mode",
    "compare_models",
    "flatten_outputs",
    "resize_batch",
    "run_and_compare",
    "select_tolerance",
    "validate_onnx",
]

_NO_COMPARISON = LayerComparison((), None, ())


def _failed(outputs: Sequence[OutputComparison], failures: Sequence[str]) -> bool:
    return bool(failures) or not all(o.passed for o in outputs)


def _float32_reference(reference: nn.Module, device: torch.device) -> nn.Module:
    """The reference on ``device`` in float32: the caller's model itself, or a moved copy."""
    return model_on(reference, device,
                    torch.float32 if model_dtype(reference) != torch.float32 else None)


# --------------------------------------------------------------------------------------------
# PyTorch against PyTorch.
# --------------------------------------------------------------------------------------------

def compare_models(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    *,
    device: str | torch.device | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    allow_tf32: bool = False,
    per_layer: bool | None = None,
    float64_baseline: bool = True,
    repeats: int = 1,
    reference_name: str = "reference (PyTorch float32)",
    candidate_name: str | None = None,
) -> EquivalenceReport:
    """Compare a candidate PyTorch model with the reference on the same inputs.

    The reference always runs in float32. The candidate runs in its own dtype: a float16 or
    bfloat16 candidate gets its inputs cast and is judged with that dtype's tolerance. On CUDA,
    TF32 is switched off for the comparison unless ``allow_tf32`` (then the TF32 tolerance
    applies); the caller's TF32 settings are restored afterwards. Neither model is modified:
    a model on another device is deep-copied before being moved.

    Args:
        reference: The original model, in eval mode.
        candidate: The model to judge (replaced, fused, half precision...), in eval mode.
        inputs: One tensor or a sequence of positional inputs.
        device: Where to run both; defaults to the reference's device.
        rtol: Override the documented relative tolerance (see :data:`TOLERANCES`).
        atol: Override the documented absolute tolerance.
        allow_tf32: Let CUDA float32 work use TF32.
        per_layer: Compare module boundaries too: ``True`` always, ``False`` never, ``None``
            (default) only when the check fails, to name the first diverging module.
        float64_baseline: Also run a float64 copy of the reference, to report how accurate the
            candidate and the reference are against it.
        repeats: Forward passes to time each model with (median reported in ``timings``).
        reference_name: Description of the reference in the report.
        candidate_name: Description of the candidate (default: its class and dtype).

    Returns:
        The equivalence report; ``report.passed`` says whether every output is in tolerance.

    Raises:
        InvalidInputError: A model is in training mode, or the inputs are not tensors.
        IncompatibleModuleError: A model is not an ``nn.Module``.
    """
    check_eval_mode(reference, what="compare_models (reference)")
    check_eval_mode(candidate, what="compare_models (candidate)")
    inputs = as_input_tuple(inputs)
    device = torch.device(device) if device is not None else model_device(reference)
    cand_dtype = model_dtype(candidate)
    tf32 = allow_tf32 and device.type == "cuda" and cand_dtype == torch.float32
    tolerance = select_tolerance(cand_dtype, tf32=tf32, rtol=rtol, atol=atol)
    ref_model, cand_model = _float32_reference(reference, device), model_on(candidate, device)
    ref_inputs = cast_inputs(inputs, device, torch.float32)
    model64, why = float64_copy(ref_model, device) if float64_baseline else (None, None)
    with tf32_allowed(tf32) if device.type == "cuda" else contextlib.nullcontext():
        run = run_and_compare(ref_model, cand_model, ref_inputs,
                              cast_inputs(inputs, device, cand_dtype),
                              batch=batch_size_of(inputs), tolerance=tolerance, device=device,
                              repeats=repeats, model64=model64)
        comparison = _NO_COMPARISON
        failed = _failed(run.outputs, run.failures)
        if per_layer or (per_layer is None and failed):
            comparison = layer_errors(ref_model, cand_model, ref_inputs, tolerance=tolerance,
                                      output_failed=failed)
    return EquivalenceReport(
        check="pytorch", reference=reference_name,
        candidate=candidate_name or f"{type(candidate).__name__} "
                                    f"({str(cand_dtype).replace('torch.', '')})",
        backend=f"pytorch:{device}", tolerance=tolerance, outputs=run.outputs,
        failures=run.failures, first_divergence=comparison.first_divergence,
        divergence_suspects=comparison.suspects, layers=comparison.layers,
        notes=tuple(n for n in (why, *run.notes) if n),
        details={"device": str(device), "candidate_dtype": str(cand_dtype),
                 "tf32_used": tf32, "inputs": [list(t.shape) for t in inputs]},
        timings={"reference_forward_s": run.reference_seconds,
                 "candidate_forward_s": run.candidate_seconds},
        environment=collect_environment(device=device))


# --------------------------------------------------------------------------------------------
# PyTorch against onnxruntime.
# --------------------------------------------------------------------------------------------

def _sweep_sizes(batch: int) -> list[int]:
    return sorted({1, batch, max(5, 2 * batch)})


def _batch_sizes(runner: OnnxRunner, inputs: Sequence[Tensor],
                 batch_sizes: Sequence[int] | None) -> tuple[list[int | None], bool, str | None]:
    """The batch sizes to run, whether the file's batch axis is dynamic, and a note.

    Raises:
        InvalidInputError: The inputs' batch does not fit a static batch axis, or a requested
            batch size is not a positive integer.
    """
    batch = batch_size_of(inputs)
    dim0 = runner.input_shapes[0][0] if runner.input_shapes and runner.input_shapes[0] else None
    dynamic = not isinstance(dim0, int)
    if batch is None:
        return [None], dynamic, None
    if not dynamic:
        if dim0 != batch:
            raise InvalidInputError(format_message(
                "The inputs' batch size does not match the file's static batch axis",
                where=str(runner.path), got=batch, expected=dim0,
                hint=f"pass inputs with batch {dim0}, or export with dynamic_batch=True"))
        return [batch], dynamic, f"the batch axis is static ({dim0}); no batch sweep"
    sizes = list(batch_sizes) if batch_sizes else _sweep_sizes(batch)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise InvalidInputError(format_message(
            "Batch sizes must be positive integers", where="batch_sizes", got=sizes,
            expected="e.g. [1, 2, 5]", hint="leave batch_sizes=None for the default sweep"))
    return list(sizes), dynamic, None


def _sweep(runner: OnnxRunner, reference: nn.Module, inputs: Sequence[Tensor],
           sizes: Sequence[int | None], *, tolerance: Tolerance, device: torch.device,
           model64: nn.Module | None, seed: int
           ) -> tuple[list[OutputComparison], list[str], list[str], dict[str, float]]:
    """Run the file and the reference at every batch size; outputs, failures, notes, timings.

    A batch size onnxruntime cannot run is a failure of the check, not an error: the report
    says which sizes ran.
    """
    outputs: list[OutputComparison] = []
    failures: list[str] = []
    notes: list[str] = []
    timings: dict[str, float] = {}
    for size in sizes:
        batch_inputs = tuple(inputs) if size is None else resize_batch(inputs, size, seed)
        try:
            run = run_and_compare(reference, runner,
                                  cast_inputs(batch_inputs, device, torch.float32),
                                  batch_inputs, batch=size, tolerance=tolerance, device=device,
                                  model64=model64)
        except BackendRunError as exc:
            cause = exc.__cause__ or exc
            failures.append(f"batch {size} did not run in onnxruntime: "
                            f"{type(cause).__name__}: {first_line(cause)}")
            continue
        if size == batch_size_of(inputs):
            timings.update(onnxruntime_run_s=run.candidate_seconds,
                           reference_forward_s=run.reference_seconds)
        outputs += run.outputs
        failures += [f.replace("the candidate", "the ONNX file") for f in run.failures
                     if f.replace("the candidate", "the ONNX file") not in failures]
        notes += [n for n in run.notes if n not in notes]
    return outputs, failures, notes, timings


def _onnx_diagnosis(reference: nn.Module, runner: OnnxRunner, inputs: Sequence[Tensor], *,
                    providers: Sequence[str], tolerance: Tolerance, device: torch.device,
                    output_failed: bool, wanted: bool) -> tuple[LayerComparison, str | None]:
    """The per-layer comparison (when ``wanted``) and a note on how it was made or why not.

    Only the failures a debug copy of a valid file can meet are recorded as a note (onnx
    cannot infer shapes or save it, onnxruntime cannot load or run it, the disk is full); a
    bug of bnsurgery's own propagates instead of becoming a note, and so does a time limit.
    """
    if not wanted:
        return _NO_COMPARISON, None
    onnx = require("onnx", purpose="Comparing ONNX module outputs")
    try:
        return onnx_layer_errors(reference, runner.path, inputs, providers=providers,
                                 tolerance=tolerance, device=device, output_failed=output_failed,
                                 timeout=runner.timeout)
    except (BackendRunError, InvalidInputError, OSError,
            onnx.shape_inference.InferenceError) as exc:
        return _NO_COMPARISON, (f"per-layer comparison not possible: {type(exc).__name__}: "
                                f"{first_line(exc)}")


def _provider_failures(requested: Sequence[str], used: Sequence[str]) -> list[str]:
    if requested[0] in used:
        return []
    return [f"{requested[0]} was requested but onnxruntime used {used[0]} (it falls back "
            "silently when the provider cannot be loaded)"]


def _open_file(path: str | Path, providers: Sequence[str] | str | None, inputs: Sequence[Tensor],
               timeout: float) -> tuple[OnnxRunner, list[str], dict[str, Any]]:
    """The runner for ``path``, the providers asked for, and the file's details.

    Raises:
        InvalidInputError: The file is missing or cannot be loaded, or the number of inputs
            differs from the file's.
    """
    require("onnx", purpose="Validating ONNX files")
    require("onnxruntime", purpose="Validating ONNX files")
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(format_message(
            "The ONNX file does not exist", where=str(path), got="no such file",
            expected="an .onnx file", hint="export one first with export_onnx"))
    requested = resolve_providers(providers)
    details = file_details(path)
    runner = OnnxRunner(path, requested, timeout=timeout)
    runner.feed(inputs)  # refuses a wrong number of inputs before any work is done
    details.update(providers_requested=requested, providers_used=runner.providers_used)
    return runner, requested, details


def validate_onnx(
    reference: nn.Module,
    path: str | Path,
    inputs: Tensor | Sequence[Tensor],
    *,
    providers: Sequence[str] | str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    batch_sizes: Sequence[int] | None = None,
    per_layer: bool | None = None,
    float64_baseline: bool = True,
    seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> EquivalenceReport:
    """Run an ONNX file in onnxruntime and compare it with the original PyTorch model.

    Compare with the ORIGINAL (unfused) model: that is what was trained, so a folding bug and
    an export bug both show. The check fails when any output of any swept batch size is out of
    tolerance, when a batch size does not run, when the number of outputs differs, or when
    onnxruntime did not use the execution provider asked for (it falls back to the CPU with only
    a log line).

    Args:
        reference: The original PyTorch model, in eval mode.
        path: The ONNX file.
        inputs: Example inputs (one tensor or a sequence), batch first.
        providers: Execution providers in order of preference, by full name or as ``"cpu"``,
            ``"cuda"``; a comma-separated string works too. Default: CUDA when onnxruntime offers
            it, then CPU. The first one must be the one onnxruntime actually uses.
        rtol: Override the documented relative tolerance (see :data:`TOLERANCES`).
        atol: Override the documented absolute tolerance.
        batch_sizes: Batch sizes to sweep when the file's batch axis is dynamic. Default:
            1, the given batch and a larger one (``max(5, 2 * batch)``).
        per_layer: Compare module boundaries too (``None``: only when the check fails). Uses a
            debug copy of the file with the boundary values exposed as outputs.
        float64_baseline: Also run a float64 copy of the reference and report the accuracy of
            both the file and the reference's own float32 run against it.
        seed: Seed for the extra rows drawn for larger batch sizes.
        timeout: Seconds one onnxruntime run may take (an ONNX file is code; a Loop node may
            never finish). Ctrl-C stops a run too.

    Returns:
        The equivalence report.

    Raises:
        InvalidInputError: The file is missing or cannot be loaded, the inputs do not match the
            file's inputs, or the reference is in training mode.
        MissingDependencyError: onnx/onnxruntime are missing, or a requested provider is not
            available.
        RunTimeoutError: An onnxruntime run took longer than ``timeout``.
    """
    check_eval_mode(reference, what="validate_onnx")
    inputs = as_input_tuple(inputs)
    runner, requested, details = _open_file(path, providers, inputs, timeout)
    floats = [d for d in runner.input_dtypes if d is not None and d.is_floating_point]
    tolerance = select_tolerance(*floats[:1], backend="onnxruntime", rtol=rtol, atol=atol)
    sizes, details["dynamic_batch_axis"], sweep_note = _batch_sizes(runner, inputs, batch_sizes)
    device = model_device(reference)
    ref_model = _float32_reference(reference, device)
    model64, why = float64_copy(ref_model, device) if float64_baseline else (None, None)
    outputs, failures, notes, timings = _sweep(runner, ref_model, inputs, sizes,
                                               tolerance=tolerance, device=device,
                                               model64=model64, seed=seed)
    failures = _provider_failures(requested, runner.providers_used) + failures
    notes = [n for n in (sweep_note, why) if n] + notes
    failed = _failed(outputs, failures)
    comparison, note = _onnx_diagnosis(ref_model, runner, inputs, providers=requested,
                                       tolerance=tolerance, device=device, output_failed=failed,
                                       wanted=per_layer or (per_layer is None and failed))
    notes += [note] if note else []
    details.update(batch_sizes=sizes, inputs=[list(t.shape) for t in inputs])
    return _onnxruntime_report(runner, tolerance, device, outputs=outputs, failures=failures,
                               comparison=comparison, notes=notes, details=details,
                               timings=timings)


def _onnxruntime_report(runner: OnnxRunner, tolerance: Tolerance, device: torch.device, *,
                        outputs: list[OutputComparison], failures: list[str],
                        comparison: LayerComparison, notes: list[str], details: dict[str, Any],
                        timings: dict[str, float]) -> EquivalenceReport:
    """Assemble :func:`validate_onnx`'s report from the sweep and the per-layer diagnosis."""
    return EquivalenceReport(
        check="onnxruntime", reference="original PyTorch model (float32)",
        candidate=f"{runner.path.name} in onnxruntime",
        backend=f"onnxruntime:{runner.providers_used[0]}", tolerance=tolerance,
        outputs=tuple(outputs), failures=tuple(failures),
        first_divergence=comparison.first_divergence, divergence_suspects=comparison.suspects,
        layers=comparison.layers, notes=tuple(notes),
        details={**details, "cuda_use_tf32": False if "CUDAExecutionProvider"
                 in runner.providers_used else None},
        timings={"session_create_s": runner.load_seconds, **timings},
        environment=collect_environment(device=device))
