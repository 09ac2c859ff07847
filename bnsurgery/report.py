"""Equivalence reports: what was compared, with which numbers, in which environment.

An :class:`EquivalenceReport` is what every check in :mod:`bnsurgery.validate` and
:mod:`bnsurgery.tensorrt` returns: one :class:`OutputComparison` per output (and per batch size of
a dynamic-batch sweep), the :class:`Tolerance` the numbers were judged against, the first module
whose output diverged when a check failed (or, between two ONNX files, the first tensor), and the
environment (library versions, opset, exporter, execution providers, GPU, TF32 state) needed to
reproduce it. A check that could not run is a *skipped* report, which never counts as passed.
(:class:`OutputComparison` and :class:`Tolerance` are defined in :mod:`bnsurgery.comparison` and
re-exported here.)

This module also writes reports to disk (through :mod:`bnsurgery.files`, atomically):
``report.json`` and an optional PNG of the error per layer, with
matplotlib imported only when a plot is asked for.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from bnsurgery._lazy import require
from bnsurgery.comparison import OutputComparison, Tolerance
from bnsurgery.errors import InvalidInputError, format_message
from bnsurgery.files import atomic_output, write_text
from bnsurgery.messages import first_line, printable
from bnsurgery.results import JsonResult, jsonable
from bnsurgery.tables import render_table

__all__ = [
    "EquivalenceReport",
    "LayerError",
    "OutputComparison",
    "Tolerance",
    "collect_environment",
    "plot_layer_errors",
    "write_report_json",
]

# Distribution names to look up for each component, first found wins: onnxruntime ships as
# several wheels (CPU, CUDA) under different names but one import name.
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "onnx": ("onnx",),
    "onnxscript": ("onnxscript",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "ort-nightly", "ort-nightly-gpu"),
    "torch_tensorrt": ("torch-tensorrt", "torch_tensorrt"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
}


@dataclass(frozen=True)
class LayerError(JsonResult):
    """Error at one module boundary (or, comparing two ONNX files, one tensor), in order.

    Attributes:
        name: Qualified module name; ``"name#2"`` for the second call of a module used twice.
            Comparing two ONNX files: the tensor's name, in the first file's order.
        max_abs_error: Largest absolute difference at this boundary.
        max_rel_error: The same relative to the largest absolute reference value there.
        diverged: Whether the error exceeds the tolerance.
    """

    name: str
    max_abs_error: float
    max_rel_error: float
    diverged: bool


@dataclass(frozen=True)
class EquivalenceReport(JsonResult):
    """What comparing a candidate (fused model, ONNX file, TensorRT engine) with a reference found.

    Attributes:
        check: What was compared, e.g. ``"pytorch"``, ``"onnxruntime"``, ``"tensorrt"``.
        reference: One line describing the reference.
        candidate: One line describing the candidate.
        backend: Where the candidate ran, e.g. ``"cpu"`` or ``"onnxruntime:CPUExecutionProvider"``.
        tolerance: The tolerance the outputs were judged against.
        outputs: One comparison per output and batch size.
        skipped: Why the check could not run (``None`` when it ran). A skipped report has
            ``passed == False``: nothing was checked.
        failures: Problems that fail the check besides numbers (a provider that was requested but
            not used, a batch size that would not run).
        first_divergence: The first module boundary whose output exceeded the tolerance, when a
            per-layer comparison was made and found one (see ``divergence_kind``).
        divergence_suspects: Modules that ran between the last agreeing boundary and the first
            diverging one and were not compared themselves (convolutions, BatchNorms, ...); for
            a tensor, the candidate's nodes that compute it from tensors that still agree.
        layers: Errors at every compared module boundary (or tensor), in execution order.
        notes: Anything else worth knowing (sweep skipped, float64 run impossible, ...).
        details: Extra JSON-ready facts: file, opset, exporter, providers requested and used.
        timings: Seconds per measured step, e.g. ``{"reference_forward": 0.01}``.
        environment: Library versions, device, GPU name and TF32 state when the check ran.
        divergence_kind: What ``first_divergence`` and ``layers`` name: ``"module"``, a module
            of the reference model, or ``"tensor"``, a tensor both graphs compute under the
            same name (two ONNX files, which have no modules).
    """

    json_derived: ClassVar[tuple[str, ...]] = ("status", "passed")

    check: str
    reference: str
    candidate: str
    backend: str
    tolerance: Tolerance
    outputs: tuple[OutputComparison, ...] = ()
    skipped: str | None = None
    failures: tuple[str, ...] = ()
    first_divergence: str | None = None
    divergence_suspects: tuple[str, ...] = ()
    layers: tuple[LayerError, ...] = ()
    notes: tuple[str, ...] = ()
    # Mappings are left out of the hash (dicts are unhashable) but still compared.
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)
    timings: Mapping[str, float] = field(default_factory=dict, hash=False)
    environment: Mapping[str, Any] = field(default_factory=dict, hash=False)
    divergence_kind: Literal["module", "tensor"] = "module"

    @property
    def passed(self) -> bool:
        """True only when the check ran, produced outputs and every one of them is in tolerance."""
        return (self.skipped is None and not self.failures and bool(self.outputs)
                and all(o.passed for o in self.outputs))

    @property
    def status(self) -> str:
        """``"passed"``, ``"FAILED"`` or ``"skipped: <reason>"``."""
        if self.skipped is not None:
            return f"skipped: {self.skipped}"
        return "passed" if self.passed else "FAILED"

    @property
    def max_rel_error(self) -> float:
        """Worst error relative to the output scale over all outputs (NaN when none ran)."""
        if not self.outputs:
            return math.nan
        return max(o.max_rel_error for o in self.outputs)

    def __str__(self) -> str:
        # Values can come from the checked file (metadata, error texts quoting node names):
        # escaped, so none of them can start a forged line or move the terminal's cursor.
        lines = [f"{self.check} check {printable(self.status)}: {printable(self.candidate)} vs "
                 f"{printable(self.reference)}",
                 f"  backend {printable(self.backend)}; tolerance {self.tolerance}"]
        for key in ("file", "opset", "exporter", "providers_requested", "providers_used"):
            if key in self.details:
                lines.append(f"  {key.replace('_', ' ')}: {printable(self.details[key])}")
        if self.outputs:
            header = ("output", "batch", "max|err|", "rel", "mean|err|", "cosine", "top1",
                      "f64 err", "ref f64", "status")
            rows = [(printable(o.name), "-" if o.batch is None else str(o.batch),
                     f"{o.max_abs_error:.2e}", f"{o.max_rel_error:.2e}",
                     f"{o.mean_abs_error:.2e}", f"{o.cosine_similarity:.8f}",
                     "-" if o.top1_agreement is None else f"{o.top1_agreement:.2f}",
                     _fmt(o.float64_error), _fmt(o.reference_float64_error),
                     "ok" if o.passed else "FAIL") for o in self.outputs]
            lines += render_table(header, rows, align="lrrrrrrrrl", rule=False, indent="  ")
        for failure in self.failures:
            lines.append(f"  failure: {printable(failure)}")
        if self.first_divergence:
            suspects = printable(", ".join(self.divergence_suspects) or "none recorded")
            context = ("the candidate computes it from tensors that still agree with"
                       if self.divergence_kind == "tensor" else "ran just before it, not compared")
            lines.append(f"  first diverging {self.divergence_kind}: "
                         f"{printable(self.first_divergence)} ({context}: {suspects})")
        for note in self.notes:
            lines.append(f"  note: {printable(note)}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _version(component: str) -> str | None:
    for dist in _DISTRIBUTIONS.get(component, (component,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def collect_environment(*, device: str | torch.device | None = None) -> dict[str, Any]:
    """Describe the software and hardware a check ran on, without importing optional packages.

    Versions come from the installed distributions' metadata, so collecting them neither
    imports onnxruntime nor torch-tensorrt nor fails where they are missing (``None`` then).

    Args:
        device: The device the check ran on; its GPU name is recorded when it is a CUDA device.

    Returns:
        A JSON-ready dictionary: ``python``, ``platform``, ``versions`` (component -> version or
        ``None``), ``cuda_available``, ``cuda_version``, ``gpu_name``, ``cudnn_version``,
        ``tf32`` (the matmul and cuDNN flags) and ``torch_threads``.
    """
    cuda = torch.cuda.is_available()
    gpu_name = cudnn = None
    if cuda:
        index = torch.device(device).index if device is not None and \
            torch.device(device).type == "cuda" else None
        try:
            gpu_name = torch.cuda.get_device_name(index if index is not None else 0)
            cudnn = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]  # unannotated
        except (RuntimeError, AssertionError) as exc:  # a driver that fails to initialise
            gpu_name = f"unknown ({type(exc).__name__}: {first_line(exc)})"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in _DISTRIBUTIONS},
        "device": str(device) if device is not None else None,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpu_name": gpu_name,
        "cudnn_version": cudnn,
        "tf32": {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                 "cudnn": bool(torch.backends.cudnn.allow_tf32)},
        "torch_threads": torch.get_num_threads(),
    }


def write_report_json(reports: EquivalenceReport | Sequence[EquivalenceReport],
                      path: str | os.PathLike[str], *,
                      extra: Mapping[str, Any] | None = None) -> Path:
    """Write one or more reports as ``report.json``, atomically.

    Args:
        reports: A report or a sequence of reports.
        path: Destination file.
        extra: Further JSON-ready top-level entries (timings, file names, ...).

    Returns:
        The path written.
    """
    if isinstance(reports, EquivalenceReport):
        reports = [reports]
    ran = [r for r in reports if r.skipped is None]
    document: dict[str, Any] = {
        # Skipped checks neither pass nor fail; but nothing that ran may fail, and something must
        # have run, or the document would claim a pass that nothing earned.
        "passed": bool(ran) and all(r.passed for r in ran),
        "summary": {"passed": sum(r.passed for r in ran),
                    "failed": sum(not r.passed for r in ran),
                    "skipped": len(reports) - len(ran)},
        "environment": collect_environment(),
        "reports": [r.to_dict() for r in reports],
    }
    if extra:
        document.update(jsonable(dict(extra)))
    return write_text(path, json.dumps(document, indent=2, sort_keys=False) + "\n",
                      what="report")


def plot_layer_errors(layers: Sequence[LayerError] | EquivalenceReport
                      | Mapping[str, Sequence[LayerError] | EquivalenceReport],
                      path: str | os.PathLike[str], *, title: str | None = None,
                      tolerance: float | None = None) -> Path:
    """Plot the error relative to each layer's output scale, layer by layer, into a PNG.

    matplotlib is imported here, with its non-interactive Agg backend, so neither ``import
    bnsurgery`` nor a report without a plot needs it.

    Args:
        layers: Per-layer errors, a report whose ``layers`` to plot, or a mapping of legend
            label to either, to draw several comparisons on the same axes.
        path: Destination PNG, written atomically.
        title: Plot title.
        tolerance: Draw this relative tolerance as a horizontal line (defaults to the first
            report's ``rtol`` when reports are given).

    Returns:
        The path written.

    Raises:
        InvalidInputError: There are no layer errors to plot.
        MissingDependencyError: matplotlib is not installed.
    """
    series: dict[str, Sequence[LayerError]] = {}
    items = layers.items() if isinstance(layers, Mapping) else [("", layers)]
    for label, item in items:
        if isinstance(item, EquivalenceReport):
            if tolerance is None:
                tolerance = item.tolerance.rtol
            title = title or f"{item.candidate} vs {item.reference}"
            label = label or item.candidate
            item = item.layers
        if item:
            series[label] = list(item)
    if not series:
        raise InvalidInputError(format_message(
            "There are no per-layer errors to plot", where=str(path), got="an empty list",
            expected="at least one module boundary",
            hint="run the comparison with per_layer=True"))
    matplotlib = require("matplotlib", purpose="Plotting the error per layer")
    matplotlib.use("Agg", force=False)
    pyplot = require("matplotlib.pyplot", purpose="Plotting the error per layer")
    # A zero error cannot sit on a log axis; draw it at a floor well below float32 rounding.
    floor = 1e-12
    longest = max(series.values(), key=len)
    figure, axes = pyplot.subplots(figsize=(max(7.0, 0.1 * len(longest) + 3), 4.5))
    try:
        for index, (label, values) in enumerate(series.items()):
            ys = [max(v.max_rel_error, floor) if math.isfinite(v.max_rel_error) else 1.0
                  for v in values]
            colour = f"C{index}"
            axes.plot(range(len(values)), ys, color=colour, linewidth=0.8, alpha=0.7,
                      label=label or None)
            diverged = [i for i, v in enumerate(values) if v.diverged]
            axes.scatter(range(len(values)), ys, color=colour, s=10)
            if diverged:
                axes.scatter(diverged, [ys[i] for i in diverged], color="tab:red", s=24,
                             marker="x", zorder=3)
        axes.set_yscale("log")
        if tolerance is not None:
            axes.axhline(tolerance, color="tab:red", linestyle="--", linewidth=1,
                         label=f"tolerance {tolerance:.0e} x scale")
        if any(series) or tolerance is not None:
            axes.legend(loc="upper left", fontsize=8)
        step = max(1, len(longest) // 40)
        ticks = list(range(0, len(longest), step))
        axes.set_xticks(ticks)
        axes.set_xticklabels([longest[i].name for i in ticks], rotation=90, fontsize=6)
        axes.set_ylabel("max |error| / output scale")
        axes.set_xlabel("module boundary (execution order)")
        axes.set_title(title or "error per layer", fontsize=10)
        figure.tight_layout()
        final = Path(path)
        with atomic_output(final, what="plot") as temp:
            figure.savefig(temp, format="png", dpi=120)
    finally:
        pyplot.close(figure)
    return final
