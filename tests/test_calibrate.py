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
    model = _net()
    # Record what the first BatchNorm really saw, whatever data calibration chose to feed it.
    seen = []
    model[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].double()))
    bnsurgery.calibrate_batchnorm(model, x, steps=3, nudge=0.0, inplace=True)
    model.eval()
    assert len(seen) == 3 and all(batch.shape == (8, 6, 8, 8) for batch in seen)
    assert not torch.equal(seen[0], seen[1])  # fresh batches, not one batch three times
    # With no nudge, the running mean is the mean over the batches it saw and the running
    # variance the average of their unbiased per-batch variances (momentum=None is a
    # cumulative average): computed here in float64.
    expected_mean = torch.cat(seen).mean((0, 2, 3))
    torch.testing.assert_close(model[1].running_mean.double(), expected_mean, rtol=1e-5,
                               atol=1e-6)
    per_batch_var = torch.stack([batch.var((0, 2, 3)) for batch in seen])
    torch.testing.assert_close(model[1].running_var.double(), per_batch_var.mean(0), rtol=1e-4,
                               atol=1e-6)
    # The batches are standard normal like the example inputs: their conv outputs have the
    # spread a standard-normal input gives, not that of x itself scaled or shifted.
    with torch.no_grad():
        spread = model[0](torch.randn(64, 3, 10, 10)).double().std((0, 2, 3))
    torch.testing.assert_close(per_batch_var.mean(0).sqrt(), spread, rtol=0.1, atol=0.0)


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
