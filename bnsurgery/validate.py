"""Numeric equivalence checks: PyTorch against PyTorch, and PyTorch against onnxruntime.

What ships must compute what was trained. :func:`compare_models` runs a reference model (the
original) and a candidate (the replaced or fused model, possibly in float16/bfloat16, on CPU or
CUDA) on the same inputs; :func:`validate_onnx` runs an exported file in onnxruntime, checks that
the execution provider asked for is the one actually used (onnxruntime silently falls back to the
CPU), sweeps the batch size, and compares every output with the ORIGINAL PyTorch model. Both
return an :class:`~bnsurgery.report.EquivalenceReport`.

Tolerances (:data:`TOLERANCES`) are chosen per dtype and backend and documented next to their
values. Errors are measured relative to the *output scale* (the largest absolute reference value),
so rounding noise on near-zero logits does not fail a check while a layer that is a few percent
off does. When a float32 reference allows it, the report also holds the error of the candidate and
of the reference's own float32 run against a float64 run of the reference: the candidate should be
about as accurate as the reference itself.

When a check fails, the first diverging module is named (see :mod:`bnsurgery.divergence`);
onnxruntime sessions and execution providers are set up in :mod:`bnsurgery.ort_session`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnsurgery._lazy import require
from bnsurgery.divergence import LayerComparison, _bn_like, _onnx_layer_errors, layer_errors
from bnsurgery.errors import InvalidInputError, format_message
from bnsurgery.finite import require_finite_reference
from bnsurgery.ort_session import _ONNX_TENSOR_TYPES, _file_details, _session, resolve_providers
from bnsurgery.report import (
    EquivalenceReport,
    OutputComparison,
    Tolerance,
    collect_environment,
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

#: Documented tolerances, per dtype and backend. ``allowed = atol + rtol * output_scale``.
#: The fp32 figures leave a margin of about 15x over what was measured on randomly initialised
#: resnet18, mobilenet_v3_small and efficientnet_b0 with calibrated BatchNorm state (float32
#: PyTorch against float64: 1e-6 to 7e-6 of the output scale; onnxruntime CPU against PyTorch:
#: up to 7e-6), while one convolution scaled by 5% moves the output by 5e-2 to 3e-1 of its scale.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(
        "fp32", rtol=1e-4, atol=1e-6,
        why="float32 against float32 (CPU, CUDA with TF32 off, onnxruntime CPU or CUDA with "
            "use_tf32=0): measured rounding differences are 1e-6 to 7e-6 of the output scale"),
    "tf32": Tolerance(
        "tf32", rtol=1e-2, atol=1e-4,
        why="TF32 matmuls and convolutions keep 10 mantissa bits (about 5e-4 per product); "
            "errors accumulate over depth to about 1e-3 of the output scale"),
    "tensorrt-fp32": Tolerance(
        "tensorrt-fp32", rtol=1e-3, atol=1e-5,
        why="TensorRT float32 engines with TF32 disabled pick their own tactics and fuse layers, "
            "so rounding differs more than between two float32 PyTorch runs"),
    "fp16": Tolerance(
        "fp16", rtol=5e-2, atol=1e-3,
        why="float16 keeps 10 mantissa bits and rounds every activation; measured 3e-3 "
            "(resnet18) to 2e-2 (efficientnet_b0) of the output scale against float32"),
    "bf16": Tolerance(
        "bf16", rtol=1e-1, atol=1e-2,
        why="bfloat16 keeps 7 mantissa bits; measured 3e-2 (resnet18) to 8e-2 "
            "(mobilenet_v3_small) of the output scale against float32; randomly initialised "
            "deep networks can exceed this (2.7e-1 for efficientnet_b0): pass rtol to override"),
}

_DTYPE_LABEL: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------------
# Small helpers shared with export_onnx, tensorrt and the CLI.
# --------------------------------------------------------------------------------------------

def as_input_tuple(inputs: Tensor | Sequence[Tensor], *, where: str = "inputs"
                   ) -> tuple[Tensor, ...]:
    """Normalise one tensor or a sequence of tensors into a tuple of positional inputs.

    Raises:
        InvalidInputError: ``inputs`` is empty or holds something other than tensors.
    """
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    got = type(inputs).__name__ if not isinstance(inputs, (tuple, list)) else \
        f"a {type(inputs).__name__} of {[type(t).__name__ for t in inputs]}"
    raise InvalidInputError(format_message(
        "Model inputs must be a tensor or a non-empty sequence of tensors", where=where, got=got,
        expected="torch.Tensor or tuple[torch.Tensor, ...]",
        hint="pass example inputs such as torch.randn(1, 3, 224, 224)"))


def check_eval_mode(model: nn.Module, *, what: str) -> None:
    """Refuse a model whose BatchNorm (or the model itself) is in training mode.

    A BatchNorm in training mode normalises with the statistics of the batch; an exported or
    folded one uses running statistics. Comparing or exporting such a model would silently check
    something else than what runs.

    Args:
        model: The model to check.
        what: What is about to happen, for the message (e.g. ``"export_onnx"``).

    Raises:
        IncompatibleModuleError: ``model`` is not an ``nn.Module``.
        InvalidInputError: The model or one of its BatchNorm-like modules is in training mode.
    """
    if not isinstance(model, nn.Module):
        from bnsurgery.errors import IncompatibleModuleError
        raise IncompatibleModuleError(format_message(
            f"{what} needs a torch.nn.Module", got=type(model).__name__,
            expected="an nn.Module", hint="pass the model object, not its state_dict"))
    # Only modules whose training flag changes what they compute matter; the root's own flag
    # does not (a torch.export GraphModule reports training=True and cannot always be .eval()'d).
    training = [name or "<root>" for name, module in model.named_modules()
                if module.training and (isinstance(module, (nn.modules.batchnorm._NormBase,
                                                            nn.modules.dropout._DropoutNd))
                                        or _bn_like(module))]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more"
                                           if len(training) > 5 else "")
        raise InvalidInputError(format_message(
            f"{what} needs a model in eval mode: in training mode BatchNorm normalises with batch "
            "statistics (and dropout is random), while the exported or folded model uses the "
            "running statistics",
            where=shown, got="training=True", expected="training=False",
            hint="call model.eval() first"))


def _first_tensor(model: nn.Module) -> Tensor | None:
    for tensor in model.parameters():
        return tensor
    for tensor in model.buffers():
        return tensor
    return None


def _model_device(model: nn.Module) -> torch.device:
    tensor = _first_tensor(model)
    return tensor.device if tensor is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _on(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """``model`` itself if already on ``device`` (and ``dtype``), else a moved deep copy.

    The caller's model is never moved: ``nn.Module.to`` works in place.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    same = all(t.device == device for t in tensors) and (
        dtype is None or all(t.dtype == dtype for t in tensors if t.is_floating_point()))
    if same:
        return model
    moved = copy.deepcopy(model).to(device)
    return moved.to(dtype) if dtype is not None else moved


def _cast_inputs(inputs: Sequence[Tensor], device: torch.device, dtype: torch.dtype | None
                 ) -> tuple[Tensor, ...]:
    return tuple(t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point()
                 else t.to(device) for t in inputs)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """Set both TF32 switches for the duration, then restore what the caller had."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flatten_outputs(output: Any, prefix: str = "output") -> list[tuple[str, Tensor]]:
    """Name every tensor in a (nested) model output, in the order exporters flatten them."""
    if isinstance(output, Tensor):
        return [(prefix, output)]
    if isinstance(output, Mapping):
        items: list[tuple[str, Tensor]] = []
        for key, value in output.items():
            items += flatten_outputs(value, f"{prefix}[{key!r}]")
        return items
    if isinstance(output, (tuple, list)):
        items = []
        for index, value in enumerate(output):
            items += flatten_outputs(value, f"{prefix}[{index}]")
        return items
    return []


def _batch_of(inputs: Sequence[Tensor]) -> int | None:
    return int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else None


def _timed(function: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """Run ``function`` ``repeats`` times (at least once); return the last result and the median."""
    times = []
    result = None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def select_tolerance(dtype: torch.dtype = torch.float32, *, backend: str = "pytorch",
                     tf32: bool = False, rtol: float | None = None, atol: float | None = None
                     ) -> Tolerance:
    """Pick the documented tolerance for a dtype and backend, with optional overrides.

    Args:
        dtype: The candidate's compute dtype.
        backend: ``"pytorch"``, ``"onnxruntime"`` or ``"tensorrt"``.
        tf32: Whether TF32 was allowed for float32 work.
        rtol: Replace the tolerance's ``rtol``.
        atol: Replace the tolerance's ``atol``.

    Returns:
        The tolerance; its label says ``(custom)`` when overridden.
    """
    if dtype in _DTYPE_LABEL:
        base = TOLERANCES[_DTYPE_LABEL[dtype]]
    elif tf32:
        base = TOLERANCES["tf32"]
    elif backend == "tensorrt":
        base = TOLERANCES["tensorrt-fp32"]
    else:
        base = TOLERANCES["fp32"]
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and (not isinstance(value, (int, float)) or value < 0
                                  or not math.isfinite(value)):
            raise InvalidInputError(format_message(
                "A tolerance must be a finite non-negative number", where=name, got=value,
                expected="a float >= 0", hint=f"leave {name}=None to use the documented default"))
    if rtol is None and atol is None:
        return base
    return Tolerance(f"{base.label} (custom)", rtol=base.rtol if rtol is None else float(rtol),
                     atol=base.atol if atol is None else float(atol),
                     why=f"user override of {base.label}")


def _compare(name: str, batch: int | None, reference: Tensor, candidate: Tensor,
             tolerance: Tolerance, reference64: Tensor | None = None) -> OutputComparison:
    """All per-output metrics; computed in float64 on the CPU so the metric adds no error."""
    ref = reference.detach().to("cpu", torch.float64)
    shape = tuple(ref.shape)
    if tuple(candidate.shape) != shape:
        inf = math.inf
        return OutputComparison(name, batch, shape, inf, _scale(ref), inf, inf, math.nan, None,
                                tolerance.allowed(_scale(ref)), False)
    cand = candidate.detach().to("cpu", torch.float64)
    diff = (cand - ref).abs()
    finite = bool(torch.isfinite(cand).all()) and bool(torch.isfinite(ref).all())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if not finite:
        max_abs = math.inf if math.isfinite(max_abs) or math.isnan(max_abs) else max_abs
    scale = _scale(ref)
    mean_abs = float(diff.mean()) if diff.numel() else 0.0
    ref_norm, cand_norm = float(ref.norm()), float(cand.norm())
    if ref_norm == 0.0 and cand_norm == 0.0:
        cosine = 1.0
    elif ref_norm == 0.0 or cand_norm == 0.0:
        cosine = 0.0
    else:
        cosine = float((ref.flatten() @ cand.flatten()) / (ref_norm * cand_norm))
    top1 = None
    if ref.dim() == 2 and ref.shape[1] > 1 and ref.shape[0] > 0:
        top1 = float((ref.argmax(1) == cand.argmax(1)).double().mean())
    allowed = tolerance.allowed(scale)
    float64_error = reference_float64_error = None
    if reference64 is not None and tuple(reference64.shape) == shape:
        ref64 = reference64.detach().to("cpu", torch.float64)
        float64_error = float((cand - ref64).abs().max()) if ref64.numel() else 0.0
        reference_float64_error = float((ref - ref64).abs().max()) if ref64.numel() else 0.0
    return OutputComparison(
        name=name, batch=batch, shape=shape, max_abs_error=max_abs, scale=scale,
        max_rel_error=max_abs / scale if scale > 0 else max_abs, mean_abs_error=mean_abs,
        cosine_similarity=cosine, top1_agreement=top1, allowed_error=allowed,
        passed=finite and max_abs <= allowed, float64_error=float64_error,
        reference_float64_error=reference_float64_error)


def _scale(reference: Tensor) -> float:
    if reference.numel() == 0:
        return 0.0
    magnitude = reference.abs()
    return float(torch.where(torch.isfinite(magnitude), magnitude, 0).max())


def _float64_model(reference: nn.Module, device: torch.device
                   ) -> tuple[nn.Module | None, str | None]:
    """A float64 copy of ``reference``, or ``None`` and the reason it could not be made."""
    try:
        return copy.deepcopy(reference).to(device=device, dtype=torch.float64), None
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return None, f"no float64 copy of the reference ({type(exc).__name__}: {exc})"


def _float64_outputs(model64: nn.Module | None, inputs: Sequence[Tensor], device: torch.device
                     ) -> tuple[list[tuple[str, Tensor]] | None, str | None]:
    """Outputs of the float64 copy, or ``None`` and the reason it could not run."""
    if model64 is None:
        return None, None
    try:
        with torch.no_grad():
            return flatten_outputs(model64(*_cast_inputs(inputs, device, torch.float64))), None
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return None, f"no float64 run of the reference ({type(exc).__name__}: {exc})"


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
    device = torch.device(device) if device is not None else _model_device(reference)
    cand_dtype = _model_dtype(candidate)
    tf32 = allow_tf32 and device.type == "cuda" and cand_dtype == torch.float32
    tolerance = select_tolerance(cand_dtype, tf32=tf32, rtol=rtol, atol=atol)
    ref_model = _on(reference, device, torch.float32 if _model_dtype(reference) != torch.float32
                    else None)
    cand_model = _on(candidate, device)
    ref_inputs = _cast_inputs(inputs, device, torch.float32)
    cand_inputs = _cast_inputs(inputs, device, cand_dtype)
    batch = _batch_of(inputs)
    tf32_context = _tf32(tf32) if device.type == "cuda" else contextlib.nullcontext()
    with tf32_context, torch.no_grad():
        run = run_and_compare(ref_model, cand_model, ref_inputs, cand_inputs, batch=batch,
                              tolerance=tolerance, device=device, repeats=repeats,
                              float64_baseline=float64_baseline)
        outputs, failures, notes = run.outputs, run.failures, list(run.notes)
        ref_time, cand_time = run.reference_seconds, run.candidate_seconds
        comparison = LayerComparison((), None, ())
        failed = bool(failures) or not all(o.passed for o in outputs)
        if per_layer or (per_layer is None and failed):
            comparison = layer_errors(ref_model, cand_model, ref_inputs, tolerance=tolerance,
                                      output_failed=failed)
    if candidate_name is None:
        candidate_name = f"{type(candidate).__name__} ({str(cand_dtype).replace('torch.', '')})"
    return EquivalenceReport(
        check="pytorch", reference=reference_name, candidate=candidate_name,
        backend=f"pytorch:{device}", tolerance=tolerance, outputs=tuple(outputs),
        failures=tuple(failures), first_divergence=comparison.first_divergence,
        divergence_suspects=comparison.suspects, layers=comparison.layers, notes=tuple(notes),
        details={"device": str(device), "candidate_dtype": str(cand_dtype),
                 "tf32_used": tf32, "inputs": [list(t.shape) for t in inputs]},
        timings={"reference_forward_s": ref_time, "candidate_forward_s": cand_time},
        environment=collect_environment(device=device))


@dataclass(frozen=True)
class RunComparison:
    """Outputs of one reference run and one candidate run, compared (see run_and_compare)."""

    outputs: list[OutputComparison]
    failures: list[str]
    reference_seconds: float
    candidate_seconds: float
    notes: tuple[str, ...]


def run_and_compare(ref_model: nn.Module, candidate: Callable[..., Any],
                    ref_inputs: Sequence[Tensor], cand_inputs: Sequence[Tensor], *,
                    batch: int | None, tolerance: Tolerance, device: torch.device, repeats: int,
                    float64_baseline: bool) -> RunComparison:
    """Time the reference and the candidate on the same inputs and compare every output.

    The shared core of the PyTorch and TensorRT checks. With ``float64_baseline`` a float64 copy
    of the reference also runs, so each output records how far both are from the exact answer.
    Call it under ``torch.no_grad()`` and the TF32 setting the check asks for.
    """
    ref_out, ref_time = _timed(lambda: flatten_outputs(ref_model(*ref_inputs)), repeats)
    require_finite_reference(ref_model, ref_inputs, ref_out)
    cand_out, cand_time = _timed(lambda: flatten_outputs(candidate(*cand_inputs)), repeats)
    notes: list[str] = []
    ref64 = None
    if float64_baseline:
        model64, why = _float64_model(ref_model, device)
        ref64, run_why = _float64_outputs(model64, ref_inputs, device)
        notes += [w for w in (why, run_why) if w]
    outputs, failures = _compare_output_lists(ref_out, cand_out, batch, tolerance, ref64)
    return RunComparison(outputs, failures, ref_time, cand_time, tuple(notes))


def _compare_output_lists(reference: Sequence[tuple[str, Tensor]],
                          candidate: Sequence[tuple[str, Tensor]], batch: int | None,
                          tolerance: Tolerance,
                          reference64: Sequence[tuple[str, Tensor]] | None
                          ) -> tuple[list[OutputComparison], list[str]]:
    failures = []
    if len(reference) != len(candidate):
        failures.append(f"the reference returns {len(reference)} tensors, the candidate "
                        f"{len(candidate)}")
    outputs = []
    for index, ((name, ref), (_, cand)) in enumerate(zip(reference, candidate, strict=False)):
        ref64 = reference64[index][1] if reference64 is not None and \
            index < len(reference64) else None
        outputs.append(_compare(name, batch, ref, cand, tolerance, ref64))
    return outputs, failures


# --------------------------------------------------------------------------------------------
# PyTorch against onnxruntime.
# --------------------------------------------------------------------------------------------

def resize_batch(inputs: Sequence[Tensor], size: int, seed: int) -> tuple[Tensor, ...]:
    """The first ``size`` rows, extended with new rows drawn like the given ones when needed."""
    gen = torch.Generator().manual_seed(seed)
    resized = []
    for tensor in inputs:
        have = tensor.shape[0]
        if size <= have:
            resized.append(tensor[:size])
            continue
        extra_shape = (size - have, *tensor.shape[1:])
        if tensor.is_floating_point():
            std = float(tensor.float().std()) if tensor.numel() > 1 else 1.0
            mean = float(tensor.float().mean())
            extra = (torch.randn(extra_shape, generator=gen) * std + mean).to(tensor)
        else:
            rows = torch.randint(0, have, (size - have,), generator=gen)
            extra = tensor[rows]
        resized.append(torch.cat([tensor, extra]))
    return tuple(resized)


def _sweep_sizes(batch: int) -> list[int]:
    return sorted({1, batch, max(5, 2 * batch)})


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

    Returns:
        The equivalence report.

    Raises:
        InvalidInputError: The file is missing or cannot be loaded, the inputs do not match the
            file's inputs, or the reference is in training mode.
        MissingDependencyError: onnx/onnxruntime are missing, or a requested provider is not
            available.
    """
    require("onnx", purpose="Validating ONNX files")
    require("onnxruntime", purpose="Validating ONNX files")
    check_eval_mode(reference, what="validate_onnx")
    inputs = as_input_tuple(inputs)
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(format_message(
            "The ONNX file does not exist", where=str(path), got="no such file",
            expected="an .onnx file", hint="export one first with export_onnx"))
    requested = resolve_providers(providers)
    details = _file_details(path)
    start = time.perf_counter()
    session = _session(path, requested)
    session_time = time.perf_counter() - start
    used = list(session.get_providers())
    details.update(providers_requested=requested, providers_used=used)
    failures: list[str] = []
    notes: list[str] = []
    if requested[0] not in used:
        failures.append(f"{requested[0]} was requested but onnxruntime used {used[0]} (it falls "
                        "back silently when the provider cannot be loaded)")
    session_inputs = session.get_inputs()
    if len(session_inputs) != len(inputs):
        raise InvalidInputError(format_message(
            "The number of inputs does not match the ONNX file", where=str(path),
            got=f"{len(inputs)} input tensors",
            expected=f"{len(session_inputs)} ({', '.join(i.name for i in session_inputs)})",
            hint="pass one tensor per model input"))
    file_dtypes = [_ONNX_TENSOR_TYPES.get(i.type) for i in session_inputs]
    float_dtypes = [d for d in file_dtypes if d is not None and d.is_floating_point]
    compute_dtype = float_dtypes[0] if float_dtypes else torch.float32
    tolerance = select_tolerance(compute_dtype, backend="onnxruntime", rtol=rtol, atol=atol)
    batch = _batch_of(inputs)
    dim0 = session_inputs[0].shape[0] if session_inputs[0].shape else None
    dynamic = not isinstance(dim0, int)
    details["dynamic_batch_axis"] = dynamic
    if batch is None:
        sizes: list[int | None] = [None]
    elif not dynamic:
        sizes = [batch]
        if dim0 != batch:
            raise InvalidInputError(format_message(
                "The inputs' batch size does not match the file's static batch axis",
                where=str(path), got=batch, expected=dim0,
                hint=f"pass inputs with batch {dim0}, or export with dynamic_batch=True"))
        notes.append(f"the batch axis is static ({dim0}); no batch sweep")
    else:
        sizes = list(batch_sizes) if batch_sizes else _sweep_sizes(batch)
        if any(not isinstance(s, int) or s < 1 for s in sizes):
            raise InvalidInputError(format_message(
                "Batch sizes must be positive integers", where="batch_sizes", got=sizes,
                expected="e.g. [1, 2, 5]", hint="leave batch_sizes=None for the default sweep"))
    device = _model_device(reference)
    ref_model = _on(reference, device, torch.float32 if _model_dtype(reference) != torch.float32
                    else None)
    model64 = None
    if float64_baseline:
        model64, why = _float64_model(ref_model, device)
        if why:
            notes.append(why)
    outputs: list[OutputComparison] = []
    timings: dict[str, float] = {"session_create_s": session_time}
    names = [i.name for i in session_inputs]
    for size in sizes:
        batch_inputs = inputs if size is None else resize_batch(inputs, size, seed)
        feed = {name: tensor.detach().to("cpu", dtype=file_dtype or tensor.dtype).numpy()
                for name, tensor, file_dtype in zip(names, batch_inputs, file_dtypes, strict=True)}
        try:
            start = time.perf_counter()
            results = session.run(None, feed)
            ort_time = time.perf_counter() - start
        except Exception as exc:  # onnxruntime raises its own exception types
            failures.append(f"batch {size} did not run in onnxruntime: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        ref_inputs = _cast_inputs(batch_inputs, device, torch.float32)
        start = time.perf_counter()
        with torch.no_grad():
            ref_out = flatten_outputs(ref_model(*ref_inputs))
        require_finite_reference(ref_model, ref_inputs, ref_out)
        ref_time = time.perf_counter() - start
        if size == batch:
            timings.update(onnxruntime_run_s=ort_time, reference_forward_s=ref_time)
        ref64, why = _float64_outputs(model64, ref_inputs, device)
        if why and why not in notes:
            notes.append(why)
        if len(results) != len(ref_out):
            problem = (f"the reference returns {len(ref_out)} tensors, the ONNX file "
                       f"{len(results)}")
            if problem not in failures:
                failures.append(problem)
        cand_out = [(name, torch.from_numpy(value)) for (name, _), value
                    in zip(ref_out, results, strict=False)]
        compared, _ = _compare_output_lists(ref_out[:len(cand_out)], cand_out, size, tolerance,
                                            ref64)
        outputs += compared
    comparison = LayerComparison((), None, ())
    failed = bool(failures) or not all(o.passed for o in outputs)
    if per_layer or (per_layer is None and failed):
        try:
            comparison, note = _onnx_layer_errors(
                ref_model, path, inputs, requested, tolerance, names, file_dtypes, device,
                output_failed=failed)
            notes.append(note)
        except Exception as exc:  # diagnosis only: record why it was impossible, keep the verdict
            notes.append(f"per-layer comparison not possible: {type(exc).__name__}: {exc}")
    return EquivalenceReport(
        check="onnxruntime", reference="original PyTorch model (float32)",
        candidate=f"{path.name} in onnxruntime", backend=f"onnxruntime:{used[0]}",
        tolerance=tolerance, outputs=tuple(outputs), failures=tuple(failures),
        first_divergence=comparison.first_divergence,
        divergence_suspects=comparison.suspects, layers=comparison.layers, notes=tuple(notes),
        details={**details, "batch_sizes": sizes, "inputs": [list(t.shape) for t in inputs],
                 "cuda_use_tf32": False if "CUDAExecutionProvider" in used else None},
        timings=timings, environment=collect_environment(device=device))
