"""Tests for bnsurgery.demo: the whole story runs, passes, and writes its report and plot."""

from __future__ import annotations

import json
import re

import pytest

from bnsurgery._lazy import is_available
from bnsurgery.cli import main

pytest.importorskip("onnxruntime")


@pytest.mark.usefixtures("torchvision")  # the demo builds torchvision's resnet18
def test_demo_through_the_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--input-shape", "2,3,64,64", "--providers", "cpu",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    from bnsurgery.schema import check_document

    assert check_document(document) == []
    assert document["passed"] is True and document["status"] == "passed"
    assert document["input_shape"] == [2, 3, 64, 64] and document["plan"]["folded"]
    assert {r["status"] for r in document["reports"]} <= {"passed", "skipped"}
    steps = [row["step"] for row in document["rows"]]
    assert steps[:6] == ["build resnet18", "replace BatchNorm", "eager original",
                         "fuse BatchNorm", "export ONNX", "onnxruntime"]
    assert any(step.startswith("TensorRT") for step in steps)
    assert "bnsurgery [" in captured.err  # progress on stderr, JSON alone on stdout
    rows = {row["step"]: row for row in document["rows"]}
    original = rows["eager original"]["latency_ms"]
    for step in ("eager original", "fuse BatchNorm", "onnxruntime"):
        low, high = rows[step]["latency_spread_ms"]  # quartiles printed next to the median
        assert low <= rows[step]["latency_ms"] <= high
    for step in ("fuse BatchNorm", "onnxruntime"):
        # The ratio is the one of the figures in the same table, not of another timing.
        ratio = float(re.search(r"([0-9.]+)x the eager original", rows[step]["detail"])[1])
        assert ratio == pytest.approx(rows[step]["latency_ms"] / original, abs=0.006)

    report = json.loads((out / "report.json").read_text())
    checks = [r["check"] for r in report["reports"]]
    assert checks[:3] == ["pytorch", "pytorch", "onnxruntime"]
    assert "tensorrt" in checks
    for entry in report["reports"][:3]:
        assert entry["status"] == "passed"
        assert entry["layers"] or entry["candidate"].startswith("resnet18 with")
    tensorrt = next(r for r in report["reports"] if r["check"] == "tensorrt")
    from bnsurgery.tensorrt import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        assert tensorrt["status"] == f"skipped: {reason}" and tensorrt["passed"] is False
    assert report["environment"]["versions"]["onnxruntime"]
    assert report["model"]["spec"]["text"] == "torchvision:resnet18" and report["seed"] == 0
    assert report["demo"]["fusion_plan"]["folded"]

    if is_available("matplotlib"):
        assert (out / "layer_errors.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "resnet18.onnx").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_demo_table_in_text(tmp_path, capsys):
    from bnsurgery.demo import DemoResult, DemoRow

    result = DemoResult(rows=(DemoRow("fuse BatchNorm", "passed", 1.5e-6, 12.3, 0.4, "20 folded",
                                      latency_spread_ms=(11.5, 13.25)),
                              DemoRow("TensorRT fp32", "skipped: no CUDA")),
                        reports=(), report_path=tmp_path / "report.json", plot_path=None,
                        onnx_path=tmp_path / "m.onnx")
    text = str(result)
    assert "fuse BatchNorm" in text and "1.50e-06" in text and "12.3 ms (11.5-13.2)" in text
    assert "skipped: no CUDA" in text and "(not written)" in text
