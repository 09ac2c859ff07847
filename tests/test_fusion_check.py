"""Tests of the pre-release check and the bisection (bnsurgery.fusion_check)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnsurgery.calibrate import calibrate_batchnorm
from bnsurgery.errors import InvalidInputError, NonFiniteReferenceError
from bnsurgery.fusion_check import ReferenceRuns, bisect_failures, inputs_fingerprint


@pytest.mark.parametrize("bad", [(), (3,), (0, 7), (1, 2, 3), tuple(range(8))],
                         ids=["none", "one", "two-apart", "three-adjacent", "all"])
def test_bisection_finds_exactly_the_bad_items(bad):
    items = list(range(8))
    calls = []

    def failure(subset):
        calls.append(subset)
        hit = [i for i in subset if i in bad]
        return f"{hit} break it" if hit else None

    kept, dropped = bisect_failures(items, failure)
    assert kept == [i for i in items if i not in bad]
    assert sorted(dropped) == sorted(bad)
    assert all(f"[{i}]" in dropped[i] for i in bad)
    assert len(calls) <= 1 + 6 * len(bad)  # about k * log2(n) checks, not one per item


def test_items_that_only_fail_together_lose_one_of_them():
    kept, dropped = bisect_failures(["a", "b", "c"],
                                    lambda s: "pair" if {"a", "c"} <= set(s) else None)
    assert kept == ["a", "b"] and list(dropped) == [2]


def _model(x):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    return calibrate_batchnorm(model, x, seed=1).eval()


def test_reference_runs_check_another_batch_and_judge_by_scale():
    x = torch.randn(2, 3, 8, 8)
    model = _model(x)
    runs = ReferenceRuns(model, (x,), other_shapes=True)
    assert runs.shapes == ((2, 3, 8, 8), (3, 3, 8, 8), (2, 3, 4, 4))
    assert runs.compare(copy.deepcopy(model)) == (None, 0.0)
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong[0].weight.mul_(1.01)
    reason, ratio = runs.compare(wrong)
    assert ratio > 1 and "off by" in reason and "[2, 3, 8, 8]" in reason


def test_reference_runs_refuse_models_that_cannot_be_checked():
    x = torch.randn(2, 3, 8, 8)
    model = _model(x)
    with torch.no_grad():
        model[0].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteReferenceError, match=r"returns NaN .*module '0' \(Conv2d\)"):
        ReferenceRuns(model, (x,), other_shapes=False)
    with pytest.raises(InvalidInputError, match="does not run on the example inputs"):
        ReferenceRuns(_model(x), (torch.randn(2, 5, 8, 8),), other_shapes=False)


def test_fingerprint_follows_values_and_shapes():
    x = torch.randn(2, 3)
    assert inputs_fingerprint((x,)) == inputs_fingerprint((x.clone(),))
    assert inputs_fingerprint((x,)) != inputs_fingerprint((x + 1,))
    assert inputs_fingerprint((x,)) != inputs_fingerprint((x.reshape(3, 2),))
