"""Tests of locating non-finite values (bnsurgery.finite) and of the CLI exit code for them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnsurgery.errors import NonFiniteReferenceError
from bnsurgery.finite import first_non_finite, require_finite_reference
from bnsurgery.validate import compare_models, flatten_outputs


def _model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model.eval()
    with torch.no_grad():
        model[1].running_var[1] = 0.0
        model[1].eps = 0.0  # a zero variance with no epsilon: the BatchNorm divides by zero
    return model


def test_first_non_finite_names_the_layer_not_what_follows():
    x = torch.randn(2, 3, 4, 4)
    assert first_non_finite(_model(), (x,)) == "module '1' (BatchNorm2d)"
    assert first_non_finite(_model(), (x * float("inf"),)) == "the model inputs"
    assert first_non_finite(nn.Identity(), (x,)) is None


def test_compare_models_reports_a_non_finite_reference_as_bad_input():
    x = torch.randn(2, 3, 4, 4)
    model = _model()
    with pytest.raises(NonFiniteReferenceError, match=r"The reference is not finite.*"
                                                      r"module '1' \(BatchNorm2d\)"):
        compare_models(model, copy.deepcopy(model), x)
    assert isinstance(NonFiniteReferenceError("x"), ValueError)  # the CLI maps it to exit 2


def test_finite_outputs_pass():
    x = torch.randn(2, 3, 4, 4)
    model = nn.Conv2d(3, 2, 1).eval()
    require_finite_reference(model, (x,), flatten_outputs(model(x)))
