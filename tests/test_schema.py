"""Tests for bnsurgery.schema: the shipped schema, its checker, and report entries."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from bnsurgery.report import EquivalenceReport, OutputComparison, Tolerance
from bnsurgery.schema import (
    SCHEMA_VERSION,
    check_document,
    load_schema,
    overall_status,
    passed_value,
    report_entry,
)

TOLERANCE = Tolerance("float32", 1e-4, 1e-5)


def _report(*, skipped: str | None = None, error: float = 0.0) -> EquivalenceReport:
    outputs = () if skipped else (OutputComparison(
        "output", 1, (1, 4), error, 1.0, error, error, 1.0, None, 1e-4, error <= 1e-4),)
    return EquivalenceReport("onnxruntime", "model", "file", "cpu", TOLERANCE, outputs,
                             skipped=skipped)


def _document(**changes) -> dict:
    document = {"schema_version": SCHEMA_VERSION, "command": "validate", "status": "passed",
                "passed": True, "exit_code": 0, "model": None, "input_shape": [1, 3, 8, 8],
                "seed": 0, "weights": "random", "reports": [report_entry(_report())],
                "plan": None, "output": None, "format": None}
    document.update(changes)
    return json.loads(json.dumps(document))


def test_the_shipped_schema_is_the_file_in_the_package():
    path = Path(__file__).resolve().parents[1] / "bnsurgery" / "report_schema.json"
    assert load_schema() == json.loads(path.read_text())
    assert load_schema()["properties"]["schema_version"]["const"] == SCHEMA_VERSION


def test_a_conforming_document_passes():
    assert check_document(_document()) == []


@pytest.mark.parametrize(("changes", "expected"), [
    pytest.param({"status": "FAILED"}, "$.status: 'FAILED', expected one of", id="status"),
    pytest.param({"exit_code": True}, "$.exit_code: True, expected one of", id="bool-code"),
    pytest.param({"seed": True}, "$.seed: bool True, expected integer or null", id="bool-int"),
    pytest.param({"input_shape": [1, 0]}, "$.input_shape: matches 0 of the oneOf", id="shape"),
    pytest.param({"schema_version": 2}, "$.schema_version: 2, expected 1", id="version"),
    pytest.param({"model": {"spec": {}}}, "$.model: matches 0 of the oneOf", id="model"),
], )
def test_violations_are_named(changes, expected):
    errors = check_document(_document(**changes))
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_missing_keys_and_nested_errors_are_named():
    document = _document()
    del document["plan"]
    document["reports"][0]["status"] = "skipped: no CUDA"
    errors = check_document(document)
    assert "$: missing key 'plan'" in errors
    assert any(e.startswith("$.reports[0].status: 'skipped: no CUDA'") for e in errors)


def test_a_report_says_what_its_divergence_names():
    entry = report_entry(dataclasses.replace(_report(error=1.0), first_divergence="conv.out",
                                             divergence_kind="tensor"))
    assert entry["divergence_kind"] == "tensor"
    assert check_document(_document(reports=[entry], status="failed", passed=False,
                                    exit_code=1)) == []
    entry["divergence_kind"] = "layer"
    errors = check_document(_document(reports=[entry], status="failed", passed=False,
                                      exit_code=1))
    assert len(errors) == 1 and errors[0].startswith("$.reports[0].divergence_kind: 'layer'")


def test_report_entries_say_skipped_not_failed():
    skipped = report_entry(_report(skipped="no CUDA"))
    assert skipped["status"] == "skipped" and skipped["passed"] is None
    assert skipped["skipped"] == "no CUDA"
    failed = report_entry(_report(error=1.0))
    assert failed["status"] == "failed" and failed["passed"] is False
    assert report_entry(_report())["passed"] is True
    assert check_document(_document(reports=[skipped, failed], status="failed",
                                    passed=False, exit_code=1)) == []


def test_overall_status():
    assert overall_status([]) == "skipped" and passed_value("skipped") is None
    assert overall_status(["skipped", "passed"]) == "passed"
    assert overall_status(["passed", "failed", "skipped"]) == "failed"
    assert passed_value("passed") is True and passed_value("failed") is False


def test_checker_does_not_mutate_the_document():
    document = _document(reports=[report_entry(_report(error=float(torch.tensor(2.0))))])
    before = copy.deepcopy(document)
    check_document(document)
    assert document == before
