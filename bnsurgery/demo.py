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

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bnsurgery._lazy import is_available
from bnsurgery.report import EquivalenceReport, plot_layer_errors, write_report_json
from bnsurgery.results import JsonResult
from bnsurgery.tables import render_table
from bnsurgery.timing import Timing, interleaved_timings

__all__ = ["DEFAULT_DEMO_DIR", "DemoResult", "DemoRow", "run_demo"]

DEFAULT_DEMO_DIR = "bnsurgery-demo"


@dataclass(frozen=True)
class DemoRow(JsonResult):
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


@dataclass(frozen=True)
class DemoResult(JsonResult):
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

    json_derived: ClassVar[tuple[str, ...]] = ("passed",)

    @property
    def passed(self) -> bool:
        """Something ran and no check that ran failed (skipped checks count neither way)."""
        ran = [r for r in self.reports if r.skipped is None]
        return bool(ran) and all(r.passed for r in ran)

    def __str__(self) -> str:
        header = ("step", "status", "max rel err", "latency", "time", "detail")
        rows = [(r.step, r.status, "-" if r.max_rel_error is None else f"{r.max_rel_error:.2e}",
                 _latency_text(r), f"{r.seconds:.1f} s", r.detail) for r in self.rows]
        lines = render_table(header, rows)
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

    Each step is a function of its own below; this one only runs them in order and collects
    their rows (the table's order) and reports (the check order).
    """
    from bnsurgery.models import load_model

    say = progress or (lambda message: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in input_shape)

    say("building torchvision:resnet18")
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loaded = load_model("torchvision:resnet18", weights=weights)
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    model, source = _prepare_weights(loaded.model, inputs, weights, seed)
    notes = [f"resnet18 with {source}; inputs {list(shape)}"]
    rows = [DemoRow("build resnet18", "done", seconds=time.perf_counter() - start,
                    detail=source)]

    say("replacing BatchNorm with the from-scratch BatchNorm")
    replace_row, replace_report = _replace_step(model, inputs)
    rows.append(replace_row)
    say("folding BatchNorm into the convolutions")
    fused = _fuse_step(model, inputs)
    say("exporting to ONNX (torch.onnx.export, dynamo=True, opset 18)")
    onnx_path, export_row = _export_step(model, inputs, out)
    say("validating the ONNX file in onnxruntime")
    ort_report, ort_seconds = _onnxruntime_step(model, onnx_path, inputs, providers,
                                                per_layer=plot)

    say(f"timing the original, the fused model and onnxruntime ({repeats} interleaved rounds)")
    rows += _latency_rows(model, fused, inputs, onnx_path, ort_report, repeats,
                          export_row=export_row, ort_seconds=ort_seconds)
    trt_rows, trt_reports = _tensorrt_steps(model, inputs, repeats, say)
    rows += trt_rows
    reports = [replace_report, fused.report, ort_report, *trt_reports]

    plot_path = _plot_step(fused.report, ort_report, out, plot, say, notes)
    say("writing report.json")
    report_path = write_report_json(reports, out / "report.json", extra={
        "model": loaded.to_dict(), "seed": seed, "weights": loaded.weights,
        "input_shape": list(shape),
        "demo": {"rows": [r.to_dict() for r in rows], "notes": notes,
                 "onnx_path": str(onnx_path), "fusion_plan": fused.plan.to_dict()}})
    return DemoResult(tuple(rows), tuple(reports), report_path, plot_path, onnx_path,
                      tuple(notes), model=loaded.to_dict(), input_shape=shape,
                      plan=fused.plan.to_dict())


def _prepare_weights(model: nn.Module, inputs: torch.Tensor, weights: str | None,
                     seed: int) -> tuple[nn.Module, str]:
    """Calibrate BatchNorm state on random data when the weights are random (default statistics
    would make folding an identity); the model and a description of its weights."""
    if weights is not None:
        return model, f"weights {weights}"
    from bnsurgery.calibrate import calibrate_batchnorm

    calibration = inputs if inputs.shape[0] >= 2 else torch.cat([inputs, inputs])
    model = calibrate_batchnorm(model, calibration, steps=2, seed=seed).eval()
    return model, "random weights, calibrated BatchNorm state"


def _replace_step(model: nn.Module, inputs: torch.Tensor) -> tuple[DemoRow, EquivalenceReport]:
    """Swap in the from-scratch BatchNorm and compare with the original."""
    from bnsurgery.replace import replace_batchnorm
    from bnsurgery.validate import compare_models

    start = time.perf_counter()
    replaced = replace_batchnorm(model, inplace=False).eval()
    report = compare_models(model, replaced, inputs, reference_name="original resnet18",
                            candidate_name="resnet18 with bnsurgery BatchNorm")
    row = DemoRow("replace BatchNorm", report.status, report.max_rel_error,
                  seconds=time.perf_counter() - start,
                  detail="from-scratch BN vs torch BN, eager")
    return row, report


@dataclass(frozen=True)
class _Fused:
    """The fusion step's outputs; its row waits for the timing, which is shared."""

    plan: Any
    model: nn.Module
    report: EquivalenceReport
    seconds: float  # planning, its check, folding and comparing


def _fuse_step(model: nn.Module, inputs: torch.Tensor) -> _Fused:
    """Plan and fold BatchNorm, then compare the fused model with the original per layer."""
    from bnsurgery.fuse import fuse_batchnorm, plan_fusion
    from bnsurgery.validate import compare_models

    start = time.perf_counter()
    plan = plan_fusion(model, inputs)
    fused = fuse_batchnorm(model, inputs, plan=plan).eval()
    report = compare_models(model, fused, inputs, per_layer=True,
                            reference_name="original resnet18",
                            candidate_name="fused resnet18 (PyTorch eager)")
    return _Fused(plan, fused, report, time.perf_counter() - start)


def _export_step(model: nn.Module, inputs: torch.Tensor, out: Path) -> tuple[Path, DemoRow]:
    """Export the original to one ONNX file (folded on the way)."""
    from bnsurgery.onnx_export import export_onnx

    start = time.perf_counter()
    onnx_path = export_onnx(model, inputs, out / "resnet18.onnx", fuse=True)
    row = DemoRow("export ONNX", "done", seconds=time.perf_counter() - start,
                  detail=f"{onnx_path.name}, {onnx_path.stat().st_size / 1e6:.1f} MB, "
                         "one file, checker clean, batch 1 and larger ran")
    return onnx_path, row


def _onnxruntime_step(model: nn.Module, onnx_path: Path, inputs: torch.Tensor,
                      providers: Sequence[str] | str | None, *,
                      per_layer: bool) -> tuple[EquivalenceReport, float]:
    """Validate the ONNX file in onnxruntime against the original; the report and its seconds."""
    from bnsurgery.validate import validate_onnx

    start = time.perf_counter()
    report = validate_onnx(model, onnx_path, inputs, providers=providers, per_layer=per_layer)
    return report, time.perf_counter() - start


def _time_contenders(model: nn.Module, fused: nn.Module, inputs: torch.Tensor,
                     onnx_path: Path, ort_report: EquivalenceReport,
                     repeats: int) -> dict[str, Timing]:
    """Time the original, the fused model and (when it ran) onnxruntime in the same rounds."""
    from bnsurgery.ort_session import OnnxRunner

    calls: dict[str, Callable[[], Any]] = {"original": lambda: model(inputs),
                                           "fused": lambda: fused(inputs)}
    if ort_report.details.get("providers_used"):
        runner = OnnxRunner(onnx_path, ort_report.details["providers_requested"])
        feed = runner.feed((inputs,))
        calls["onnxruntime"] = lambda: runner.run(feed)
    with torch.no_grad():
        return interleaved_timings(calls, rounds=max(2, repeats), warmup=1)


def _latency_rows(model: nn.Module, fused: _Fused, inputs: torch.Tensor, onnx_path: Path,
                  ort_report: EquivalenceReport, repeats: int, *, export_row: DemoRow,
                  ort_seconds: float) -> list[DemoRow]:
    """The rows that carry a latency (and the export row, which sits between them)."""
    start = time.perf_counter()
    timed = _time_contenders(model, fused.model, inputs, onnx_path, ort_report, repeats)
    timing_seconds = time.perf_counter() - start
    original = timed["original"]

    def against_original(name: str) -> str:
        return f"{timed[name].median / original.median:.2f}x the eager original's median"

    plan = fused.plan
    sizes = ", ".join(str(s) for s in ort_report.details.get("batch_sizes", []))
    ort = timed.get("onnxruntime")
    return [
        DemoRow("eager original", "done", latency_ms=1e3 * original.median,
                seconds=timing_seconds, latency_spread_ms=original.spread_ms,
                detail=f"PyTorch eager, float32; time: {max(2, repeats)} interleaved "
                       "rounds of every latency in this table (median, quartiles)"),
        DemoRow("fuse BatchNorm", fused.report.status, fused.report.max_rel_error,
                1e3 * timed["fused"].median, fused.seconds,
                f"{len(plan.folded)} folded, {len(plan.skipped)} skipped; "
                f"{against_original('fused')}",
                latency_spread_ms=timed["fused"].spread_ms),
        export_row,
        DemoRow("onnxruntime", ort_report.status, ort_report.max_rel_error,
                None if ort is None else 1e3 * ort.median, ort_seconds,
                f"{ort_report.backend}, batches {sizes}"
                + ("" if ort is None else f"; {against_original('onnxruntime')}"),
                latency_spread_ms=None if ort is None else ort.spread_ms)]


def _tensorrt_steps(model: nn.Module, inputs: torch.Tensor, repeats: int,
                    say: Callable[[str], None]) -> tuple[list[DemoRow],
                                                         list[EquivalenceReport]]:
    """Compile and validate with TensorRT in fp32 then fp16 (one skipped row without it)."""
    from bnsurgery.tensorrt import validate_tensorrt

    rows, reports = [], []
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
    return rows, reports


def _plot_step(fuse_report: EquivalenceReport, ort_report: EquivalenceReport, out: Path,
               plot: bool, say: Callable[[str], None], notes: list[str]) -> Path | None:
    """Plot the error per layer when asked and matplotlib exists; else say why not in notes."""
    if plot and is_available("matplotlib"):
        say("plotting the error per layer")
        series = {"fused PyTorch": fuse_report, "ONNX (onnxruntime)": ort_report}
        return plot_layer_errors(
            {k: v for k, v in series.items() if v.layers}, out / "layer_errors.png",
            title="resnet18: error per module boundary against the original (float32)")
    if plot:
        notes.append("layer_errors.png not written: matplotlib is not installed "
                     "(pip install 'bnsurgery[plot]')")
    return None
