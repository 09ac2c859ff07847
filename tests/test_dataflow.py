"""The three dataflow builders (torch.fx, torch.export, forward hooks) see the same graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnsurgery._dataflow import build_dataflow

METHODS = ["fx", "export", "hooks"]


class _TwoCalls(nn.Module):
    """A conv used at two call sites, then a BatchNorm on a sum: registration order is bn first."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv(x * 2))


def _module_edges(flow):
    """(producer module, consumer module) pairs, following the real dataflow."""
    edges = set()
    for node in flow.nodes:
        if node.kind != "module":
            continue
        for user in node.users:
            if flow.nodes[user].kind == "module":
                edges.add((node.label, flow.nodes[user].label))
    return edges


@pytest.mark.parametrize("method", METHODS)
def test_chain(method):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    flow = build_dataflow(model.eval(), method, (torch.randn(2, 3, 8, 8),))
    assert flow.method == method
    calls = flow.module_calls()
    assert len(calls["0"]) == 1 and len(calls["1"]) == 1
    assert ("0", "1") in _module_edges(flow)
    bn_node = calls["1"][0]
    assert [flow.nodes[u].kind for u in flow.nodes[calls["0"][0].index].users] == ["module"]
    assert bn_node.inputs == [calls["0"][0].index]


@pytest.mark.parametrize("method", METHODS)
def test_conv_used_twice_is_seen_twice(method):
    flow = build_dataflow(_TwoCalls().eval(), method, (torch.randn(1, 4, 5, 5),))
    calls = flow.module_calls()
    assert len(calls["conv"]) == 2
    # The BatchNorm reads the sum, not either conv call directly.
    (bn,) = calls["bn"]
    assert all(flow.nodes[i].kind != "module" for i in bn.inputs)


def test_model_is_not_modified():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in METHODS:
        build_dataflow(model, method, (torch.randn(2, 3, 8, 8),))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
