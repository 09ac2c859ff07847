"""Backend selection: which BatchNorm kernel runs, forcing one, and graph capture."""

from __future__ import annotations

import pytest
import torch

from bnsurgery import kernel_tensor, kernels
from bnsurgery.errors import InvalidInputError
from bnsurgery.functional import batch_norm


def test_reference_is_always_available(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    info = kernels.kernel_info("cpu")
    assert (info.backend, info.device) == ("reference", "cpu")
    assert "forced" in info.reason
    assert kernels.select_backend(torch.zeros(2, 3)) is kernel_tensor


def test_unknown_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "fastest")
    with pytest.raises(InvalidInputError, match=r"BNSURGERY_KERNEL.*'fastest'"):
        kernels.kernel_info()
    with pytest.raises(InvalidInputError, match="BNSURGERY_KERNEL"):
        batch_norm(torch.randn(4, 3), None, None, training=True)


def test_auto_reports_why_others_do_not_run(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    info = kernels.kernel_info("cpu")
    assert info.backend in kernels.BACKENDS
    assert set(info.unavailable) <= set(kernels.BACKENDS) - {info.backend}
    assert all(isinstance(why, str) and why for why in info.unavailable.values())
    assert info.to_dict()["backend"] == info.backend


def test_graph_capture_uses_the_reference_backend(monkeypatch):
    """torch.export records ordinary aten operators, computed by the reference backend."""
    import bnsurgery

    calls = []
    real = kernel_tensor.forward

    def spy(x, *args):
        calls.append(type(x).__name__)
        return real(x, *args)

    monkeypatch.setattr(kernel_tensor, "forward", spy)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bnsurgery.BatchNorm2d(4)).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 5, 5),))
    namespaces = {node.target.namespace for node in program.graph.nodes
                  if node.op == "call_function" and hasattr(node.target, "namespace")}
    assert namespaces == {"aten"}
    assert calls and all(name != "Tensor" for name in calls)  # fake tensors, during capture
