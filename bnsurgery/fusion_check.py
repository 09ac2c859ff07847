"""Check a transformed model against the original before it is handed out, and find the culprits.

Every pair-finding rule in :mod:`bnsurgery.pairs` is a static argument about the model's code;
a forward that branches on the input shape, reads a folded module's state by another route, or
does something no rule foresaw can still make a fold wrong. So whenever example inputs exist, the
fused model is run against the original on

* the example inputs themselves,
* the same inputs at another batch size (new rows drawn like the given ones), and
* when the dataflow could not be traced symbolically (torch.fx failed, which is what Python
  control flow on shapes causes), the inputs at another spatial size,

and judged with the package's dtype-aware tolerances (:func:`bnsurgery.validate.select_tolerance`,
relative to each output's scale). Folding changes rounding, and a deep float32 network's own
rounding error can exceed that tolerance, so a float64 run of the original measures it: an output
passes when ``|fused - original| <= allowed + 3 * |original - original in float64|`` (the fused
model may be as inaccurate as the original, on both sides). A real mistake (one layer a few
percent off) is orders of magnitude above either term. The reference outputs come from a deep
copy of the original, so the caller's model never runs (its caches and counters stay as they
were). When the check fails,
:func:`bisect_failures` finds which folds break it, so only those are left unfolded.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from bnsurgery.comparison import select_tolerance
from bnsurgery.errors import InvalidInputError, RunTimeoutError, format_message
from bnsurgery.finite import non_finite_outputs, require_finite_reference
from bnsurgery.results import JsonResult
from bnsurgery.tensors import flatten_outputs, resize_batch

__all__ = ["FusionCheck", "ReferenceRuns", "bisect_failures", "inputs_fingerprint"]


@dataclass(frozen=True)
class FusionCheck(JsonResult):
    """What the fused model was checked on, and how it did.

    Attributes:
        status: ``"passed"``, ``"not run"`` (no example inputs, or nothing folded) or ``"failed"``.
        detail: What was checked, or why nothing was.
        inputs: The input shapes of every run checked.
        tolerance: The tolerance label used (``"fp32"``, ``"fp16"``...).
        max_error_ratio: Largest observed error divided by the allowed error (below 1 passes).
        notes: Checks that could not run, and why.
        fingerprint: Identifies the example inputs the check ran on.
    """

    json_omitted = ("fingerprint",)

    status: str
    detail: str
    inputs: tuple[tuple[int, ...], ...] = ()
    tolerance: str | None = None
    max_error_ratio: float | None = None
    notes: tuple[str, ...] = ()
    fingerprint: str = ""

    @property
    def passed(self) -> bool:
        """True only when the check ran and passed."""
        return self.status == "passed"


def inputs_fingerprint(args: Sequence[object]) -> str:
    """A short digest of the example inputs' shapes, dtypes and values."""
    digest = hashlib.sha256()
    for item in args:
        if isinstance(item, Tensor):
            digest.update(f"{tuple(item.shape)}{item.dtype}".encode())
            digest.update(item.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
                          .numpy().tobytes() if item.numel() else b"")
        else:
            digest.update(repr(type(item)).encode())
    return digest.hexdigest()[:16]


def _shapes(args: Sequence[object]) -> tuple[int, ...]:
    first = next((a for a in args if isinstance(a, Tensor)), None)
    return tuple(first.shape) if first is not None else ()


def _run(model: Callable[..., object], args: Sequence[object]) -> list[tuple[str, Tensor]]:
    # torch leaves torch.cuda.is_initialized unannotated.
    initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    devices = list(range(torch.cuda.device_count())) if initialized else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return [(n, t.detach()) for n, t in flatten_outputs(model(*copy.deepcopy(tuple(args))))]


def _other_batch(args: tuple[object, ...]) -> tuple[object, ...] | None:
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not tensors or len(tensors) != len(args) or tensors[0].dim() == 0:
        return None
    batch = tensors[0].shape[0]
    size = batch + 1
    resized = resize_batch(tensors, size, seed=1)
    return tuple(new if t.dim() > 0 and t.shape[0] == batch else t
                 for t, new in zip(tensors, resized, strict=True))


def _other_sizes(args: tuple[object, ...]) -> list[tuple[object, ...]]:
    """The inputs with every axis after the channel axis halved, or else made 1.5x larger."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if len(tensors) != len(args) or not any(t.dim() >= 3 for t in tensors):
        return []
    gen = torch.Generator().manual_seed(2)
    options: list[tuple[object, ...]] = []
    resizes: tuple[Callable[[int], int], ...] = (lambda n: n // 2, lambda n: n + max(1, n // 2))
    for resize in resizes:
        new: list[Tensor] = []
        for tensor in tensors:
            if tensor.dim() < 3 or not tensor.is_floating_point():
                new.append(tensor)
                continue
            shape = (*tensor.shape[:2], *(max(1, resize(n)) for n in tensor.shape[2:]))
            std = float(tensor.float().std()) if tensor.numel() > 1 else 1.0
            new.append((torch.randn(shape, generator=gen) * std + float(tensor.float().mean()))
                       .to(tensor))
        if any(tuple(n.shape) != tuple(o.shape) for n, o in zip(new, tensors, strict=True)):
            options.append(tuple(new))
    return options


class ReferenceRuns:
    """The original model's outputs on the check inputs, computed once on a deep copy.

    Args:
        model: The original model; it is deep-copied, never run itself.
        args: The example inputs (positional forward arguments).
        other_shapes: Also check at another spatial size (when the dataflow was not traced
            symbolically, the forward may branch on shapes).
        other_batch: Also check at another batch size (off for a candidate with a static
            batch, such as an ONNX file exported with ``dynamic_batch=False``).

    Raises:
        NonFiniteReferenceError: The original returns NaN or Inf on the example inputs.
        InvalidInputError: The original returns no tensor, or does not run on the inputs.
    """

    def __init__(self, model: nn.Module, args: tuple[object, ...], *,
                 other_shapes: bool, other_batch: bool = True) -> None:
        self.notes: list[str] = []
        self.fingerprint = inputs_fingerprint(args)
        reference = copy.deepcopy(model)
        try:
            first = _run(reference, args)
        except Exception as exc:  # a user model may raise anything on bad inputs
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InvalidInputError(format_message(
                "The model does not run on the example inputs, so the fused model cannot be "
                "checked", where=type(model).__name__,
                got=f"{type(exc).__name__}: {first_line}",
                expected="inputs the model accepts",
                hint="pass example_inputs of the shape the model was built for")) from exc
        if not first:
            raise InvalidInputError(format_message(
                "The model returns no tensor, so the fused model cannot be checked",
                where=type(model).__name__, got="a forward output without tensors",
                expected="a tensor or a (nested) tuple/list/dict of tensors",
                hint="fuse a model whose forward returns tensors, or pass example_inputs=None "
                     "to fold without a check"))
        require_finite_reference(model, args, first)
        self.reference64 = self._float64(reference, first)
        self.runs: list[tuple[tuple[object, ...], list[tuple[str, Tensor]],
                              list[float]]] = [(args, first, self._slack(args, first))]
        other = _other_batch(args) if other_batch else None
        if not other_batch:
            pass
        elif other is None:
            self.notes.append("no check at another batch size: the inputs are not all batched "
                              "tensors")
        else:
            self._add(reference, other, "another batch size")
        if other_shapes:
            options = _other_sizes(args)
            if not options:
                self.notes.append("no check at another input size: no input has spatial axes")
            for option in options:
                if self._add(reference, option, "another input size", quiet=True):
                    break
            else:
                if options:
                    self.notes.append("no check at another input size: the original does not "
                                      "run at the sizes tried")
        self.tolerance = select_tolerance(first[0][1].dtype if first[0][1].is_floating_point()
                                          else torch.float32)

    def _float64(self, reference: nn.Module, outputs: list[tuple[str, Tensor]]
                 ) -> nn.Module | None:
        if all(t.dtype == torch.float64 for _, t in outputs if t.is_floating_point()):
            return None  # already exact enough: no slack for rounding
        try:
            return copy.deepcopy(reference).to(torch.float64)
        except Exception as exc:  # noqa: BLE001 - some modules refuse float64
            self.notes.append(f"no float64 run of the original ({type(exc).__name__}); the "
                              "check uses the plain tolerance")
            return None

    def _slack(self, args: tuple[object, ...], outputs: list[tuple[str, Tensor]]) -> list[float]:
        """Per output, how far the original itself is from its float64 run."""
        if self.reference64 is None:
            return [0.0] * len(outputs)
        cast = tuple(a.to(torch.float64) if isinstance(a, Tensor) and a.is_floating_point()
                     else a for a in args)
        try:
            exact = _run(self.reference64, cast)
        except Exception as exc:  # noqa: BLE001 - some ops have no float64 kernel
            self.notes.append(f"no float64 run of the original ({type(exc).__name__}); the "
                              "check uses the plain tolerance")
            self.reference64 = None
            return [0.0] * len(outputs)
        slack = []
        for (_, ref), (_, ref64) in zip(outputs, exact, strict=False):
            if ref.is_floating_point() and ref.shape == ref64.shape:
                diff = (ref.to("cpu", torch.float64) - ref64.to("cpu", torch.float64)).abs()
                value = float(diff.max()) if diff.numel() else 0.0
                slack.append(value if math.isfinite(value) else 0.0)
            else:
                slack.append(0.0)
        return slack + [0.0] * (len(outputs) - len(slack))

    def _add(self, reference: nn.Module, args: tuple[object, ...], what: str, *,
             quiet: bool = False) -> bool:
        try:
            outputs = _run(reference, args)
        except Exception as exc:  # noqa: BLE001 - this input is not one the model accepts
            if not quiet:
                self.notes.append(f"no check at {what} {list(_shapes(args))}: the original "
                                  f"raises {type(exc).__name__}")
            return False
        if not outputs or non_finite_outputs(outputs):
            self.notes.append(f"no check at {what} {list(_shapes(args))}: the original's output "
                              "is not finite there")
            return False
        self.runs.append((args, outputs, self._slack(args, outputs)))
        return True

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(_shapes(args) for args, _, _ in self.runs)

    def compare(self, candidate: Callable[..., object]) -> tuple[str | None, float]:
        """Run ``candidate`` on every check input; ``(why it fails or None, worst error ratio)``.

        ``candidate`` is run as given: pass a model nobody else will use (runs may fill caches).
        Any callable taking the forward arguments works (an onnxruntime session wrapper).
        """
        worst = 0.0
        for args, reference, slack in self.runs:
            shape = list(_shapes(args))
            try:
                outputs = _run(candidate, args)
            except RunTimeoutError:
                raise  # a time limit the caller set is not a numeric mismatch
            except Exception as exc:  # noqa: BLE001 - any failure of the candidate is a mismatch
                return (f"the fused model raises {type(exc).__name__} on inputs of shape "
                        f"{shape}, where the original runs"), math.inf
            if len(outputs) != len(reference):
                return (f"the fused model returns {len(outputs)} tensors on inputs of shape "
                        f"{shape}, the original {len(reference)}"), math.inf
            for (name, ref), (_, got), rounding in zip(reference, outputs, slack, strict=True):
                if tuple(ref.shape) != tuple(got.shape):
                    return (f"{name} has shape {tuple(got.shape)} instead of {tuple(ref.shape)} "
                            f"on inputs of shape {shape}"), math.inf
                ref64, got64 = ref.to("cpu", torch.float64), got.to("cpu", torch.float64)
                if not ref.is_floating_point():
                    if not torch.equal(ref64, got64):
                        return f"{name} differs on inputs of shape {shape}", math.inf
                    continue
                if not bool(torch.isfinite(got64).all()):
                    return (f"{name} is not finite on inputs of shape {shape} where the "
                            "original's is"), math.inf
                scale = float(ref64.abs().max()) if ref64.numel() else 0.0
                error = float((got64 - ref64).abs().max()) if ref64.numel() else 0.0
                allowed = self.tolerance.allowed(scale) + 3 * rounding
                ratio = error / allowed
                worst = max(worst, ratio)
                if ratio > 1:
                    return (f"{name} is off by {error:.3g} ({error / scale if scale else error:.2g}"
                            f" of its scale; {self.tolerance.label} and the original's own "
                            f"rounding allow {allowed:.3g}) on inputs of shape {shape}"), worst
        return None, worst


_Item = TypeVar("_Item")


def bisect_failures(items: Sequence[_Item], failure: Callable[[list[_Item]], str | None]
                    ) -> tuple[list[_Item], dict[int, str]]:
    """Split ``items`` into a largest passing set and the ones that break the check.

    ``failure(subset)`` says why applying ``subset`` fails, or ``None``. Halves are tried in
    turn, so ``k`` bad items among ``n`` cost about ``k * log2(n)`` checks; items that only fail
    together are resolved by dropping the later one.

    Returns:
        The kept items (in order), and ``{index in items: reason}`` for the dropped ones.
    """
    dropped: dict[int, str] = {}
    kept: list[int] = []

    def visit(indices: list[int], reason: str | None) -> None:
        trial = sorted(kept + indices)
        if reason is None:
            reason = failure([items[i] for i in trial])
        if reason is None:
            kept[:] = trial
            return
        if len(indices) == 1:
            dropped[indices[0]] = reason
            return
        middle = len(indices) // 2
        visit(indices[:middle], None)
        visit(indices[middle:], None)

    if items:
        visit(list(range(len(items))), None)
    return [items[i] for i in sorted(kept)], dropped
