"""The exact-type registry of BatchNorm-like classes that folding understands."""

from __future__ import annotations

import pytest
from torch import nn

import bnsurgery
from bnsurgery._bn_registry import batchnorm_kind, looks_like_batchnorm, static_skip_reason

timm = pytest.importorskip("timm")


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_exact_types_only():
    assert batchnorm_kind(nn.BatchNorm2d(3)).keeps == ()
    assert batchnorm_kind(bnsurgery.BatchNorm2d(3)) is not None
    act = batchnorm_kind(timm.layers.BatchNormAct2d(3))
    assert act is not None and act.keeps == ("drop", "act")  # the activation survives folding
    assert batchnorm_kind(_OwnForward(3)) is None
    assert looks_like_batchnorm(_OwnForward(3))
    assert not looks_like_batchnorm(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize(("module", "match"), [
    (_OwnForward(3).eval(), "not one bnsurgery knows"),
    (nn.BatchNorm2d(3).train(), "training mode"),
    (nn.BatchNorm2d(3, track_running_stats=False).eval(), "no running statistics"),
], ids=["subclass", "training", "no-stats"])
def test_skip_reasons(module, match):
    assert match in static_skip_reason(module)


def test_bad_statistics_and_hooks_are_reasons():
    bn = nn.BatchNorm2d(3).eval()
    assert static_skip_reason(bn) is None
    bn.running_var[0] = -1.0
    assert "not positive" in static_skip_reason(bn)
    bn = nn.BatchNorm2d(3).eval()
    bn.register_forward_hook(lambda *args: None)
    assert "forward hooks" in static_skip_reason(bn)
