"""Tests for bnsurgery.comparison: per-output metrics, tolerances and the shared run core."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from bnsurgery.comparison import (
    TOLERANCES,
    OutputComparison,
    compare_output,
    float64_copy,
    run_and_compare,
    select_tolerance,
)
from bnsurgery.errors import InvalidInputError, NonFiniteReferenceError


def test_metrics_on_known_tensors():
    reference = torch.tensor([[1.0, 2.0, 4.0], [0.5, -1.0, 0.0]])
    candidate = reference.clone()
    candidate[0, 2] = 3.5  # changes the row's arg-max? no: 3.5 > 2.0 still wins
    candidate[1, 0] = -2.0  # row 2's arg-max moves from column 0 to column 2
    result = compare_output("logits", 2, reference, candidate, TOLERANCES["fp32"])
    assert result.max_abs_error == pytest.approx(2.5)
    assert result.scale == pytest.approx(4.0)
    assert result.max_rel_error == pytest.approx(2.5 / 4.0)
    assert result.mean_abs_error == pytest.approx(3.0 / 6)
    expected_cos = float(torch.nn.functional.cosine_similarity(
        reference.flatten(), candidate.flatten(), dim=0))
    assert result.cosine_similarity == pytest.approx(expected_cos)
    assert result.top1_agreement == pytest.approx(0.5)
    assert not result.passed


def test_metrics_flag_non_finite_and_shape_mismatch():
    reference = torch.ones(2, 3)
    candidate = reference.clone()
    candidate[0, 0] = math.nan
    assert not compare_output("o", 2, reference, candidate, TOLERANCES["fp32"]).passed
    mismatch = compare_output("o", 2, reference, torch.ones(2, 4), TOLERANCES["fp32"])
    assert not mismatch.passed and math.isinf(mismatch.max_abs_error)


@pytest.mark.parametrize(
    ("dtype", "tf32", "backend", "label"),
    [
        pytest.param(torch.float32, False, "pytorch", "fp32", id="fp32"),
        pytest.param(torch.float32, True, "pytorch", "tf32", id="tf32"),
        pytest.param(torch.float16, False, "pytorch", "fp16", id="fp16"),
        pytest.param(torch.bfloat16, False, "pytorch", "bf16", id="bf16"),
        pytest.param(torch.float32, False, "tensorrt", "tensorrt-fp32", id="tensorrt-fp32"),
        pytest.param(torch.float16, False, "tensorrt", "fp16", id="tensorrt-fp16"),
    ],
)
def test_select_tolerance(dtype, tf32, backend, label):
    tolerance = select_tolerance(dtype, backend=backend, tf32=tf32)
    assert tolerance.label == label
    assert tolerance.why  # every tolerance says where its numbers come from


def test_select_tolerance_override_and_bad_values():
    custom = select_tolerance(torch.float32, rtol=1e-3)
    assert custom.rtol == 1e-3 and custom.atol == TOLERANCES["fp32"].atol
    assert "custom" in custom.label
    with pytest.raises(InvalidInputError, match="non-negative"):
        select_tolerance(torch.float32, atol=-1.0)


def test_passed_is_derived_from_the_numbers_not_stored():
    allowed = TOLERANCES["fp32"].allowed(2.0)
    fields = dict(name="o", batch=1, shape=(1, 2), scale=2.0, max_rel_error=0.0,
                  mean_abs_error=0.0, cosine_similarity=1.0, top1_agreement=None,
                  allowed_error=allowed)
    assert OutputComparison(max_abs_error=allowed, **fields).passed
    assert not OutputComparison(max_abs_error=allowed * 1.01, **fields).passed
    assert not OutputComparison(max_abs_error=math.inf, **fields).passed
    with pytest.raises(TypeError):
        OutputComparison(max_abs_error=0.0, passed=True, **fields)  # not a field any more


def test_output_comparison_json_holds_passed_and_non_finite_numbers():
    reference = torch.ones(2, 3)
    result = compare_output("o", 2, reference, torch.ones(2, 4), TOLERANCES["fp32"])
    data = json.loads(json.dumps(result.to_dict()))
    assert data["passed"] is False
    assert data["max_abs_error"] == "inf" and data["shape"] == [2, 3]


class _Affine(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.scale = scale

    def forward(self, x):
        return self.linear(x) * self.scale


def test_run_and_compare_judges_a_candidate_callable_against_the_reference():
    torch.manual_seed(0)
    reference = _Affine().eval()
    x = torch.randn(5, 4)
    exact = reference.linear.weight.double()
    model64, why = float64_copy(reference, torch.device("cpu"))
    assert why is None
    good = run_and_compare(reference, lambda t: reference(t).clone(), (x,), (x,), batch=5,
                           tolerance=TOLERANCES["fp32"], device=torch.device("cpu"),
                           model64=model64)
    assert [o.passed for o in good.outputs] == [True] and not good.failures
    # The float64 copy is an independent, exact run: its error is float32 rounding only.
    with torch.no_grad():
        expected = x.double() @ exact.T + reference.linear.bias.double()
        rounding = float((reference(x).double() - expected).abs().max())
    assert good.outputs[0].float64_error == pytest.approx(rounding, abs=1e-12)
    bad = run_and_compare(reference, lambda t: [reference(t) * 1.01, reference(t)], (x,), (x,),
                          batch=5, tolerance=TOLERANCES["fp32"], device=torch.device("cpu"))
    assert not bad.outputs[0].passed
    assert bad.failures == ("the reference returns 1 tensors, the candidate 2",)


def test_run_and_compare_refuses_a_non_finite_reference():
    reference = _Affine(scale=math.inf).eval()
    with pytest.raises(NonFiniteReferenceError, match="not finite"):
        run_and_compare(reference, reference, (torch.randn(2, 4),), (torch.randn(2, 4),),
                        batch=2, tolerance=TOLERANCES["fp32"], device=torch.device("cpu"))
