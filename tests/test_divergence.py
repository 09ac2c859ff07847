"""Tests for bnsurgery.divergence: naming the first diverging module, in PyTorch and in ONNX."""

from __future__ import annotations

import copy

import pytest
import torch

from bnsurgery.divergence import layer_errors, onnx_module_outputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------ PyTorch module boundaries

def test_layer_errors_only_in_the_last_layer(resnet18, inputs):
    changed = copy.deepcopy(resnet18)
    with torch.no_grad():
        changed.fc.bias.add_(1.0)
    result = layer_errors(resnet18, changed, inputs, output_failed=True)
    assert not any(layer.diverged for layer in result.layers)
    assert result.first_divergence == "output"
    assert result.suspects == ("fc",)


# ------------------------------------------------------------------------ ONNX module boundaries

def test_onnx_module_outputs_map_module_boundaries(resnet18_onnx):
    proto = onnx.load(str(resnet18_onnx))
    outputs = onnx_module_outputs(proto)
    assert len(outputs["layer1.0.relu"]) == 2  # BasicBlock calls its ReLU twice
    assert len(outputs["layer1.0"]) == 1
    assert outputs["fc"] == [proto.graph.output[0].name]
