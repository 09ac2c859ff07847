"""What ``bnsurgery demo`` (and ``make demo``) does, end to end, on torchvision's resnet18.

1. Build resnet18 with random weights and *calibrated* BatchNorm state (random affine parameters,
   running statistics measured on random data), since nothing can be downloaded; or take
   torchvision's pretrained weights with ``weights="DEFAULT"`` where the network allows.
2. Swap every BatchNorm for the from-scratch one and compare with the original.
3. Fold BatchNorm into the convolutions, compare with the original, and time both.
4. Export the original to ONNX (folded on the way), validate it in onnxruntime (CUDA provider when
   available) against the original with a batch sweep, and time it.
5. Compile and validate with TensorRT where CUDA and torch-tensorrt exist; otherwise record a
   skipped entry.
6. Write ``report.json`` (every report with its environment) and ``layer_errors.png`` (error per
   module boundary of the fused model and of the ONNX file) under the output folder.

The library never prints: progress goes through the ``progress`` callback and the CLI renders
the returned :class:`DemoResult` as a table.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnsurgery._lazy import is_available
from bnsurgery.report import EquivalenceReport, plot_layer_errors, write_report_json

__all__ = ["DEFAULT_DEMO_DIR", "DemoResult", "DemoRow", "run_demo"]

DEFAULT_DEMO_DIR = "bnsurgery-demo"


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo's table.

    Attributes:
        step: What was done.
        status: ``"passed"``, ``"FAILED"``, ``"skipped: ..."`` or ``"done"``.
        max_rel_error: Worst output error relative to the output scale (``None``: not a check).
        latency_ms: Median forward time at the demo batch, when measured.
        seconds: Wall time of all the work of the step (building, checking, comparing).
        detail: A short remark (what was compared with what, speed ratio, ...).
        latency_spread_ms: First and third quartile of the forward times behind
            ``latency_ms``: how much a busy machine moved them.
    """

    step: str
    status: str
    max_rel_error: float | None = None
    latency_ms: float | None = None
    seconds: float = 0.0
    detail: str = ""
    latency_spread_ms: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (a non-finite error becomes a string, which JSON can hold)."""
        error = self.max_rel_error
        return {"step": self.step, "status": self.status,
                "max_rel_error": error if error is None or math.isfinite(error) else str(error),
                "latency_ms": self.latency_ms, "seconds": self.seconds, "detail": self.detail,
                "latency_spread_ms": None if self.latency_spread_ms is None
                else list(self.latency_spread_ms)}


@dataclass(frozen=True)
class DemoResult:
    """Everything the demo produced.

    Attributes:
        rows: The table, one row per step.
        reports: Every equivalence report, in order.
        report_path: Where ``report.json`` was written.
        plot_path: Where the per-layer PNG was written (``None`` without matplotlib).
        onnx_path: The exported ONNX file.
        notes: Remarks (plot skipped, weights used, ...).
        model: What was built (spec, weights, class), as ``LoadedModel.to_dict()``.
        input_shape: The shape of the demo batch every step ran on.
        plan: The fusion plan, JSON-ready.
    """

    rows: tuple[DemoRow, ...]
    reports: tuple[EquivalenceReport, ...]
    report_path: Path
    plot_path: Path | None
    onnx_path: Path
    notes: tuple[str, ...] = field(default_factory=tuple)
    model: Mapping[str, Any] = field(default_factory=dict, hash=False)
    input_shape: tuple[int, ...] = ()
    plan: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def passed(self) -> bool:
        """Something ran and no check that ran failed (skipped checks count neither way)."""
        ran = [r for r in self.reports if r.skipped is None]
        return bool(ran) and all(r.passed for r in ran)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"passed": self.passed, "rows": [r.to_dict() for r in self.rows],
                "reports": [r.to_dict() for r in self.reports],
                "report_path": str(self.report_path),
                "plot_path": None if self.plot_path is None else str(self.plot_path),
                "onnx_path": str(self.onnx_path), "notes": list(self.notes),
                "model": dict(self.model), "input_shape": list(self.input_shape),
                "plan": dict(self.plan)}

    def __str__(self) -> str:
        header = ("step", "status", "max rel err", "latency", "time", "detail")
        rows = [(r.step, r.status, "-" if r.max_rel_error is None else f"{r.max_rel_error:.2e}",
                 _latency_text(r), f"{r.seconds:.1f} s", r.detail) for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
        lines = []
        for row in [header, tuple("-" * w for w in widths) + ("-" * 6,), *rows]:
            cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        lines.append(f"report: {self.report_path}")
        lines.append(f"plot:   {self.plot_path if self.plot_path else '(not written)'}")
        lines.append(f"onnx:   {self.onnx_path}")
        lines += [f"note: {note}" for note in self.notes]
        lines.append("demo " + ("PASSED" if self.passed else "FAILED"))
        return "\n".join(lines)


def _latency_text(row: DemoRow) -> str:
    if row.latency_ms is None:
        return "-"
    if row.latency_spread_ms is None:
        return f"{row.latency_ms:.1f} ms"
    low, high = row.latency_spread_ms
    return f"{row.latency_ms:.1f} ms ({low:.1f}-{high:.1f})"


@dataclass(frozen=True)
class _Timing:
    """Median and quartiles, in seconds, of one call's timed runs."""

    median: float
    quartiles: tuple[float, float]

    @property
    def spread_ms(self) -> tuple[float, float]:
        return (1e3 * self.quartiles[0], 1e3 * self.quartiles[1])


def _latencies(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, _Timing]:
    """Median and quartiles of the seconds per call of each entry, after one warm-up round.

    The calls are timed round-robin, one of each per round, so a busy period on a shared
    machine slows all of them alike instead of skewing their ratio.
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(2, repeats)):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    timings = {}
    for name, values in times.items():
        first, _, third = statistics.quantiles(values, n=4, method="inclusive")
        timings[name] = _Timing(statistics.median(values), (first, third))
    return timings


def run_demo(
    out_dir: str | os.PathLike[str] = DEFAULT_DEMO_DIR,
    *,
    weights: str | None = None,
    input_shape: Sequence[int] = (2, 3, 224, 224),
    providers: Sequence[str] | str | None = None,
    repeats: int = 20,
    plot: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the whole replace / fuse / export / validate story on torchvision's resnet18.

    Args:
        out_dir: Folder for ``resnet18.onnx``, ``report.json`` and ``layer_errors.png``.
        weights: ``None`` for random weights with calibrated BatchNorm state, ``"DEFAULT"`` for
            torchvision's pretrained weights (downloads), or a state_dict file.
        input_shape: Shape of the demo batch, batch first.
        providers: onnxruntime providers (default: CUDA when available, then CPU).
        repeats: Timed rounds per latency figure (median and quartiles reported); the eager
            original, the fused model and onnxruntime are timed in the same interleaved rounds,
            so every ratio in the table comes from the figures shown next to it.
        plot: Write the per-layer PNG (needs matplotlib; skipped with a note without it).
        seed: Seed for the random weights, calibration and inputs.
        progress: Called with a short message as each step starts.

    Returns:
        The table, the reports and the paths written.
    """
    from bnsurgery.calibrate import calibrate_batchnorm
    from bnsurgery.fuse import fuse_batchnorm, plan_fusion
    from bnsurgery.models import load_model
    from bnsurgery.onnx_export import export_onnx
    from bnsurgery.ort_session import OnnxRunner
    from bnsurgery.replace import replace_batchnorm
    from bnsurgery.tensorrt import validate_tensorrt
    from bnsurgery.validate import compare_models, validate_onnx

    say = progress or (lambda message: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in input_shape)
    rows: list[DemoRow] = []
    reports: list[EquivalenceReport] = []
    notes: list[str] = []

    say("building torchvision:resnet18")
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loaded = load_model("torchvision:resnet18", weights=weights)
    model: nn.Module = loaded.model
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if weights is None:
        calibration = inputs if shape[0] >= 2 else torch.cat([inputs, inputs])
        model = calibrate_batchnorm(model, calibration, steps=2, seed=seed).eval()
        source = "random weights, calibrated BatchNorm state"
    else:
        source = f"weights {weights}"
    notes.append(f"resnet18 with {source}; inputs {list(shape)}")
    rows.append(DemoRow("build resnet18", "done", seconds=time.perf_counter() - start,
                        detail=source))

    say("replacing BatchNorm with the from-scratch BatchNorm")
    start = time.perf_counter()
    replaced = replace_batchnorm(model, inplace=False).eval()
    report = compare_models(model, replaced, inputs, reference_name="original resnet18",
                            candidate_name="resnet18 with bnsurgery BatchNorm")
    reports.append(report)
    rows.append(DemoRow("replace BatchNorm", report.status, report.max_rel_error,
                        seconds=time.perf_counter() - start,
                        detail="from-scratch BN vs torch BN, eager"))

    say("folding BatchNorm into the convolutions")
    start = time.perf_counter()
    plan = plan_fusion(model, inputs)
    fused = fuse_batchnorm(model, inputs, plan=plan).eval()
    fuse_report = compare_models(model, fused, inputs, per_layer=True,
                                 reference_name="original resnet18",
                                 candidate_name="fused resnet18 (PyTorch eager)")
    reports.append(fuse_report)
    fuse_seconds = time.perf_counter() - start  # planning, its check, folding and comparing

    say("exporting to ONNX (torch.onnx.export, dynamo=True, opset 18)")
    start = time.perf_counter()
    onnx_path = export_onnx(model, inputs, out / "resnet18.onnx", fuse=True)
    export_row = (DemoRow("export ONNX", "done", seconds=time.perf_counter() - start,
                        detail=f"{onnx_path.name}, {onnx_path.stat().st_size / 1e6:.1f} MB, "
                               "one file, checker clean, batch 1 and larger ran"))

    say("validating the ONNX file in onnxruntime")
    start = time.perf_counter()
    ort_report = validate_onnx(model, onnx_path, inputs, providers=providers, per_layer=plot)
    reports.append(ort_report)
    ort_seconds = time.perf_counter() - start

    say(f"timing the original, the fused model and onnxruntime ({repeats} interleaved rounds)")
    start = time.perf_counter()
    calls: dict[str, Callable[[], Any]] = {"original": lambda: model(inputs),
                                           "fused": lambda: fused(inputs)}
    if ort_report.details.get("providers_used"):
        runner = OnnxRunner(onnx_path, ort_report.details["providers_requested"])
        feed = runner.feed((inputs,))
        calls["onnxruntime"] = lambda: runner.run(feed)
    with torch.no_grad():
        timed = _latencies(calls, repeats)
    timing_seconds = time.perf_counter() - start
    original = timed["original"]

    def against_original(name: str) -> str:
        return f"{timed[name].median / original.median:.2f}x the eager original's median"

    rows.append(DemoRow("eager original", "done", latency_ms=1e3 * original.median,
                        seconds=timing_seconds, latency_spread_ms=original.spread_ms,
                        detail=f"PyTorch eager, float32; time: {max(2, repeats)} interleaved "
                               "rounds of every latency in this table (median, quartiles)"))
    rows.append(DemoRow(
        "fuse BatchNorm", fuse_report.status, fuse_report.max_rel_error,
        1e3 * timed["fused"].median, fuse_seconds,
        f"{len(plan.folded)} folded, {len(plan.skipped)} skipped; {against_original('fused')}",
        latency_spread_ms=timed["fused"].spread_ms))
    rows.append(export_row)
    sizes = ", ".join(str(s) for s in ort_report.details.get("batch_sizes", []))
    ort = timed.get("onnxruntime")
    rows.append(DemoRow(
        "onnxruntime", ort_report.status, ort_report.max_rel_error,
        None if ort is None else 1e3 * ort.median, ort_seconds,
        f"{ort_report.backend}, batches {sizes}"
        + ("" if ort is None else f"; {against_original('onnxruntime')}"),
        latency_spread_ms=None if ort is None else ort.spread_ms))

    for precision in ("fp32", "fp16"):
        say(f"TensorRT {precision}")
        start = time.perf_counter()
        report = validate_tensorrt(model, inputs, precision=precision, repeats=repeats)
        reports.append(report)
        latency = report.timings.get("tensorrt_forward_s")
        rows.append(DemoRow(f"TensorRT {precision}", report.status,
                            None if report.skipped else report.max_rel_error,
                            None if latency is None else 1e3 * latency,
                            time.perf_counter() - start,
                            "torch-tensorrt, require_full_compilation=True"))
        if report.skipped:
            break  # the reason is the same for every precision

    plot_path = None
    if plot and is_available("matplotlib"):
        say("plotting the error per layer")
        series = {"fused PyTorch": reports[1], "ONNX (onnxruntime)": reports[2]}
        plot_path = plot_layer_errors(
            {k: v for k, v in series.items() if v.layers}, out / "layer_errors.png",
            title="resnet18: error per module boundary against the original (float32)")
    elif plot:
        notes.append("layer_errors.png not written: matplotlib is not installed "
                     "(pip install 'bnsurgery[plot]')")
    say("writing report.json")
    report_path = write_report_json(reports, out / "report.json", extra={
        "model": loaded.to_dict(), "seed": seed, "weights": loaded.weights,
        "input_shape": list(shape),
        "demo": {"rows": [r.to_dict() for r in rows], "notes": notes,
                 "onnx_path": str(onnx_path), "fusion_plan": plan.to_dict()}})
    return DemoResult(tuple(rows), tuple(reports), report_path, plot_path, onnx_path,
                      tuple(notes), model=loaded.to_dict(), input_shape=shape,
                      plan=plan.to_dict())
