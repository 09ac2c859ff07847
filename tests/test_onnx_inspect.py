"""Tests for bnsurgery.onnx_inspect on small hand-built graphs.

What ``inspect`` reports foldable is checked against what ``fuse`` then folds, over every graph
of ``tests/onnx_graphs.py``: the folded graph's own nodes say which BatchNorms are gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnsurgery.cli import main
from bnsurgery.errors import InvalidInputError
from bnsurgery.onnx_fold import fold_onnx_batchnorm
from bnsurgery.onnx_inspect import inspect_onnx
from bnsurgery.schema import check_document

onnx = pytest.importorskip("onnx")
from onnx_graphs import BUILDERS, mixed_net, save  # noqa: E402

helper = onnx.helper
ROOT = Path(__file__).resolve().parents[1]


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


def test_inspecting_an_onnx_file_does_not_import_torch(graph_file):
    """The fold plan it reports is read without torch, as the file's summary is."""
    code = ("import sys; from bnsurgery.onnx_inspect import inspect_onnx; "
            f"summary = inspect_onnx({str(graph_file)!r}); "
            "print(sum(b.foldable for b in summary.batchnorms), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "False"]


def test_a_file_that_is_not_onnx_is_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InvalidInputError, match="not a readable ONNX model"):
        inspect_onnx(bad)
    assert main(["inspect", str(bad)]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def _batchnorm_names(model) -> set[str]:
    return {n.name or n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization"}


def _assert_inspect_matches_fuse(reported, result, source) -> None:
    """``reported`` (inspect's) against ``result`` (fuse's) and the graphs themselves."""
    folded = {b.name for b in result.batchnorms if b.folded}
    assert {b.name for b in reported if b.foldable} == folded
    assert folded == _batchnorm_names(source) - _batchnorm_names(result.model)
    assert [b.name for b in reported] == [b.name for b in result.batchnorms]
    for seen, done in zip(reported, result.batchnorms, strict=True):
        assert (seen.producer, seen.producer_op) == (done.producer, done.producer_op), seen.name
        expected = (f"folds into {done.producer_op} {done.producer}" if done.folded
                    else done.reason)
        assert seen.reason == expected, seen.name


@pytest.mark.parametrize("build", list(BUILDERS.values()), ids=list(BUILDERS))
def test_what_inspect_calls_foldable_is_what_fuse_folds(build, tmp_path):
    pytest.importorskip("onnxruntime")
    model = build()
    path = save(model, tmp_path / "model.onnx")
    reported = inspect_onnx(path).batchnorms
    result = fold_onnx_batchnorm(path, providers="cpu")
    assert result.passed  # what was folded still computes the same numbers
    _assert_inspect_matches_fuse(reported, result, model)


def test_inspect_decides_without_the_external_weights(tmp_path):
    """``inspect`` does not open external data files; its verdicts need shapes, not values."""
    pytest.importorskip("onnxruntime")
    model = mixed_net()
    path = tmp_path / "external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.data", size_threshold=0)
    result = fold_onnx_batchnorm(path, providers="cpu")
    assert result.passed and 0 < result.folded < len(result.batchnorms)
    (tmp_path / "external.data").unlink()
    _assert_inspect_matches_fuse(inspect_onnx(path).batchnorms, result, model)
