"""Tests for bnsurgery.results: every public result type round-trips through JSON.

The instances come from real calls on a small model (plans, checks, reports), so the test
covers what users actually get, including nested results and non-finite numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import bnsurgery
from bnsurgery.calibrate import calibrate_batchnorm
from bnsurgery.results import JsonResult, json_float, jsonable


class _Net(nn.Module):
    """conv-BN-ReLU, then a RepVGG-style sum of two conv-BN branches, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.branch3 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.branch1 = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.branch3(x) + self.branch1(x))
        return self.head(x.mean((2, 3)))


def _results() -> list[object]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = calibrate_batchnorm(_Net(), x, steps=2, seed=0).eval()
    fused = bnsurgery.fuse_batchnorm(model, x)
    report = bnsurgery.compare_models(model, fused, x, per_layer=True)
    # Another shape: the error is infinite, which JSON can only hold as a string.
    mismatch = bnsurgery.compare_models(model, nn.Sequential(_Net(), nn.Flatten(0)).eval(), x,
                                        per_layer=False)
    recalibrated = bnsurgery.recalibrate_batchnorm(model, [x, x])
    return [
        bnsurgery.plan_fusion(model, x), bnsurgery.find_fold_pairs(model, x), report, mismatch,
        bnsurgery.plan_reparameterization(model, x), bnsurgery.plan_replacement(model),
        recalibrated, bnsurgery.TOLERANCES["fp16"],
    ]


def _nested(value: object, found: set[type]) -> None:
    """Every result type reachable from ``value`` through dataclass fields and containers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        found.add(type(value))
        for f in dataclasses.fields(value):
            _nested(getattr(value, f.name), found)
    elif isinstance(value, dict):
        for item in value.values():
            _nested(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _nested(item, found)


@pytest.fixture(scope="module")
def results() -> list[object]:
    return _results()


def test_every_public_result_type_is_covered(results):
    public = [getattr(bnsurgery, name) for name in bnsurgery.__all__]
    result_types = {t for t in public if isinstance(t, type) and dataclasses.is_dataclass(t)
                    and hasattr(t, "to_dict")}
    assert len(result_types) >= 12  # the collection itself works
    found: set[type] = set()
    for result in results:
        _nested(result, found)
    assert result_types - found == set(), "add an instance of these types to _results()"


def test_every_result_round_trips_through_json(results):
    found: set[type] = set()
    for result in results:
        _nested(result, found)
    for kind in sorted(found, key=lambda t: t.__name__):
        instances = []
        for result in results:
            instances += _instances(result, kind)
        for instance in instances:
            data = instance.to_dict()
            # allow_nan=False: infinities must already be strings; loads(dumps(x)) == x holds
            # only for lists, str keys and plain numbers, so a tuple or a Path would show here.
            assert json.loads(json.dumps(data, allow_nan=False)) == data, kind.__name__


def _instances(value: object, kind: type) -> list[object]:
    found = [value] if type(value) is kind else []
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            found += _instances(getattr(value, f.name), kind)
    elif isinstance(value, dict):
        for item in value.values():
            found += _instances(item, kind)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += _instances(item, kind)
    return found


def test_a_mismatched_output_keeps_its_infinite_error_as_a_string(results):
    mismatch = results[3]
    data = json.loads(json.dumps(mismatch.to_dict(), allow_nan=False))
    assert data["passed"] is False and data["status"] == "FAILED"
    assert data["outputs"][0]["passed"] is False
    assert data["outputs"][0]["max_abs_error"] == "inf"


def test_derived_and_omitted_entries():
    @dataclasses.dataclass(frozen=True)
    class Example(JsonResult):
        json_derived = ("total",)
        json_omitted = ("model",)
        values: tuple[float, ...]
        model: object = None

        @property
        def total(self) -> float:
            return sum(self.values)

    data = Example((1.0, math.inf), model=nn.ReLU()).to_dict()
    assert data == {"values": [1.0, "inf"], "total": "inf"}
    assert json_float(None) is None and json_float(math.nan) == "nan"
    assert jsonable({1: (torch.float32,)}) == {"1": ["torch.float32"]}


# ----------------------------------------------------------- result types outside __all__
# These come from the submodules (the CLI's JSON carries them); each is compared with the form
# its hand-written to_dict gave before it derived from JsonResult, so no key moved or changed.

def _round_trip(result: object) -> dict:
    data = result.to_dict()  # type: ignore[attr-defined]
    assert json.loads(json.dumps(data, allow_nan=False)) == data, type(result).__name__
    return data


def test_model_spec_and_loaded_model(tmp_path):
    from bnsurgery.models import load_model, parse_model_spec

    spec = parse_model_spec("torch.nn:Identity")
    assert _round_trip(spec) == {"source": spec.source, "name": spec.name,
                                 "text": "torch.nn:Identity"}
    loaded = load_model(spec)
    assert _round_trip(loaded) == {"spec": spec.to_dict(), "input_shape": list(loaded.input_shape),
                                   "weights": loaded.weights, "class": "Identity",
                                   "cast": list(loaded.cast)}


def test_archive_entry(tmp_path):
    from bnsurgery.archive import read_zip_entries

    torch.save({"w": torch.zeros(16)}, tmp_path / "w.pt")
    entries = read_zip_entries(tmp_path / "w.pt")
    assert entries
    for entry in entries:
        assert _round_trip(entry) == {"name": entry.name, "size": entry.size,
                                      "compressed_size": entry.compressed_size,
                                      "compressed": entry.compressed}


def test_precision_report_and_kernel_info():
    from bnsurgery.fold import precision_report
    from bnsurgery.kernels import kernel_info

    folded = torch.tensor([1e6, 1e-9, 1.0], dtype=torch.float64)
    report = precision_report([folded], [torch.ones(3)], torch.float16)
    assert report.overflow == 1 and report.subnormal == 1  # 1e6 > 65504; 1e-9 flushes
    assert _round_trip(report) == {"dtype": "torch.float16", "overflow": 1, "subnormal": 1,
                                   "max_abs": 1e6, "min_abs_nonzero": 1e-9}
    info = kernel_info("cpu")
    assert _round_trip(info) == {"device": info.device, "backend": info.backend,
                                 "reason": info.reason, "unavailable": dict(info.unavailable)}


def test_onnx_inspect_results():
    from bnsurgery.onnx_inspect import OnnxBatchNorm, OnnxSummary

    bn = OnnxBatchNorm("bn", "conv", "Conv", True, "folds into Conv 'conv'")
    assert _round_trip(bn) == {"name": "bn", "producer": "conv", "producer_op": "Conv",
                               "foldable": True, "reason": "folds into Conv 'conv'"}
    summary = OnnxSummary("m.onnx", (("x", "float32", ("batch", 3)),), (("y", "float32", (1,)),),
                          {"": 18}, {"Conv": 1}, 10, 40, 7, (), (bn,), {"k": "v"})
    data = _round_trip(summary)
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3]}]
    assert data["flops"] == 14 and data["batchnorms"] == [bn.to_dict()]


def test_timing():
    from bnsurgery.timing import Timing

    timing = Timing.of([1.0, 2.0, 4.0])
    assert _round_trip(timing) == {"median": 2.0, "quartiles": [1.5, 3.0], "samples": 3}


def test_demo_results(results, tmp_path):
    from bnsurgery.demo import DemoResult, DemoRow

    row = DemoRow("onnxruntime", "FAILED", math.inf, 2.5, 1.0, "cpu",
                  latency_spread_ms=(2.0, 3.0))
    assert _round_trip(row) == {"step": "onnxruntime", "status": "FAILED",
                                "max_rel_error": "inf", "latency_ms": 2.5, "seconds": 1.0,
                                "detail": "cpu", "latency_spread_ms": [2.0, 3.0]}
    report = results[2]
    demo = DemoResult((row,), (report,), tmp_path / "report.json", None, tmp_path / "m.onnx",
                      ("note",), model={"class": "ResNet"}, input_shape=(2, 3, 8, 8),
                      plan={"folded": []})
    assert _round_trip(demo) == {
        "passed": report.passed, "rows": [row.to_dict()], "reports": [report.to_dict()],
        "report_path": str(tmp_path / "report.json"), "plot_path": None,
        "onnx_path": str(tmp_path / "m.onnx"), "notes": ["note"], "model": {"class": "ResNet"},
        "input_shape": [2, 3, 8, 8], "plan": {"folded": []}}
