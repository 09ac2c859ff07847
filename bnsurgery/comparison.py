"""Tolerances, and comparing a candidate's outputs with a reference's under them.

Tolerances (:data:`TOLERANCES`) are chosen per dtype and backend and documented next to their
values. Errors are measured relative to the *output scale* (the largest absolute reference value),
so rounding noise on near-zero logits does not fail a check while a layer that is a few percent
off does. :func:`run_and_compare` is the one core every check shares (PyTorch against PyTorch,
onnxruntime and TensorRT): run the reference and the candidate on the same inputs, time both,
optionally run a float64 copy of the reference to measure how accurate each side is, and compare
every output with :func:`compare_output`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bnsurgery.errors import InvalidInputError, format_message
from bnsurgery.finite import require_finite_reference
from bnsurgery.results import JsonResult
from bnsurgery.tensors import cast_inputs, flatten_outputs
from bnsurgery.timing import time_call

__all__ = [
    "OutputComparison",
    "RunComparison",
    "TOLERANCES",
    "Tolerance",
    "compare_output",
    "compare_output_lists",
    "float64_copy",
    "float64_outputs",
    "output_scale",
    "run_and_compare",
    "select_tolerance",
    "timed",
]


@dataclass(frozen=True)
class Tolerance(JsonResult):
    """How far a candidate's output may be from the reference's and still pass.

    The allowed maximum absolute error of an output is ``atol + rtol * scale`` where ``scale`` is
    the largest absolute value of the reference output. Measuring against the output's scale,
    not element by element, keeps near-zero logits from failing on rounding noise while a real
    error (a layer off by a few percent) still shows at the scale of the whole output.

    Attributes:
        label: Name of the regime, e.g. ``"fp32"``, ``"tf32"``, ``"fp16"``.
        rtol: Allowed error relative to the output scale.
        atol: Allowed absolute error on top of that.
        why: One line saying where the numbers come from.
    """

    label: str
    rtol: float
    atol: float
    why: str = ""

    def allowed(self, scale: float) -> float:
        """The largest absolute error accepted for an output whose magnitude is ``scale``."""
        return self.atol + self.rtol * scale

    def __str__(self) -> str:
        return f"{self.label}: |error| <= {self.atol:.0e} + {self.rtol:.0e} x scale"


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

    Raises:
        InvalidInputError: ``rtol`` or ``atol`` is negative, not finite or not a number.
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


@dataclass(frozen=True)
class OutputComparison(JsonResult):
    """Numbers for one output of one run (one batch size).

    Attributes:
        name: Output name, e.g. ``"output"`` or ``"output[1]"``.
        batch: Batch size of the run, or ``None`` when the inputs have no batch axis.
        shape: Shape of the reference output.
        max_abs_error: Largest absolute difference between candidate and reference; infinite
            when either output is not finite or the shapes differ.
        scale: Largest absolute value of the reference output.
        max_rel_error: ``max_abs_error / scale``: the error relative to the output scale.
        mean_abs_error: Mean absolute difference.
        cosine_similarity: Cosine of the angle between the flattened outputs.
        top1_agreement: Fraction of rows whose arg-max agrees, for outputs that look like logits
            (two dimensions, more than one class); ``None`` otherwise.
        allowed_error: The tolerance's allowed absolute error at this scale.
        float64_error: Largest absolute difference between the candidate and a float64 run of
            the reference model, when one was made.
        reference_float64_error: Same for the reference's own float32 run: the error the
            candidate should not exceed by much.
    """

    json_derived: ClassVar[tuple[str, ...]] = ("passed",)

    name: str
    batch: int | None
    shape: tuple[int, ...]
    max_abs_error: float
    scale: float
    max_rel_error: float
    mean_abs_error: float
    cosine_similarity: float
    top1_agreement: float | None
    allowed_error: float
    float64_error: float | None = None
    reference_float64_error: float | None = None

    @property
    def passed(self) -> bool:
        """``max_abs_error <= allowed_error``; never for a non-finite error."""
        return math.isfinite(self.max_abs_error) and self.max_abs_error <= self.allowed_error


def output_scale(reference: Tensor) -> float:
    """The largest finite absolute value of ``reference`` (0 for an empty tensor)."""
    if reference.numel() == 0:
        return 0.0
    magnitude = reference.abs()
    return float(torch.where(torch.isfinite(magnitude), magnitude, 0).max())


def _cosine(reference: Tensor, candidate: Tensor) -> float:
    ref_norm, cand_norm = float(reference.norm()), float(candidate.norm())
    if ref_norm == 0.0 and cand_norm == 0.0:
        return 1.0
    if ref_norm == 0.0 or cand_norm == 0.0:
        return 0.0
    return float((reference.flatten() @ candidate.flatten()) / (ref_norm * cand_norm))


def compare_output(name: str, batch: int | None, reference: Tensor, candidate: Tensor,
                   tolerance: Tolerance, reference64: Tensor | None = None) -> OutputComparison:
    """All metrics of one output; computed in float64 on the CPU so the metric adds no error.

    Args:
        name: The output's name.
        batch: The batch size of the run.
        reference: The reference's output.
        candidate: The candidate's output.
        tolerance: What decides ``passed``.
        reference64: The output of a float64 run of the reference, when one was made.

    Returns:
        The comparison.
    """
    ref = reference.detach().to("cpu", torch.float64)
    shape = tuple(ref.shape)
    scale = output_scale(ref)
    allowed = tolerance.allowed(scale)
    if tuple(candidate.shape) != shape:
        return OutputComparison(
            name=name, batch=batch, shape=shape, max_abs_error=math.inf, scale=scale,
            max_rel_error=math.inf, mean_abs_error=math.inf, cosine_similarity=math.nan,
            top1_agreement=None, allowed_error=allowed)
    cand = candidate.detach().to("cpu", torch.float64)
    diff = (cand - ref).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if not (bool(torch.isfinite(cand).all()) and bool(torch.isfinite(ref).all())):
        max_abs = math.inf
    top1 = None
    if ref.dim() == 2 and ref.shape[1] > 1 and ref.shape[0] > 0:
        top1 = float((ref.argmax(1) == cand.argmax(1)).double().mean())
    float64_error = reference_float64_error = None
    if reference64 is not None and tuple(reference64.shape) == shape:
        ref64 = reference64.detach().to("cpu", torch.float64)
        float64_error = float((cand - ref64).abs().max()) if ref64.numel() else 0.0
        reference_float64_error = float((ref - ref64).abs().max()) if ref64.numel() else 0.0
    return OutputComparison(
        name=name, batch=batch, shape=shape, max_abs_error=max_abs, scale=scale,
        max_rel_error=max_abs / scale if scale > 0 else max_abs,
        mean_abs_error=float(diff.mean()) if diff.numel() else 0.0,
        cosine_similarity=_cosine(ref, cand), top1_agreement=top1, allowed_error=allowed,
        float64_error=float64_error, reference_float64_error=reference_float64_error)


def compare_output_lists(reference: Sequence[tuple[str, Tensor]],
                         candidate: Sequence[tuple[str, Tensor]], batch: int | None,
                         tolerance: Tolerance,
                         reference64: Sequence[tuple[str, Tensor]] | None = None
                         ) -> tuple[list[OutputComparison], list[str]]:
    """Compare named outputs pairwise; a different number of outputs is a failure."""
    failures = []
    if len(reference) != len(candidate):
        failures.append(f"the reference returns {len(reference)} tensors, the candidate "
                        f"{len(candidate)}")
    outputs = []
    for index, ((name, ref), (_, cand)) in enumerate(zip(reference, candidate, strict=False)):
        ref64 = reference64[index][1] if reference64 is not None and \
            index < len(reference64) else None
        outputs.append(compare_output(name, batch, ref, cand, tolerance, ref64))
    return outputs, failures


def timed(function: Callable[[], Any], repeats: int = 1) -> tuple[Any, float]:
    """Run ``function`` ``repeats`` times (at least once); return the last result and the median
    of the wall-clock seconds (:func:`bnsurgery.timing.time_call`, reduced to its median)."""
    result, timing = time_call(function, repeats)
    return result, timing.median


def float64_copy(reference: nn.Module, device: torch.device
                 ) -> tuple[nn.Module | None, str | None]:
    """A float64 copy of ``reference``, or ``None`` and the reason it could not be made."""
    try:
        return copy.deepcopy(reference).to(device=device, dtype=torch.float64), None
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return None, f"no float64 copy of the reference ({type(exc).__name__}: {exc})"


def float64_outputs(model64: nn.Module | None, inputs: Sequence[Tensor], device: torch.device
                    ) -> tuple[list[tuple[str, Tensor]] | None, str | None]:
    """Outputs of the float64 copy, or ``None`` and the reason it could not run."""
    if model64 is None:
        return None, None
    try:
        with torch.no_grad():
            return flatten_outputs(model64(*cast_inputs(inputs, device, torch.float64))), None
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        return None, f"no float64 run of the reference ({type(exc).__name__}: {exc})"


@dataclass(frozen=True)
class RunComparison(JsonResult):
    """Outputs of one reference run and one candidate run, compared (see run_and_compare).

    Attributes:
        outputs: One comparison per output.
        failures: Problems besides the numbers (a different number of outputs).
        reference_seconds: Median seconds of the reference's forward.
        candidate_seconds: Median seconds of the candidate's call.
        notes: Why the float64 run could not be made, when it could not.
    """

    outputs: tuple[OutputComparison, ...]
    failures: tuple[str, ...]
    reference_seconds: float
    candidate_seconds: float
    notes: tuple[str, ...] = ()


def run_and_compare(reference: nn.Module, candidate: Callable[..., Any],
                    ref_inputs: Sequence[Tensor], cand_inputs: Sequence[Tensor], *,
                    batch: int | None, tolerance: Tolerance, device: torch.device,
                    repeats: int = 1, model64: nn.Module | None = None) -> RunComparison:
    """Time the reference and the candidate on the same inputs and compare every output.

    The one core of the PyTorch, onnxruntime and TensorRT checks. The candidate is any callable
    taking the inputs and returning tensors (a model, an onnxruntime runner, a TensorRT module).
    With ``model64`` (a float64 copy of the reference, see :func:`float64_copy`) each output also
    records how far both sides are from the exact answer. Call it under the TF32 setting the
    check asks for.

    Raises:
        NonFiniteReferenceError: The reference's own output is NaN or infinite.
    """
    with torch.no_grad():
        ref_out, ref_time = timed(lambda: flatten_outputs(reference(*ref_inputs)), repeats)
        require_finite_reference(reference, ref_inputs, ref_out)
        cand_out, cand_time = timed(lambda: flatten_outputs(candidate(*cand_inputs)), repeats)
    ref64, why = float64_outputs(model64, ref_inputs, device)
    outputs, failures = compare_output_lists(ref_out, cand_out, batch, tolerance, ref64)
    return RunComparison(tuple(outputs), tuple(failures), ref_time, cand_time,
                         (why,) if why else ())
