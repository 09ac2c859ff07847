"""Tests for bnsurgery.onnx_inspect on small hand-built graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnsurgery.cli import main
from bnsurgery.errors import InvalidInputError
from bnsurgery.onnx_inspect import inspect_onnx
from bnsurgery.schema import check_document

onnx = pytest.importorskip("onnx")
helper = onnx.helper


def _constant(name, *shape):
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return onnx.numpy_helper.from_array(values, name)


def _bn(name, source, output, channels):
    return (helper.make_node("BatchNormalization", [source, f"{name}.s", f"{name}.b",
                                                    f"{name}.m", f"{name}.v"], [output],
                             name=name),
            [_constant(f"{name}.{p}", channels) for p in "sbmv"])


@pytest.fixture
def graph_file(tmp_path):
    # x(N,3,8,8) -> Conv(4,3,3,3) -> bn1 -> Relu -> bn2 -> Flatten -> Gemm(4*6*6 -> 5)
    bn1, bn1_params = _bn("bn1", "conv", "bn1_out", 4)
    bn2, bn2_params = _bn("bn2", "relu", "bn2_out", 4)
    nodes = [helper.make_node("Conv", ["x", "w", "c"], ["conv"], name="conv1"), bn1,
             helper.make_node("Relu", ["bn1_out"], ["relu"], name="relu"), bn2,
             helper.make_node("Flatten", ["bn2_out"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "g", "gb"], ["y"], name="fc", transB=1)]
    initializers = [_constant("w", 4, 3, 3, 3), _constant("c", 4), _constant("g", 5, 144),
                    _constant("gb", 5), *bn1_params, *bn2_params]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                      ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 5])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"bnsurgery.fused": "false"})
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    return path


def test_summary_counts_what_is_in_the_graph(graph_file):
    summary = inspect_onnx(graph_file)
    assert summary.inputs == (("x", "float", ("batch", 3, 8, 8)),)
    assert summary.outputs == (("y", "float", ("batch", 5)),)
    assert summary.opsets == {"": 18}
    assert summary.op_counts["BatchNormalization"] == 2 and summary.op_counts["Conv"] == 1
    assert summary.parameters == 4 * 27 + 4 + 5 * 144 + 5 + 2 * 4 * 4
    assert summary.parameter_bytes == 4 * summary.parameters  # float32
    # Conv: 4*6*6 outputs x 27 MACs each; Gemm: 5 outputs x 144 (batch 1 for "batch").
    assert summary.macs == 4 * 6 * 6 * 27 + 5 * 144
    assert summary.metadata == {"bnsurgery.fused": "false"}
    bn1, bn2 = summary.batchnorms
    assert bn1.foldable and bn1.producer == "conv1" and "folds into Conv conv1" in bn1.reason
    assert not bn2.foldable and "follows Relu" in bn2.reason


def test_inspect_an_onnx_file_through_the_cli(graph_file, capsys):
    code = main(["inspect", str(graph_file), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads(captured.out)
    assert check_document(document) == []
    assert document["status"] == "skipped" and document["passed"] is None  # nothing checked
    assert document["graph"]["flops"] == 2 * document["graph"]["macs"]
    assert [b["foldable"] for b in document["graph"]["batchnorms"]] == [True, False]
    assert main(["inspect", str(graph_file)]) == 0
    text = capsys.readouterr().out
    assert "BatchNormalization nodes left: 2, 1 foldable" in text and "follows Relu" in text


def test_a_file_that_is_not_onnx_is_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InvalidInputError, match="not a readable ONNX model"):
        inspect_onnx(bad)
    assert main(["inspect", str(bad)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
