"""Tiny ONNX graphs built with onnx.helper, for the ONNX-file-only commands' tests.

Weights are random and every BatchNormalization node gets random statistics and affine
parameters (a positive variance away from zero): default statistics would make a fold an
identity and hide a wrong one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto


class Graph:
    """Nodes and initializers of one graph under construction (random, seeded)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.initializers: list = []

    def constant(self, name: str, *shape: int, positive: bool = False,
                 dtype=np.float32) -> str:
        values = self.rng.standard_normal(shape)
        if positive:
            values = np.abs(values) + 0.5
        self.initializers.append(numpy_helper.from_array(values.astype(dtype), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def batchnorm(self, name: str, source: str, channels: int, *, output: str | None = None,
                  dtype=np.float32, **attrs) -> str:
        params = [self.constant(f"{name}.scale", channels, dtype=dtype),
                  self.constant(f"{name}.bias", channels, dtype=dtype),
                  self.constant(f"{name}.mean", channels, dtype=dtype),
                  self.constant(f"{name}.var", channels, positive=True, dtype=dtype)]
        return self.node("BatchNormalization", [source, *params], [output or f"{name}.out"],
                         name, epsilon=1e-3, **attrs)

    def model(self, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int, list]],
              opset: int = 18):
        graph = helper.make_graph(
            self.nodes, "tiny",
            [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
            [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def conv_net(seed: int = 0, *, scale_channel: float | None = None):
    """x(N,3,8,8) -> Conv(4) -> BatchNorm -> Relu -> Flatten -> Gemm(5) -> y.

    ``scale_channel`` multiplies the convolution's first output channel, for a file that
    differs from the ``seed``'s in one known place.
    """
    g = Graph(seed)
    weight = g.constant("conv.weight", 4, 3, 3, 3)
    if scale_channel is not None:
        array = numpy_helper.to_array(g.initializers[-1]).copy()
        array[0] *= scale_channel
        g.initializers[-1] = numpy_helper.from_array(array, weight)
    conv = g.node("Conv", ["x", weight, g.constant("conv.bias", 4)], ["conv.out"], "conv",
                  pads=[1, 1, 1, 1])
    bn = g.batchnorm("bn", conv, 4)
    relu = g.node("Relu", [bn], ["relu.out"], "relu")
    flat = g.node("Flatten", [relu], ["flat.out"], "flatten")
    g.node("Gemm", [flat, g.constant("fc.weight", 5, 256), g.constant("fc.bias", 5)], ["y"],
           "fc", transB=1)
    return g.model([("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                   [("y", TensorProto.FLOAT, ["N", 5])])


def save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
