"""calibrate_batchnorm: realistic BatchNorm state for random networks, measured, not invented."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnsurgery
from bnsurgery.errors import InvalidInputError


def _net():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1),
                         nn.BatchNorm2d(4, momentum=None))


def test_running_stats_are_measured_in_train_mode():
    x = torch.randn(8, 3, 10, 10)
    model = bnsurgery.calibrate_batchnorm(_net(), x, steps=3, nudge=0.0).eval()
    # With no nudge, the first layer's running mean is the mean of its inputs over the random
    # batches: check against a direct float64 computation of the same batches.
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(x.shape, generator=gen) for _ in range(3)]
    with torch.no_grad():
        feats = torch.cat([model[0](b) for b in batches]).double()
    expected_mean = feats.mean((0, 2, 3))
    torch.testing.assert_close(model[1].running_mean.double(), expected_mean, rtol=1e-5,
                               atol=1e-6)
    per_batch_var = torch.stack([model[0](b).double().var((0, 2, 3)) for b in batches])
    torch.testing.assert_close(model[1].running_var.double(), per_batch_var.mean(0), rtol=1e-4,
                               atol=1e-6)


def test_nudge_moves_statistics_and_affine_is_random():
    x = torch.randn(8, 3, 10, 10)
    net = _net()
    plain = bnsurgery.calibrate_batchnorm(net, x, nudge=0.0)
    nudged = bnsurgery.calibrate_batchnorm(net, x, nudge=0.05)
    assert not torch.equal(plain[1].running_mean, nudged[1].running_mean)
    ratio = nudged[1].running_var / plain[1].running_var
    assert ((ratio >= 0.95 - 1e-6) & (ratio <= 1.05 + 1e-6)).all()
    assert not torch.equal(nudged[1].weight, torch.ones(6))
    assert nudged[1].weight.min() >= 0.5 and nudged[1].weight.max() <= 1.5


def test_caller_model_flags_and_momentum_are_kept():
    model = _net().train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrated = bnsurgery.calibrate_batchnorm(model, torch.randn(4, 3, 8, 8))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [m.training for m in calibrated.modules()] == [m.training for m in model.modules()]
    assert calibrated[4].momentum is None and calibrated[1].momentum == 0.1


def test_deterministic_for_a_seed():
    x = torch.randn(4, 3, 8, 8)
    net = _net()
    a = bnsurgery.calibrate_batchnorm(net, x, seed=3)
    b = bnsurgery.calibrate_batchnorm(net, x, seed=3)
    c = bnsurgery.calibrate_batchnorm(net, x, seed=4)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), key
    assert not torch.equal(a[1].running_mean, c[1].running_mean)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(steps=0), r"at least one batch.*Got 0"),
    (dict(nudge=-0.1), r"nudge must be non-negative.*Got -0.1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        bnsurgery.calibrate_batchnorm(_net(), torch.randn(2, 3, 8, 8), **kwargs)
