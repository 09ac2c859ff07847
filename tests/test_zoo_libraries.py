"""Real model code from the libraries users bring, folded and judged against a float64 run.

One small model per structural family: timm pre-activation nets (norm+act layers before convs,
DenseNet concatenations, ResNetV2), timm LeViT (a forward that caches tensors on ``self``),
transformers vision models built from their configs (a conv subclass that only changes
``__init__``), ultralytics YOLO and RT-DETR from their yaml (Python control flow, a Detect head
that caches shapes, ``for m in self.model[:-1]``), segmentation-models-pytorch and torchvision
detection. Weights are random and BatchNorm state calibrated (bnsurgery.calibrate), configs tiny
and inputs small, so each model takes a few seconds. The packages are in the ``dev`` extra; a
missing one skips its models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bnsurgery._bn_registry import looks_like_batchnorm
from bnsurgery.calibrate import calibrate_batchnorm
from bnsurgery.fuse import fuse_batchnorm, plan_fusion


@dataclass(frozen=True)
class ZooModel:
    name: str
    requires: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    min_folded: float  # the share of BatchNorms that must fold (a floor, not the exact count)


def _timm_densenet() -> nn.Module:
    from timm.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_classes=10, bn_size=2)


def _timm_resnetv2() -> nn.Module:
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1], channels=(16, 32), stem_chs=8, num_classes=10,
                    conv_layer=create_conv2d, norm_layer=BatchNormAct2d)


def _timm_levit() -> nn.Module:
    import timm

    return timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=10)


def _hf_efficientnet() -> nn.Module:
    from transformers import EfficientNetConfig, EfficientNetModel

    config = EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.2,
                                hidden_dim=320)
    return _Tensors(EfficientNetModel(config))


def _hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="bottleneck")
    return _Tensors(ResNetModel(config))


class _Tensors(nn.Module):
    """Hugging Face models return a ModelOutput; keep its tensors (a tuple)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).to_tuple()


def _yolo() -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", nc=3, verbose=False)


def _rtdetr() -> nn.Module:
    from ultralytics.nn.tasks import RTDETRDetectionModel

    return RTDETRDetectionModel("rtdetr-l.yaml", nc=3, verbose=False)


def _smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=2, encoder_depth=3,
                    decoder_channels=(32, 16, 8))


def _tv_fasterrcnn() -> nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                 num_classes=3, min_size=64, max_size=64)


ZOO = [
    ZooModel("timm_densenet", "timm", _timm_densenet, (2, 3, 32, 32), 0.3),
    ZooModel("timm_resnetv2_preact", "timm", _timm_resnetv2, (2, 3, 32, 32), 0.3),
    ZooModel("timm_levit", "timm", _timm_levit, (2, 3, 64, 64), 0.05),
    ZooModel("hf_efficientnet", "transformers", _hf_efficientnet, (2, 3, 32, 32), 0.9),
    ZooModel("hf_resnet", "transformers", _hf_resnet, (2, 3, 32, 32), 0.9),
    ZooModel("ultralytics_yolov8n", "ultralytics", _yolo, (2, 3, 64, 64), 0.9),
    ZooModel("ultralytics_rtdetr", "ultralytics", _rtdetr, (2, 3, 64, 64), 0.9),
    ZooModel("smp_unet", "segmentation_models_pytorch", _smp_unet, (2, 3, 32, 32), 0.6),
    ZooModel("torchvision_fasterrcnn", "torchvision", _tv_fasterrcnn, (1, 3, 64, 64), 0.9),
]


def _tensors(output: object) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def _run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.double() for t in _tensors(copy.deepcopy(model)(x.to(_dtype(model))))]


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# RT-DETR takes the longest of the zoo: `make test-fast` skips it, `make test` runs it.
@pytest.mark.parametrize("entry", [
    pytest.param(z, id=z.name, marks=[pytest.mark.slow] if z.name == "ultralytics_rtdetr" else [])
    for z in ZOO])
def test_library_model_fuses_as_accurately_as_the_original(entry):
    pytest.importorskip(entry.requires)
    torch.manual_seed(0)
    x = torch.randn(entry.shape, generator=torch.Generator().manual_seed(1))
    calibration = torch.cat([x, x]) if x.shape[0] == 1 else x
    model = calibrate_batchnorm(entry.build().eval(), calibration, seed=2).eval()
    before = _state(model)
    plan = plan_fusion(model, x)
    fused = fuse_batchnorm(model, x, plan=plan)
    for key, value in _state(model).items():  # the caller's model is untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    for module in model.modules():  # LeViT's bias cache holds no fx Proxy (nor anything new)
        assert not getattr(module, "attention_bias_cache", {}), type(module).__name__
    total = sum(1 for name, m in model.named_modules() if name and looks_like_batchnorm(m))
    assert len(plan.folded) + len(plan.skipped) == total
    assert len(plan.folded) >= entry.min_folded * total, str(plan)
    assert plan.check.passed, str(plan)

    oracle = _run(copy.deepcopy(model).double(), x.double())
    original, candidate = _run(model, x), _run(fused, x)
    assert len(oracle) == len(original) == len(candidate)
    for exact, ours, theirs in zip(oracle, candidate, original, strict=True):
        scale = exact.abs().max().item() or 1.0
        err_original = (theirs - exact).abs().max().item()
        err_fused = (ours - exact).abs().max().item()
        # Folding rounds differently (a depthwise conv scaled by a large factor loses a few
        # bits), so allow 3x the original's own error or 1e-5 of the scale; one layer a few
        # percent off moves these outputs by 1e-2 of their scale or more.
        assert err_fused <= max(3 * err_original, 1e-5 * scale), (err_fused, err_original, scale)


@pytest.mark.slow
def test_yolo_that_already_ran_gets_the_cached_shape_hint(tmp_path):
    pytest.importorskip("ultralytics")
    from bnsurgery.errors import ExportError
    from bnsurgery.onnx_export import export_onnx

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = calibrate_batchnorm(_yolo().eval(), x, seed=2).eval()
    model.model[-1].shape = None  # as built or loaded: calibrating ran forwards
    fresh = export_onnx(copy.deepcopy(model), x, tmp_path / "fresh.onnx")
    assert fresh.is_file()  # a model that never ran exports with a dynamic batch
    with torch.no_grad():
        model(x)  # its Detect head now caches the input shape
    with pytest.raises(ExportError, match=r"holds an input shape cached by an earlier forward"):
        export_onnx(model, x, tmp_path / "ran.onnx")
    assert not (tmp_path / "ran.onnx").exists()
