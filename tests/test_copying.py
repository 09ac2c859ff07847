"""Tests for bnsurgery.copying: a model that cannot be deep-copied gets an actionable error."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from bnsurgery.copying import copy_model
from bnsurgery.errors import IncompatibleModuleError


class HoldsALock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.lock = threading.Lock()

    def forward(self, x):
        return self.bn(self.conv(x))


def test_copy_is_independent_of_the_original():
    model = nn.Sequential(nn.Linear(2, 2))
    copied = copy_model(model, what="test")
    with torch.no_grad():
        copied[0].weight.add_(1)
    assert not torch.equal(copied[0].weight, model[0].weight)


def test_uncopyable_model_names_the_operation_and_the_way_out():
    with pytest.raises(IncompatibleModuleError, match=r"(?s)fuse_batchnorm works on a copy.*"
                       r"HoldsALock.*TypeError: cannot pickle '_thread.lock'.*Hint: pass "
                       r"inplace=True") as info:
        copy_model(HoldsALock(), what="fuse_batchnorm")
    assert isinstance(info.value, TypeError)  # except TypeError written for deepcopy still works
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.parametrize("call", ["replace_batchnorm", "fuse_batchnorm", "export_onnx"])
def test_public_functions_raise_it_and_inplace_avoids_it(call, tmp_path):
    import bnsurgery

    model = HoldsALock().eval()
    x = torch.randn(2, 3, 8, 8)
    if call == "replace_batchnorm":
        with pytest.raises(IncompatibleModuleError, match="replace_batchnorm works on a copy"):
            bnsurgery.replace_batchnorm(model)
        replaced = bnsurgery.replace_batchnorm(model, inplace=True)
        assert type(replaced.bn).__module__.startswith("bnsurgery")
    elif call == "fuse_batchnorm":
        with pytest.raises(IncompatibleModuleError, match="works on a copy"):
            bnsurgery.fuse_batchnorm(model, x)
    else:
        pytest.importorskip("onnx")
        with pytest.raises(IncompatibleModuleError, match="export_onnx works on a copy"):
            bnsurgery.export_onnx(model, x, tmp_path / "m.onnx", fuse=False)
        assert list(tmp_path.iterdir()) == []
