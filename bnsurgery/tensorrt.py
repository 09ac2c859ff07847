"""Compile a model with TensorRT (through torch-tensorrt) and check it against the original.

torch-tensorrt and CUDA are optional and imported only here, on first use. Where either is
missing, :func:`export_tensorrt` raises a :class:`~bnsurgery.errors.MissingDependencyError` that
names the extra to install, and :func:`validate_tensorrt` returns a *skipped* report ("skipped: no
CUDA" or "skipped: torch-tensorrt not installed"): never a crash, and never a silent pass, since a
skipped report has ``passed == False``.

Compilation uses ``torch_tensorrt.compile(ir="dynamo", require_full_compilation=True)``: a graph
that TensorRT cannot run entirely is an error instead of a silent mix of TensorRT and PyTorch.
float32 engines are built with TF32 disabled so that they are judged with a float32 tolerance.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from bnsurgery._lazy import is_available, require
from bnsurgery.comparison import float64_copy, run_and_compare, select_tolerance
from bnsurgery.errors import ExportError, InvalidInputError, MissingDependencyError, format_message
from bnsurgery.files import atomic_output
from bnsurgery.report import EquivalenceReport, collect_environment
from bnsurgery.tensors import as_input_tuple, batch_size_of, check_eval_mode, tf32_allowed

__all__ = [
    "PRECISIONS",
    "export_tensorrt",
    "save_path_for",
    "tensorrt_unavailable_reason",
    "validate_tensorrt",
]

#: Engine precisions and the dtype the model and inputs are cast to for each.
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}

_INSTALL_HINT = ("pip install 'bnsurgery[gpu]' on a machine with an NVIDIA GPU and CUDA "
                 "(it brings torch-tensorrt)")


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot be used here (``"no CUDA"``, ``"torch-tensorrt not installed"``), or
    ``None`` when it can. Never raises and imports torch-tensorrt only when CUDA is present."""
    if not torch.cuda.is_available():
        return "no CUDA"
    if not is_available("torch_tensorrt"):
        return "torch-tensorrt not installed"
    return None


def _check_precision(precision: object) -> torch.dtype:
    if precision not in PRECISIONS:
        raise InvalidInputError(format_message(
            "Unknown TensorRT precision", where="precision", got=repr(precision),
            expected=f"one of {sorted(PRECISIONS)}", hint="use precision='fp32' or 'fp16'"))
    return PRECISIONS[precision]


def export_tensorrt(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    precision: str = "fp32",
    fuse: bool = True,
    path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Compile ``model`` into a TensorRT-backed module with torch-tensorrt.

    Args:
        model: The model, in eval mode; not modified (a copy is folded, cast and moved to CUDA).
        example_inputs: One tensor or a sequence of positional inputs (static shapes).
        precision: ``"fp32"`` (TF32 disabled) or ``"fp16"`` (model and inputs cast to float16).
        fuse: Fold BatchNorm first with :func:`bnsurgery.fuse_batchnorm` (TensorRT also fuses
            BatchNorm itself; folding first keeps what ships identical to what was checked).
        path: Also save the compiled program there (torch-tensorrt's exported-program format),
            atomically.

    Returns:
        The compiled module; call it with CUDA tensors of the compiled dtype.

    Raises:
        MissingDependencyError: No CUDA device, or torch-tensorrt is not installed; the message
            names ``pip install 'bnsurgery[gpu]'``.
        InvalidInputError: Unknown precision, a model in training mode, or bad inputs.
        ExportError: torch-tensorrt could not compile the whole graph.
    """
    dtype = _check_precision(precision)
    check_eval_mode(model, what="export_tensorrt")
    inputs = as_input_tuple(example_inputs, where="example_inputs")
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise MissingDependencyError(format_message(
            f"TensorRT export is not possible here: {reason}",
            got="torch.cuda.is_available() is False" if reason == "no CUDA" else
            "import torch_tensorrt fails", expected="a CUDA device and torch-tensorrt",
            hint=_INSTALL_HINT))
    torch_tensorrt = require("torch_tensorrt", purpose="TensorRT export")
    if fuse:
        from bnsurgery.fuse import fuse_batchnorm

        model = fuse_batchnorm(model, inputs, inplace=False)
    else:
        model = copy.deepcopy(model)
    device = torch.device("cuda")
    model = model.to(device=device, dtype=dtype).eval()
    cuda_inputs = [t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                   for t in inputs]
    try:
        with tf32_allowed(False):
            # untyped; with ir="dynamo" it returns a torch.fx.GraphModule
            compiled: nn.Module = torch_tensorrt.compile(
                model, ir="dynamo", inputs=cuda_inputs, enabled_precisions={dtype},
                require_full_compilation=True, disable_tf32=True, min_block_size=1)
    except Exception as exc:  # torch-tensorrt raises many types; keep it as the cause
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(format_message(
            f"torch_tensorrt.compile (ir='dynamo', {precision}) failed",
            where=type(model).__name__, got=f"{type(exc).__name__}: {first_line}",
            hint="require_full_compilation=True refuses graphs TensorRT cannot run entirely; "
                 "look at the chained exception for the unsupported operator")) from exc
    if path is not None:
        with atomic_output(path) as temp:
            torch_tensorrt.save(compiled, str(temp), output_format="exported_program",
                                inputs=cuda_inputs)
    return compiled


def validate_tensorrt(
    reference: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    *,
    precision: str = "fp32",
    compiled: nn.Module | None = None,
    fuse: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    float64_baseline: bool = True,
    repeats: int = 1,
) -> EquivalenceReport:
    """Compile (or take) a TensorRT module and compare it with the original model on CUDA.

    The reference runs in float32 on CUDA with TF32 off. Without CUDA or torch-tensorrt the
    report is skipped (``report.skipped`` says why, ``report.passed`` is False) instead of
    raising, so a pipeline that validates "everything available" records what it could not do.

    Args:
        reference: The original model, in eval mode.
        inputs: One tensor or a sequence of positional inputs.
        precision: ``"fp32"`` or ``"fp16"``; selects the tolerance (see
            :data:`bnsurgery.comparison.TOLERANCES`).
        compiled: An already compiled module to judge; compiled here when ``None``.
        fuse: Fold BatchNorm before compiling (when ``compiled`` is ``None``).
        rtol: Override the documented relative tolerance.
        atol: Override the documented absolute tolerance.
        float64_baseline: Also run a float64 copy of the reference on CUDA.
        repeats: Forward passes to time each side with.

    Returns:
        The equivalence report (possibly skipped).

    Raises:
        InvalidInputError: Unknown precision, a model in training mode or bad inputs.
        ExportError: Compilation failed.
    """
    dtype = _check_precision(precision)
    check_eval_mode(reference, what="validate_tensorrt")
    inputs = as_input_tuple(inputs)
    tolerance = select_tolerance(dtype, backend="tensorrt", rtol=rtol, atol=atol)
    candidate_name = f"TensorRT {precision} engine (torch-tensorrt, ir='dynamo')"
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        return EquivalenceReport(
            check="tensorrt", reference="original PyTorch model (float32, CUDA, TF32 off)",
            candidate=candidate_name, backend="tensorrt", tolerance=tolerance, skipped=reason,
            notes=(f"to run this check: {_INSTALL_HINT}",),
            details={"precision": precision}, environment=collect_environment())
    if compiled is None:
        compiled = export_tensorrt(reference, inputs, precision=precision, fuse=fuse)
    device = torch.device("cuda")
    ref_model = copy.deepcopy(reference).to(device=device, dtype=torch.float32).eval()
    ref_inputs = tuple(t.to(device=device, dtype=torch.float32) if t.is_floating_point()
                       else t.to(device) for t in inputs)
    cand_inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in ref_inputs)
    model64, why = float64_copy(ref_model, device) if float64_baseline else (None, None)
    with tf32_allowed(False):
        run = run_and_compare(ref_model, compiled, ref_inputs, cand_inputs,
                              batch=batch_size_of(inputs), tolerance=tolerance, device=device,
                              repeats=repeats, model64=model64)
    notes = ("TensorRT engines are opaque: no per-layer comparison",
             *(n for n in (why, *run.notes) if n))
    ref_time, cand_time = run.reference_seconds, run.candidate_seconds
    return EquivalenceReport(
        check="tensorrt", reference="original PyTorch model (float32, CUDA, TF32 off)",
        candidate=candidate_name, backend=f"tensorrt:{torch.cuda.get_device_name(0)}",
        tolerance=tolerance, outputs=run.outputs, failures=run.failures, notes=notes,
        details={"precision": precision, "require_full_compilation": True,
                 "inputs": [list(t.shape) for t in inputs], "tf32": False},
        timings={"reference_forward_s": ref_time, "tensorrt_forward_s": cand_time},
        environment=collect_environment(device=device))


def save_path_for(onnx_path: str | os.PathLike[str], precision: str) -> Path:
    """Where the CLI saves a TensorRT program next to an ONNX file: ``model.trt-fp16.ep``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(f"{onnx_path.stem}.trt-{precision}.ep")
