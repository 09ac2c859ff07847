"""Tests for bnsurgery.onnx_compare: two ONNX files against each other, on tiny graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bnsurgery.errors import InvalidInputError, NonFiniteReferenceError, RunTimeoutError
from bnsurgery.onnx_compare import compare_onnx, graph_signature

ort = pytest.importorskip("onnxruntime")
from onnx_graphs import Graph, TensorProto, conv_net, onnx, save  # noqa: E402


def _ort_outputs(path, feed):
    """The file's outputs straight from onnxruntime: the independent reference."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.fixture
def files(tmp_path):
    return (save(conv_net(0), tmp_path / "a.onnx"), save(conv_net(0), tmp_path / "same.onnx"),
            save(conv_net(0, scale_channel=1.05), tmp_path / "conv_off.onnx"))


def test_identical_files_pass_with_no_error(files):
    a, same, _ = files
    report = compare_onnx(a, same, providers="cpu", input_shape=[2, 3, 8, 8])
    assert report.passed and report.first_divergence is None and not report.layers
    assert [o.name for o in report.outputs] == ["y"]
    assert report.outputs[0].max_abs_error == 0.0 and report.outputs[0].shape == (2, 5)
    assert report.details["inputs"] == {"x": {"dtype": "float32", "shape": [2, 3, 8, 8]}}


def test_errors_match_onnxruntime_run_directly(files):
    a, _, off = files
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    report = compare_onnx(a, off, inputs={"x": x}, providers="cpu", per_tensor=False)
    (ref,), (cand,) = (_ort_outputs(p, {"x": x.numpy()}) for p in (a, off))
    expected = float(np.abs(cand.astype(np.float64) - ref.astype(np.float64)).max())
    assert report.outputs[0].max_abs_error == pytest.approx(expected, rel=1e-12)
    assert report.outputs[0].scale == pytest.approx(float(np.abs(ref).max()), rel=1e-12)
    assert not report.passed and report.details["seed"] is None  # given inputs, no seed


def test_first_diverging_tensor_is_the_changed_layers_output(files):
    a, _, off = files
    report = compare_onnx(a, off, providers="cpu")
    assert not report.passed
    assert report.first_divergence == "conv.out"
    assert report.divergence_suspects == ("Conv conv",)
    layers = {layer.name: layer for layer in report.layers}
    assert list(layers) == ["conv.out", "bn.out", "relu.out", "flat.out", "y"]  # graph order
    assert all(layer.diverged for layer in layers.values())
    assert report.divergence_kind == "tensor"


def test_the_text_names_a_diverging_tensor_not_a_module(files):
    a, _, off = files
    report = compare_onnx(a, off, providers="cpu")
    text = str(report)
    assert ("  first diverging tensor: conv.out (the candidate computes it from tensors that "
            "still agree with: Conv conv)") in text.splitlines()
    assert "module" not in text  # two ONNX files have no modules to name
    assert "in a.onnx's order" in text  # the order the tensors were compared in


def test_a_later_change_leaves_the_earlier_tensors_agreeing(tmp_path):
    a = save(conv_net(0), tmp_path / "a.onnx")
    model = conv_net(0)
    fc = next(t for t in model.graph.initializer if t.name == "fc.weight")
    array = onnx.numpy_helper.to_array(fc).copy()
    array[2] *= 1.1
    fc.CopyFrom(onnx.numpy_helper.from_array(array, "fc.weight"))
    b = save(model, tmp_path / "b.onnx")
    report = compare_onnx(a, b, providers="cpu", input_shape=[2, 3, 8, 8])
    assert report.first_divergence == "y" and report.divergence_suspects == ("Gemm fc",)
    assert [layer.diverged for layer in report.layers] == [False, False, False, False, True]


def test_per_tensor_on_request_when_the_outputs_agree(files):
    a, same, _ = files
    report = compare_onnx(a, same, providers="cpu", per_tensor=True)
    assert report.passed and len(report.layers) == 5
    assert not any(layer.diverged for layer in report.layers)


def test_renamed_graph_compares_only_what_both_compute(tmp_path):
    """An optimiser that renames tensors: the per-tensor search sees only shared names."""
    a = save(conv_net(0), tmp_path / "a.onnx")
    model = conv_net(0, scale_channel=1.05)
    for node in model.graph.node:
        node.output[:] = [v if v == "y" else f"opt.{v}" for v in node.output]
        node.input[:] = [f"opt.{v}" if v.endswith(".out") else v for v in node.input]
    b = save(model, tmp_path / "b.onnx")
    report = compare_onnx(a, b, providers="cpu")
    assert not report.passed and [layer.name for layer in report.layers] == ["y"]
    assert report.first_divergence == "y"
    assert report.divergence_suspects[0] == "Conv conv"  # back to the inputs: nothing agrees


@pytest.mark.parametrize(("change", "message"), [
    pytest.param(lambda m: setattr(m.graph.input[0], "name", "image"),
                 "input only in the first file: x; input only in the second file: image",
                 id="input-name"),
    pytest.param(lambda m: m.graph.input[0].type.tensor_type.shape.dim[2].__setattr__(
        "dim_value", 16), "input x: shape N,3,8,8 against N,3,16,8", id="input-shape"),
    pytest.param(lambda m: m.graph.output[0].type.tensor_type.__setattr__(
        "elem_type", TensorProto.DOUBLE), "output y: dtype float against double",
        id="output-dtype"),
])
def test_files_with_other_inputs_or_outputs_are_refused(tmp_path, change, message):
    a = save(conv_net(0), tmp_path / "a.onnx")
    model = conv_net(0)
    change(model)
    b = tmp_path / "b.onnx"
    onnx.save(model, str(b))
    with pytest.raises(InvalidInputError, match="do not have the same inputs and outputs") as info:
        compare_onnx(a, b, providers="cpu")
    assert message in str(info.value)


def test_symbolic_dimensions_match_whatever_their_names(tmp_path):
    a = save(conv_net(0), tmp_path / "a.onnx")
    model = conv_net(0)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    b = save(model, tmp_path / "b.onnx")
    assert graph_signature(model)[0] == (("x", "float", ("batch", 3, 8, 8)),)
    assert compare_onnx(a, b, providers="cpu").passed


def test_inputs_that_do_not_fit_are_refused(files, tmp_path):
    a, same, _ = files
    with pytest.raises(InvalidInputError, match="the file expects N,3,8,8, got 1,3,9,9"):
        compare_onnx(a, same, providers="cpu", input_shape=[1, 3, 9, 9])
    with pytest.raises(InvalidInputError, match=r"missing \['x'\], unknown \['image'\]"):
        compare_onnx(a, same, providers="cpu", inputs={"image": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(InvalidInputError, match="The ONNX file does not exist"):
        compare_onnx(a, tmp_path / "missing.onnx", providers="cpu")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(InvalidInputError, match="not a readable ONNX model"):
        compare_onnx(tmp_path / "junk.onnx", a, providers="cpu")


def test_integer_and_several_inputs_are_drawn_per_dtype(tmp_path):
    g = Graph(1)
    g.node("Gather", [g.constant("table", 2, 4), "index"], ["rows"], "gather")
    g.node("Add", ["rows", "offset"], ["y"], "add")
    model = g.model([("index", TensorProto.INT64, [3]), ("offset", TensorProto.FLOAT, [3, 4])],
                    [("y", TensorProto.FLOAT, [3, 4])])
    a, b = save(model, tmp_path / "a.onnx"), save(model, tmp_path / "b.onnx")
    report = compare_onnx(a, b, providers="cpu", seed=3)
    assert report.passed
    assert report.details["inputs"] == {"index": {"dtype": "int64", "shape": [3]},
                                        "offset": {"dtype": "float32", "shape": [3, 4]}}
    with pytest.raises(InvalidInputError, match="One input shape for a file with several"):
        compare_onnx(a, b, providers="cpu", input_shape=[3])


def test_a_non_finite_reference_is_refused(tmp_path):
    g = Graph(0)
    g.node("Log", ["x"], ["y"], "log")  # log of a negative input: NaN
    model = g.model([("x", TensorProto.FLOAT, [4])], [("y", TensorProto.FLOAT, [4])])
    a, b = save(model, tmp_path / "a.onnx"), save(model, tmp_path / "b.onnx")
    with pytest.raises(NonFiniteReferenceError, match="a.onnx returns NaN or infinite"):
        compare_onnx(a, b, providers="cpu", inputs=[-torch.ones(4)])


def test_a_never_ending_file_stops_at_the_time_limit(tmp_path):
    from test_ort_session import _hostile_loop

    loop = _hostile_loop(tmp_path / "loop.onnx")
    with pytest.raises(RunTimeoutError, match="time limit of 0.3 s"):
        compare_onnx(loop, loop, providers="cpu", timeout=0.3)


def test_the_report_round_trips_through_json(files):
    a, _, off = files
    report = compare_onnx(a, off, providers="cpu")
    data = json.loads(json.dumps(report.to_dict()))
    assert data == report.to_dict()
    assert data["first_divergence"] == "conv.out" and data["passed"] is False
    assert data["divergence_kind"] == "tensor"
    assert [layer["name"] for layer in data["layers"]][:1] == ["conv.out"]
