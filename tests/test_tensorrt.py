"""Tests for bnsurgery.tensorrt: clear guards without CUDA/torch-tensorrt, real checks with them."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from bnsurgery.calibrate import calibrate_batchnorm
from bnsurgery.errors import InvalidInputError, MissingDependencyError
from bnsurgery.tensorrt import (
    export_tensorrt,
    save_path_for,
    tensorrt_unavailable_reason,
    validate_tensorrt,
)


def _tiny() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return calibrate_batchnorm(model, torch.randn(4, 3, 16, 16)).eval()


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def cuda_without_tensorrt(monkeypatch):
    """CUDA reported present, torch_tensorrt impossible to import."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # makes `import` raise ImportError


@pytest.mark.parametrize(
    ("setup", "reason"),
    [pytest.param("no_cuda", "no CUDA", id="no-cuda"),
     pytest.param("cuda_without_tensorrt", "torch-tensorrt not installed",
                  id="no-torch-tensorrt")],
)
def test_guards(request, setup, reason):
    request.getfixturevalue(setup)
    assert tensorrt_unavailable_reason() == reason
    model, x = _tiny(), torch.randn(2, 3, 16, 16)

    with pytest.raises(MissingDependencyError,
                       match=rf"(?s){reason}.*pip install 'bnsurgery\[gpu\]'"):
        export_tensorrt(model, x)

    report = validate_tensorrt(model, x, precision="fp16")
    assert report.skipped == reason
    assert report.passed is False  # never a silent pass
    assert report.status == f"skipped: {reason}"
    assert f"skipped: {reason}" in str(report)
    assert report.to_dict()["status"] == f"skipped: {reason}"
    assert any("bnsurgery[gpu]" in note for note in report.notes)


def test_option_errors_come_first(no_cuda):
    with pytest.raises(InvalidInputError, match="Unknown TensorRT precision"):
        export_tensorrt(_tiny(), torch.randn(2, 3, 16, 16), precision="int8")
    with pytest.raises(InvalidInputError, match="Unknown TensorRT precision"):
        validate_tensorrt(_tiny(), torch.randn(2, 3, 16, 16), precision="fp64")
    with pytest.raises(InvalidInputError, match="eval mode"):
        validate_tensorrt(_tiny().train(), torch.randn(2, 3, 16, 16))


def test_save_path_next_to_the_onnx_file(tmp_path):
    assert save_path_for(tmp_path / "model.onnx", "fp16") == tmp_path / "model.trt-fp16.ep"


requires_tensorrt = pytest.mark.skipif(tensorrt_unavailable_reason() is not None,
                                       reason=f"TensorRT unavailable: "
                                              f"{tensorrt_unavailable_reason()}")


@pytest.mark.tensorrt
@pytest.mark.gpu
@requires_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_matches_the_original(precision, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    model = calibrate_batchnorm(model, torch.randn(4, 3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / f"resnet18.trt-{precision}.ep"
    compiled = export_tensorrt(model, x, precision=precision, path=path)
    assert path.is_file()
    report = validate_tensorrt(model, x, precision=precision, compiled=compiled)
    assert report.passed, str(report)
    assert report.details["require_full_compilation"] is True
    assert report.environment["gpu_name"]
