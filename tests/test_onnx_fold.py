"""Tests for bnsurgery.onnx_fold: one tiny graph per folding rule, numerics from onnxruntime.

Every folded graph is run in onnxruntime against the unfolded graph on the same inputs,
directly (not through the module's own check), and must agree to the fp32 tolerance.
"""

from __future__ import annotations

import inspect
import json
import os
import stat

import numpy as np
import pytest
import torch

import bnsurgery.fold as fold_maths
from bnsurgery.errors import FusionError, InvalidInputError
from bnsurgery.onnx_fold import batchnorm_fold_plan, fold_onnx_batchnorm

ort = pytest.importorskip("onnxruntime")
from onnx_graphs import (  # noqa: E402
    BUILDERS,
    TensorProto,
    batchnorm_chain,
    computed_weight,
    conv_graph,
    conv_net,
    float16_conv,
    gemm_graph,
    identity_parameters,
    onnx,
    other_producers,
    producer_output_is_a_graph_output,
    save,
    shared_weights,
    training_batchnorm,
    two_consumers,
    weight_is_a_graph_input,
)


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _assert_same_numbers(original, folded, shape, *, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    (expected,), (got,) = _run(original, {"x": x}), _run(folded, {"x": x})
    scale = float(np.abs(expected).max())
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(expected),
                               rtol=0, atol=1e-6 + 1e-4 * scale)
    # The fold changed the numbers it had to: the BatchNorm did not fold into an identity.
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]


@pytest.mark.parametrize(("op", "group", "bias", "out"), [
    pytest.param("Conv", 1, True, 4, id="conv"),
    pytest.param("Conv", 1, False, 6, id="conv-no-bias"),
    pytest.param("Conv", 4, True, 8, id="conv-depthwise"),
    pytest.param("Conv", 2, False, 6, id="conv-grouped"),
    pytest.param("ConvTranspose", 1, True, 6, id="convtranspose"),
    pytest.param("ConvTranspose", 2, False, 6, id="convtranspose-grouped"),
])
def test_conv_layers_fold(op, group, bias, out):
    model = conv_graph(op, group=group, bias=bias, channels_out=out)
    result = fold_onnx_batchnorm(model, providers="cpu", input_shape=[2, 4, 5, 5])
    assert [b.folded for b in result.batchnorms] == [True]
    assert result.batchnorms[0].reason == "folded into " + f"{op} layer"
    assert result.passed and result.check.passed
    _assert_same_numbers(model, result.model, (3, 4, 5, 5))
    layer = result.model.graph.node[0]
    assert layer.output[0] == "y" and len(layer.input) == 3
    names = {t.name for t in result.model.graph.initializer}
    assert not any(name.startswith("bn.") for name in names)  # statistics pruned


@pytest.mark.parametrize(("trans_b", "c_shape"), [
    pytest.param(1, (5,), id="transB-c"),
    pytest.param(0, (5,), id="c"),
    pytest.param(0, (1, 5), id="c-row"),
    pytest.param(1, None, id="no-c"),
])
def test_gemm_folds_with_alpha_beta_and_trans_b(trans_b, c_shape):
    model = gemm_graph(trans_b=trans_b, c_shape=c_shape)
    result = fold_onnx_batchnorm(model, providers="cpu", input_shape=[3, 6])
    assert [b.folded for b in result.batchnorms] == [True] and result.passed
    _assert_same_numbers(model, result.model, (4, 6))
    gemm = result.model.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["beta"] == 1.0 and attrs["alpha"] == pytest.approx(0.7)


def test_the_fold_is_the_float64_maths_of_fold_py():
    model = conv_graph(bias=True)
    folded = fold_onnx_batchnorm(model, providers="cpu").model
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    var = arrays["bn.var"].astype(np.float64)
    eps = float(np.float32(1e-3))  # ONNX stores the attribute as a float32
    scale = arrays["bn.scale"].astype(np.float64) / np.sqrt(var + eps)
    shift = arrays["bn.bias"] - arrays["bn.mean"].astype(np.float64) * scale
    expected_w = (arrays["w"].astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    expected_b = (arrays["b"].astype(np.float64) * scale + shift).astype(np.float32)
    np.testing.assert_array_equal(got["w"], expected_w)  # rounded once: bit for bit
    np.testing.assert_array_equal(got["b"], expected_b)


def test_a_chain_of_batchnorms_folds_into_one_layer():
    model = batchnorm_chain()
    result = fold_onnx_batchnorm(model, providers="cpu")
    assert [b.folded for b in result.batchnorms] == [True, True]
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    _assert_same_numbers(model, result.model, (2, 4, 3, 3))


def test_batchnorm_parameters_behind_identity_nodes_fold_and_are_pruned():
    """The legacy exporter shares equal tensors through Identity nodes; they are constants."""
    model = identity_parameters()
    result = fold_onnx_batchnorm(model, providers="cpu")
    assert [b.folded for b in result.batchnorms] == [True] and result.passed
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]  # Identity nodes pruned
    assert {t.name for t in result.model.graph.initializer} == {"w", "w.folded_bias"}
    _assert_same_numbers(model, result.model, (2, 4, 3, 3))


def _kept(model, **options):
    result = fold_onnx_batchnorm(model, providers="cpu", **options)
    assert not any(b.folded for b in result.batchnorms)
    assert result.check is None  # nothing folded, nothing to check: the graph is unchanged
    assert result.model.SerializeToString() == model.SerializeToString()
    return [b.reason for b in result.batchnorms]


def test_shared_weights_do_not_fold():
    model = shared_weights()
    assert _kept(model) == ["the weight of Conv conv_a is shared with another node"]


def test_a_producer_with_two_consumers_does_not_fold():
    model = two_consumers()
    assert _kept(model) == ["the output of Conv conv is also used elsewhere"]


def test_a_producer_output_that_is_a_graph_output_does_not_fold():
    model = producer_output_is_a_graph_output()
    assert _kept(model) == ["the output of Conv conv is also used elsewhere"]


def test_batchnorm_with_training_outputs_does_not_fold():
    model = training_batchnorm()
    reasons = [b.reason for b in fold_onnx_batchnorm(model, providers="cpu").batchnorms]
    assert reasons == ["training-mode node (it outputs or updates running statistics)"]


def test_gemm_with_trans_a_does_not_fold():
    model = gemm_graph(trans_b=1, c_shape=(5,), trans_a=1)
    assert _kept(model) == ["Gemm fc has transA=1 (only transA=0 is folded)"]


def test_gemm_with_a_per_row_c_does_not_fold():
    model = gemm_graph(trans_b=1, c_shape=(3, 5))
    assert _kept(model) == ["the C of Gemm fc has shape [3, 5], not one value per output "
                            "channel ([5] or [1, 5])"]


def test_dynamic_weights_do_not_fold():
    model = computed_weight()
    assert _kept(model) == ["the weight of Conv conv is computed in the graph, not an "
                            "initializer"]


def test_weights_a_graph_input_can_override_do_not_fold():
    model = weight_is_a_graph_input()
    assert _kept(model) == ["the weight of Conv conv is also a graph input, which a caller can "
                            "override at run time (export with keep_initializers_as_inputs="
                            "False)"]


def test_other_producers_and_graph_inputs_do_not_fold():
    model = other_producers()
    assert _kept(model) == ["it follows Relu, not one of Conv, ConvTranspose, Gemm",
                            "its input is a graph input, not a layer's output"]


@pytest.mark.parametrize("build", list(BUILDERS.values()), ids=list(BUILDERS))
def test_the_plan_changes_nothing_and_is_what_the_fold_does(build):
    model = build()
    before = model.SerializeToString()
    plan = batchnorm_fold_plan(onnx, model)
    assert model.SerializeToString() == before
    result = fold_onnx_batchnorm(model, providers="cpu")
    assert [(d.name, d.producer, d.producer_op, d.folds) for d in plan] == [
        (b.name, b.producer, b.producer_op, b.folded) for b in result.batchnorms]
    assert [d.reason for d in plan if not d.folds] == [
        b.reason for b in result.batchnorms if not b.folded]
    left = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
    assert len(left) == sum(not d.folds for d in plan)  # the folded graph's own count
    assert plan[0].to_dict()["folds"] is plan[0].folds


def test_strict_refuses_what_does_not_fold_and_writes_nothing(tmp_path):
    out = tmp_path / "out.onnx"
    with pytest.raises(FusionError, match="1 BatchNormalization nodes cannot be folded: bn: "
                                          "Gemm fc has transA=1") as info:
        fold_onnx_batchnorm(gemm_graph(trans_b=1, c_shape=(5,), trans_a=1), output=out,
                            strict=True, providers="cpu")
    assert "Hint: pass strict=False" in str(info.value) and not out.exists()


def test_a_wrong_fold_is_caught_before_anything_is_written(tmp_path, monkeypatch):
    source = save(conv_net(0), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    real = fold_maths.fold_layer_weights  # onnx_fold imports it when a node folds

    def off_by_five_percent(*args, **kwargs):
        folded = real(*args, **kwargs)
        return type(folded)(folded.weight * 1.05, folded.bias, folded.weight64, folded.bias64)

    monkeypatch.setattr(fold_maths, "fold_layer_weights", off_by_five_percent)
    result = fold_onnx_batchnorm(source, output=out, providers="cpu")
    assert not result.passed and result.output is None
    assert result.check.first_divergence == "bn.out"  # the folded Conv now writes bn.out
    assert out.read_bytes() == b"old"


def test_the_file_is_written_atomically_keeping_its_mode(tmp_path):
    source = save(conv_net(0), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    result = fold_onnx_batchnorm(source, output=out, providers="cpu")
    assert result.output == str(out) and stat.S_IMODE(out.stat().st_mode) == 0o640
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    _assert_same_numbers(onnx.load(str(source)), written, (2, 3, 8, 8))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert onnx.load(str(source)).graph.node[1].op_type == "BatchNormalization"  # input intact


def test_the_default_time_limit_is_the_runners():
    from bnsurgery.ort_session import DEFAULT_TIMEOUT_S

    timeout = inspect.signature(fold_onnx_batchnorm).parameters["timeout"].default
    assert timeout == DEFAULT_TIMEOUT_S


def test_missing_and_unreadable_files_are_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="The ONNX file does not exist"):
        fold_onnx_batchnorm(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    with pytest.raises(InvalidInputError, match="not a readable ONNX model"):
        fold_onnx_batchnorm(tmp_path / "junk.onnx")


def test_the_result_round_trips_through_json(tmp_path):
    result = fold_onnx_batchnorm(conv_net(0), providers="cpu")
    data = json.loads(json.dumps(result.to_dict()))
    assert data == result.to_dict() and "model" not in data
    assert data["folded"] == 1 and data["passed"] is True and data["check"]["passed"] is True
    assert data["batchnorms"] == [{"name": "bn", "producer": "conv", "producer_op": "Conv",
                                   "folded": True, "reason": "folded into Conv conv"}]


def test_float16_files_fold_in_float16_with_the_fp16_tolerance():
    model = float16_conv()
    result = fold_onnx_batchnorm(model, providers="cpu")
    assert result.passed and result.check.tolerance.label == "fp16"
    weights = {t.name: t.data_type for t in result.model.graph.initializer}
    assert weights == {"w": TensorProto.FLOAT16, "b": TensorProto.FLOAT16}
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float16)
    (expected,), (got,) = _run(model, {"x": x}), _run(result.model, {"x": x})
    scale = float(np.abs(expected.astype(np.float64)).max())
    torch.testing.assert_close(torch.from_numpy(got).double(),
                               torch.from_numpy(expected).double(),
                               rtol=0, atol=1e-3 + 5e-2 * scale)
