"""Tests for bnsurgery.validate: PyTorch and onnxruntime comparisons that are not rubber stamps."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from tiny_models import TinyNet
from torch import nn

from bnsurgery.calibrate import calibrate_batchnorm
from bnsurgery.comparison import TOLERANCES
from bnsurgery.errors import IncompatibleModuleError, InvalidInputError
from bnsurgery.validate import compare_models, validate_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _scale_one_conv(model: nn.Module, name: str = "layer2.0.conv1", factor: float = 1.05
                    ) -> nn.Module:
    """A copy whose one convolution's weight is scaled: a bug a validator must catch."""
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.get_submodule(name).weight.mul_(factor)
    return changed


# ------------------------------------------------------------------------ PyTorch vs PyTorch

def test_compare_models_fused_passes_and_is_as_accurate_as_float32(resnet18, inputs):
    from bnsurgery.fuse import fuse_batchnorm

    fused = fuse_batchnorm(resnet18, inputs)
    report = compare_models(resnet18, fused, inputs, per_layer=True)
    assert report.passed, str(report)
    assert report.tolerance.label == "fp32"
    (output,) = report.outputs
    # The fused float32 model is about as far from a float64 run as the original float32 run.
    assert output.float64_error <= 2 * output.reference_float64_error + 1e-6 * output.scale
    assert report.layers and not any(layer.diverged for layer in report.layers)
    assert report.first_divergence is None


def test_compare_models_catches_one_conv_scaled_by_5_percent(resnet18, inputs):
    report = compare_models(resnet18, _scale_one_conv(resnet18), inputs)
    assert not report.passed
    assert report.outputs[0].max_rel_error > 100 * report.tolerance.rtol
    # The hooks name where it starts: the ReLU right after the changed conv and its BatchNorm.
    assert report.first_divergence == "layer2.0.relu"
    assert report.divergence_suspects == ("layer2.0.conv1", "layer2.0.bn1")
    assert "first diverging module: layer2.0.relu" in str(report)


@pytest.mark.parametrize(
    ("dtype", "label"),
    [pytest.param(torch.float16, "fp16", id="fp16"),
     pytest.param(torch.bfloat16, "bf16", id="bf16")],
)
def test_compare_models_half_precision_candidates(resnet18, inputs, dtype, label):
    candidate = copy.deepcopy(resnet18).to(dtype)
    report = compare_models(resnet18, candidate, inputs)
    assert report.tolerance.label == label
    assert report.passed, str(report)
    # The same numbers fail the float32 tolerance: the dtype's own tolerance is what passes them.
    strict = compare_models(resnet18, candidate, inputs, rtol=TOLERANCES["fp32"].rtol,
                            atol=TOLERANCES["fp32"].atol, per_layer=False,
                            float64_baseline=False)
    assert not strict.passed
    # Neither model was changed by the comparison.
    assert next(candidate.parameters()).dtype == dtype
    assert next(resnet18.parameters()).dtype == torch.float32


def test_compare_models_refuses_training_mode_and_non_modules(resnet18, inputs):
    training = copy.deepcopy(resnet18).train()
    with pytest.raises(InvalidInputError, match="eval mode"):
        compare_models(resnet18, training, inputs)
    with pytest.raises(IncompatibleModuleError, match="nn.Module"):
        compare_models(resnet18, resnet18.state_dict(), inputs)
    with pytest.raises(InvalidInputError, match="tensor"):
        compare_models(resnet18, resnet18, [1, 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compare_models_on_cuda_with_tf32_off(resnet18, inputs):
    from bnsurgery.fuse import fuse_batchnorm

    torch.backends.cudnn.allow_tf32 = True
    fused = fuse_batchnorm(resnet18, inputs)
    report = compare_models(resnet18, fused, inputs, device="cuda")
    assert report.passed, str(report)
    assert report.details["tf32_used"] is False
    assert torch.backends.cudnn.allow_tf32 is True  # the caller's setting is restored
    assert report.environment["gpu_name"]
    assert next(resnet18.parameters()).device.type == "cpu"  # not moved in place


# ------------------------------------------------------------------------ PyTorch vs onnxruntime

def test_validate_onnx_passes_with_sweep_and_float64_accuracy(resnet18, resnet18_onnx, inputs):
    report = validate_onnx(resnet18, resnet18_onnx, inputs, providers="cpu")
    assert report.passed, str(report)
    assert report.details["batch_sizes"] == [1, 2, 5]
    assert sorted({o.batch for o in report.outputs}) == [1, 2, 5]
    assert report.details["providers_used"][0] == "CPUExecutionProvider"
    assert report.details["opset"] == 18
    assert report.details["exporter"] == "torch.onnx.export(dynamo=True)"
    for output in report.outputs:
        # onnxruntime is as accurate as PyTorch's own float32 run, judged against float64.
        assert output.float64_error <= 2 * output.reference_float64_error + 1e-6 * output.scale
        assert output.top1_agreement == 1.0


def test_validate_onnx_fails_when_one_conv_is_scaled_by_5_percent(resnet18, resnet18_onnx,
                                                                  inputs):
    digest = hashlib.sha256(resnet18_onnx.read_bytes()).hexdigest()
    report = validate_onnx(_scale_one_conv(resnet18), resnet18_onnx, inputs, providers="cpu")
    assert not report.passed
    assert report.status == "FAILED"
    assert all(not o.passed for o in report.outputs)
    # The debug copy of the file pins the divergence to the changed block.
    assert report.first_divergence == "layer2.0.relu"
    assert "layer2.0.conv1" in report.divergence_suspects
    assert any("debug copy" in note for note in report.notes)
    # The debug copy lives elsewhere: the file under test is byte for byte what it was.
    assert hashlib.sha256(resnet18_onnx.read_bytes()).hexdigest() == digest


def test_validate_onnx_detects_a_silent_provider_fallback(resnet18, resnet18_onnx, inputs,
                                                         monkeypatch):
    import bnsurgery.ort_session as ort_session

    real_session = ort_session.create_session

    class FellBack:
        """A session that, like onnxruntime without working CUDA libraries, used the CPU."""

        def __init__(self, path, providers):
            self._session = real_session(path, ["CPUExecutionProvider"])

        def get_providers(self):
            return ["CPUExecutionProvider"]

        def __getattr__(self, name):
            return getattr(self._session, name)

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort_session, "create_session", FellBack)
    report = validate_onnx(resnet18, resnet18_onnx, inputs, providers="cuda,cpu",
                           per_layer=False, float64_baseline=False, batch_sizes=[2])
    assert not report.passed
    assert any("CUDAExecutionProvider was requested" in f for f in report.failures)
    assert all(o.passed for o in report.outputs)  # the numbers alone would have passed


def test_validate_onnx_input_errors(resnet18, resnet18_onnx, inputs, tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        validate_onnx(resnet18, tmp_path / "missing.onnx", inputs)
    with pytest.raises(InvalidInputError, match="number of inputs"):
        validate_onnx(resnet18, resnet18_onnx, (inputs, inputs), providers="cpu")
    with pytest.raises(InvalidInputError, match="eval mode"):
        validate_onnx(copy.deepcopy(resnet18).train(), resnet18_onnx, inputs)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(InvalidInputError, match="could not load the ONNX file"):
        validate_onnx(resnet18, broken, inputs, providers="cpu")


def test_static_batch_and_legacy_file_are_reported(tmp_path):
    from bnsurgery.onnx_export import export_onnx

    x = torch.randn(2, 3, 8, 8)
    model = calibrate_batchnorm(TinyNet().eval(), x).eval()
    path = export_onnx(model, x, tmp_path / "tiny.onnx", fuse=False, dynamic_batch=False,
                       exporter="legacy", opset=17)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.conv.weight.mul_(1.05)
    report = validate_onnx(changed, path, x, providers="cpu")
    assert not report.passed
    assert report.details["batch_sizes"] == [2]
    assert report.details["exporter"].startswith("torch.onnx.export(dynamo=False)")
    assert any("static" in note for note in report.notes)
    assert any("no module-scope metadata" in note for note in report.notes)
    with pytest.raises(InvalidInputError, match="static batch"):
        validate_onnx(model, path, torch.randn(3, 3, 8, 8), providers="cpu")
