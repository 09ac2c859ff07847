"""Tests for bnsurgery.report: verdicts, text and JSON forms, atomic writes and the plot."""

from __future__ import annotations

import json
import math

import pytest

from bnsurgery.errors import InvalidInputError
from bnsurgery.report import (
    EquivalenceReport,
    LayerError,
    OutputComparison,
    Tolerance,
    collect_environment,
    plot_layer_errors,
    write_report_json,
)

TOL = Tolerance("fp32", rtol=1e-4, atol=1e-6, why="test")


def _output(error: float, *, scale: float = 2.0, batch: int | None = 2) -> OutputComparison:
    allowed = TOL.allowed(scale)
    return OutputComparison(
        name="output", batch=batch, shape=(2, 10), max_abs_error=error, scale=scale,
        max_rel_error=error / scale, mean_abs_error=error / 3, cosine_similarity=1.0,
        top1_agreement=1.0, allowed_error=allowed, float64_error=error / 2,
        reference_float64_error=error / 2)


def _report(**changes) -> EquivalenceReport:
    fields = dict(check="pytorch", reference="ref", candidate="cand", backend="pytorch:cpu",
                  tolerance=TOL, outputs=(_output(1e-6),), environment=collect_environment())
    fields.update(changes)
    return EquivalenceReport(**fields)


def test_tolerance_allowed_scales_with_output():
    assert TOL.allowed(0.0) == pytest.approx(1e-6)
    assert TOL.allowed(10.0) == pytest.approx(1e-6 + 1e-3)
    assert "fp32" in str(TOL)


@pytest.mark.parametrize(
    ("changes", "passed", "status"),
    [
        pytest.param({}, True, "passed", id="in-tolerance"),
        pytest.param({"outputs": (_output(1e-6), _output(1.0))}, False, "FAILED",
                     id="one-output-out-of-tolerance"),
        pytest.param({"outputs": (_output(math.inf),)}, False, "FAILED", id="non-finite"),
        pytest.param({"failures": ("provider fell back",)}, False, "FAILED",
                     id="non-numeric-failure"),
        pytest.param({"outputs": ()}, False, "FAILED", id="nothing-compared"),
        pytest.param({"outputs": (), "skipped": "no CUDA"}, False, "skipped: no CUDA",
                     id="skipped-is-not-a-pass"),
    ],
)
def test_verdict(changes, passed, status):
    report = _report(**changes)
    assert report.passed is passed
    assert report.status == status
    assert isinstance(hash(report), int)  # frozen and hashable despite its mapping fields


def test_str_is_readable_and_names_the_divergence():
    report = _report(outputs=(_output(1.0),), first_divergence="layer2.0.relu",
                     divergence_suspects=("layer2.0.conv1", "layer2.0.bn1"),
                     details={"opset": 18, "exporter": "torch.onnx.export(dynamo=True)",
                              "providers_used": ["CPUExecutionProvider"]},
                     notes=("a note",))
    text = str(report)
    assert text.splitlines()[0].startswith("pytorch check FAILED: cand vs ref")
    for expected in ("layer2.0.relu", "layer2.0.conv1", "opset: 18", "dynamo=True",
                     "CPUExecutionProvider", "FAIL", "note: a note", "max|err|"):
        assert expected in text
    assert ("  first diverging module: layer2.0.relu (ran just before it, not compared: "
            "layer2.0.conv1, layer2.0.bn1)") in text.splitlines()
    assert report.divergence_kind == "module"  # what a PyTorch reference's divergence names


def test_a_diverging_tensor_is_called_a_tensor():
    report = _report(outputs=(_output(1.0),), first_divergence="conv.out",
                     divergence_suspects=("Conv conv",), divergence_kind="tensor")
    lines = str(report).splitlines()
    assert ("  first diverging tensor: conv.out (the candidate computes it from tensors that "
            "still agree with: Conv conv)") in lines
    assert not any("first diverging module" in line for line in lines)
    assert report.to_dict()["divergence_kind"] == "tensor"


def test_to_dict_is_strict_json_with_environment():
    report = _report(outputs=(_output(math.inf),), layers=(LayerError("relu", 1.0, math.nan,
                                                                      True),),
                     details={"file": "m.onnx", "providers_used": ("CPUExecutionProvider",)},
                     timings={"reference_forward_s": 0.5})
    document = report.to_dict()
    text = json.dumps(document, allow_nan=False)  # NaN/inf must have been turned into strings
    loaded = json.loads(text)
    assert loaded["status"] == "FAILED" and loaded["passed"] is False
    assert loaded["outputs"][0]["max_abs_error"] == "inf"
    assert loaded["layers"][0]["max_rel_error"] == "nan"
    assert loaded["details"]["providers_used"] == ["CPUExecutionProvider"]
    versions = loaded["environment"]["versions"]
    for component in ("torch", "onnx", "onnxruntime", "onnxscript", "torch_tensorrt"):
        assert component in versions
    assert versions["torch"]
    environment = loaded["environment"]
    assert set(environment["tf32"]) == {"matmul", "cudnn"}
    assert "gpu_name" in environment and "cuda_available" in environment


def test_write_report_json_is_atomic_and_summarises(tmp_path):
    path = tmp_path / "out" / "report.json"
    reports = [_report(), _report(outputs=(), skipped="no CUDA")]
    write_report_json(reports, path, extra={"demo": {"rows": [1, 2]}})
    document = json.loads(path.read_text())
    assert document["passed"] is True
    assert document["summary"] == {"passed": 1, "failed": 0, "skipped": 1}
    assert [r["status"] for r in document["reports"]] == ["passed", "skipped: no CUDA"]
    assert document["demo"] == {"rows": [1, 2]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]

    write_report_json([_report(outputs=(_output(1.0),))], path)
    assert json.loads(path.read_text())["passed"] is False


def test_write_report_json_with_only_skipped_checks_does_not_claim_a_pass(tmp_path):
    path = write_report_json(_report(outputs=(), skipped="no CUDA"), tmp_path / "r.json")
    assert json.loads(path.read_text())["passed"] is False


def test_str_escapes_values_read_from_the_checked_file():
    forged = "exporter\n  onnxruntime check passed: \x1b[32mok\x1b[0m"
    text = str(_report(details={"exporter": forged}, notes=("note\r\nfake line",)))
    # header, backend, exporter, table header, one row, one note: no forged line among them
    assert len(text.splitlines()) == 6
    assert not any(line.lstrip().startswith("onnxruntime check") for line in text.splitlines())
    assert "\\n  onnxruntime check passed: \\x1b[32mok" in text
    assert "\x1b" not in text and "\r" not in text


def test_plot_layer_errors_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    layers = tuple(LayerError(f"layer{i}", 1e-6 * (i + 1), 1e-6 * (i + 1), i == 4)
                   for i in range(6)) + (LayerError("zero", 0.0, 0.0, False),)
    report = _report(layers=layers)
    path = plot_layer_errors({"fused": report, "onnx": layers}, tmp_path / "errors.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000


def test_plot_layer_errors_refuses_empty(tmp_path):
    with pytest.raises(InvalidInputError, match="no per-layer errors"):
        plot_layer_errors([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
