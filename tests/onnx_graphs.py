"""Tiny ONNX graphs built with onnx.helper, for the ONNX-file-only commands' tests.

Weights are random and every BatchNormalization node gets random statistics and affine
parameters (a positive variance away from zero): default statistics would make a fold an
identity and hide a wrong one.

``BUILDERS`` names every graph here, one per folding rule (and the cases around it), for the
tests that must hold over all of them: ``inspect`` and ``fuse`` agree on what folds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto
FLOAT = TensorProto.FLOAT


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


def conv_graph(op: str = "Conv", *, group: int = 1, bias: bool = True, channels_out: int = 4):
    """x(N,4,5,5) -> Conv or ConvTranspose (``group``, with or without a bias) -> BatchNorm -> y."""
    g = Graph(1)
    if op == "Conv":
        weight = g.constant("w", channels_out, 4 // group, 3, 3)
    else:  # ConvTranspose: (in, out / group, k, k)
        weight = g.constant("w", 4, channels_out // group, 3, 3)
    inputs = ["x", weight] + ([g.constant("b", channels_out)] if bias else [])
    layer = g.node(op, inputs, ["layer.out"], "layer", group=group, pads=[1, 1, 1, 1])
    g.batchnorm("bn", layer, channels_out, output="y")
    return g.model([("x", FLOAT, ["N", 4, 5, 5])], [("y", FLOAT, ["N", channels_out, 5, 5])])


def gemm_graph(*, trans_b: int, c_shape: tuple[int, ...] | None, alpha: float = 0.7,
               beta: float = 0.3, trans_a: int = 0):
    """x -> Gemm(6 -> 5; ``transA``, ``transB``, a ``C`` of ``c_shape`` or none) -> BatchNorm."""
    g = Graph(2)
    weight = g.constant("w", 5, 6) if trans_b else g.constant("w", 6, 5)
    inputs = ["x", weight] + ([g.constant("c", *c_shape)] if c_shape else [])
    fc = g.node("Gemm", inputs, ["fc.out"], "fc", transA=trans_a, transB=trans_b, alpha=alpha,
                beta=beta)
    g.batchnorm("bn", fc, 5, output="y")
    shape = [6, "N"] if trans_a else ["N", 6]
    return g.model([("x", FLOAT, shape)], [("y", FLOAT, ["N", 5])])


def _square(g: Graph, *, inputs=(), outputs=()):
    """The model of ``g`` with x and y of shape (N, 4, 3, 3), plus ``inputs``/``outputs``."""
    return g.model([("x", FLOAT, ["N", 4, 3, 3]), *inputs],
                   [("y", FLOAT, ["N", 4, 3, 3]), *outputs])


def batchnorm_chain(*, named: bool = True):
    """Conv -> bn1 -> bn2: the second folds once the first has (``named=False``: an unnamed
    Conv, named after its output, which the first fold renames)."""
    g = Graph(3)
    conv = g.node("Conv", ["x", g.constant("w", 4, 4, 1, 1)], ["conv.out"],
                  "conv" if named else "")
    first = g.batchnorm("bn1", conv, 4)
    g.batchnorm("bn2", first, 4, output="y")
    return _square(g)


def identity_parameters():
    """BatchNorm parameters behind Identity nodes, as the legacy exporter shares equal tensors."""
    g = Graph(9)
    ones = g.constant("shared", 4, positive=True)
    conv = g.node("Conv", ["x", g.constant("w", 4, 4, 1, 1)], ["conv.out"], "conv")
    g.node("Identity", [ones], ["bn.var"], "copy_var")
    g.node("Identity", [ones], ["bn.scale"], "copy_scale")
    g.nodes.append(helper.make_node(
        "BatchNormalization", [conv, "bn.scale", g.constant("bn.bias", 4),
                               g.constant("bn.mean", 4), "bn.var"], ["y"], name="bn"))
    return _square(g)


def shared_weights():
    """Two Convs read one weight; a BatchNorm after one of them."""
    g = Graph(4)
    weight = g.constant("w", 4, 4, 1, 1)
    a = g.node("Conv", ["x", weight], ["a"], "conv_a")
    b = g.node("Conv", ["x", weight], ["b"], "conv_b")
    bn = g.batchnorm("bn", a, 4)
    g.node("Add", [bn, b], ["y"], "add")
    return _square(g)


def two_consumers():
    """The Conv's output feeds the BatchNorm and an Add."""
    g = Graph(5)
    conv = g.node("Conv", ["x", g.constant("w", 4, 4, 1, 1)], ["conv.out"], "conv")
    bn = g.batchnorm("bn", conv, 4)
    g.node("Add", [bn, conv], ["y"], "add")
    return _square(g)


def producer_output_is_a_graph_output():
    g = Graph(5)
    conv = g.node("Conv", ["x", g.constant("w", 4, 4, 1, 1)], ["conv.out"], "conv")
    g.batchnorm("bn", conv, 4, output="y")
    return _square(g, outputs=[("conv.out", FLOAT, ["N", 4, 3, 3])])


def training_batchnorm():
    """A BatchNormalization that outputs its running statistics."""
    g = Graph(6)
    conv = g.node("Conv", ["x", g.constant("w", 4, 4, 1, 1)], ["conv.out"], "conv")
    g.nodes.append(helper.make_node(
        "BatchNormalization", [conv, *(g.constant(f"bn.{p}", 4, positive=True)
                                       for p in ("scale", "bias", "mean", "var"))],
        ["y", "running_mean", "running_var"], name="bn", training_mode=1))
    return _square(g)


def computed_weight(which: str = "weight"):
    """The Conv's weight (or bias) is the output of an Identity node, not an initializer."""
    g = Graph(7)
    weight, bias = g.constant("w0", 4, 4, 1, 1), g.constant("b0", 4)
    if which == "weight":
        weight = g.node("Identity", [weight], ["w"], "copy")
    else:
        bias = g.node("Identity", [bias], ["b"], "copy")
    conv = g.node("Conv", ["x", weight, bias], ["conv.out"], "conv")
    g.batchnorm("bn", conv, 4, output="y")
    return _square(g)


def weight_is_a_graph_input(which: str = "w"):
    """An initializer that is also a graph input (``w``: the Conv's weight; ``bn.mean``: a
    BatchNorm statistic): a caller may override it."""
    g = Graph(7)
    conv = g.node("Conv", ["x", g.constant("w", 4, 4, 1, 1)], ["conv.out"], "conv")
    g.batchnorm("bn", conv, 4, output="y")
    shape = [4, 4, 1, 1] if which == "w" else [4]
    return _square(g, inputs=[(which, FLOAT, shape)])


def other_producers():
    """A BatchNorm after a Relu and one reading a graph input."""
    g = Graph(8)
    relu = g.node("Relu", ["x"], ["relu.out"], "relu")
    first = g.batchnorm("bn1", relu, 4)
    g.batchnorm("bn0", "x", 4, output="x2")
    g.node("Add", [first, "x2"], ["y"], "add")
    return _square(g)


def float16_conv():
    g = Graph(10)
    conv = g.node("Conv", ["x", g.constant("w", 4, 4, 3, 3, dtype=np.float16),
                           g.constant("b", 4, dtype=np.float16)], ["conv.out"], "conv",
                  pads=[1, 1, 1, 1])
    g.batchnorm("bn", conv, 4, output="y", dtype=np.float16)
    return g.model([("x", TensorProto.FLOAT16, ["N", 4, 5, 5])],
                   [("y", TensorProto.FLOAT16, ["N", 4, 5, 5])])


def mixed_net():
    """Several verdicts in one graph: a Gemm with transB whose weight a second Gemm shares, a
    grouped ConvTranspose that folds, a BatchNorm after a MaxPool, a chain after a Conv."""
    g = Graph(11)
    up = g.node("ConvTranspose", ["x", g.constant("up.w", 4, 3, 2, 2)], ["up.out"], "up",
                group=2, strides=[2, 2])  # 4 -> 6 channels, 3 -> 6 pixels
    up_bn = g.batchnorm("up_bn", up, 6)
    pool = g.node("MaxPool", [up_bn], ["pool.out"], "pool", kernel_shape=[2, 2],
                  strides=[2, 2])
    pool_bn = g.batchnorm("pool_bn", pool, 6)
    conv = g.node("Conv", [pool_bn, g.constant("conv.w", 5, 6, 1, 1)], ["conv.out"], "conv")
    chain = g.batchnorm("chain_bn2", g.batchnorm("chain_bn1", conv, 5), 5)
    flat = g.node("Flatten", [chain], ["flat.out"], "flatten")
    weight = g.constant("fc.w", 7, 45)
    fc = g.node("Gemm", [flat, weight], ["fc.out"], "fc", transB=1)
    fc_bn = g.batchnorm("fc_bn", fc, 7)
    twin = g.node("Gemm", [flat, weight], ["twin.out"], "twin", transB=1)
    g.node("Add", [fc_bn, twin], ["y"], "add")
    return g.model([("x", FLOAT, ["N", 4, 3, 3])], [("y", FLOAT, ["N", 7])])


#: Every graph builder of this file, by a readable id, with its arguments bound.
BUILDERS: dict[str, Callable[[], object]] = {
    "conv_net": conv_net,
    "conv": conv_graph,
    "conv-no-bias": partial(conv_graph, bias=False, channels_out=6),
    "conv-depthwise": partial(conv_graph, group=4, channels_out=8),
    "conv-grouped": partial(conv_graph, group=2, bias=False, channels_out=6),
    "convtranspose": partial(conv_graph, "ConvTranspose", channels_out=6),
    "convtranspose-grouped": partial(conv_graph, "ConvTranspose", group=2, bias=False,
                                     channels_out=6),
    "gemm-transB-c": partial(gemm_graph, trans_b=1, c_shape=(5,)),
    "gemm-c": partial(gemm_graph, trans_b=0, c_shape=(5,)),
    "gemm-c-row": partial(gemm_graph, trans_b=0, c_shape=(1, 5)),
    "gemm-no-c": partial(gemm_graph, trans_b=1, c_shape=None),
    "gemm-transA": partial(gemm_graph, trans_b=1, c_shape=(5,), trans_a=1),
    "gemm-per-row-c": partial(gemm_graph, trans_b=1, c_shape=(3, 5)),
    "chain": batchnorm_chain,
    "chain-unnamed": partial(batchnorm_chain, named=False),
    "identity-parameters": identity_parameters,
    "shared-weights": shared_weights,
    "two-consumers": two_consumers,
    "producer-output-is-graph-output": producer_output_is_a_graph_output,
    "training": training_batchnorm,
    "computed-weight": computed_weight,
    "computed-bias": partial(computed_weight, "bias"),
    "weight-is-graph-input": weight_is_a_graph_input,
    "statistic-is-graph-input": partial(weight_is_a_graph_input, "bn.mean"),
    "other-producers": other_producers,
    "float16": float16_conv,
    "mixed": mixed_net,
}


def save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
