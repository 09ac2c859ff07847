"""Tests for bnsurgery.tensors: the plumbing every check and export shares."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnsurgery.errors import IncompatibleModuleError, InvalidInputError
from bnsurgery.tensors import (
    as_input_tuple,
    cast_inputs,
    check_eval_mode,
    export_inputs,
    flatten_outputs,
    model_device,
    model_dtype,
    model_on,
    resize_batch,
    tf32_allowed,
)


def test_resize_batch_keeps_rows_and_draws_new_ones():
    x = torch.randn(2, 3)
    assert torch.equal(resize_batch((x,), 1, seed=0)[0], x[:1])
    grown = resize_batch((x,), 5, seed=0)[0]
    assert grown.shape == (5, 3) and torch.equal(grown[:2], x)
    ids = torch.tensor([[1], [2]])
    assert set(resize_batch((ids,), 4, seed=0)[0].flatten().tolist()) <= {1, 2}


def test_as_input_tuple_accepts_tensors_only():
    x = torch.zeros(1)
    assert as_input_tuple(x) == (x,)
    assert as_input_tuple([x, x]) == (x, x)
    with pytest.raises(InvalidInputError, match="non-empty sequence of tensors"):
        as_input_tuple([])
    with pytest.raises(InvalidInputError, match=r"a list of \['Tensor', 'int'\]"):
        as_input_tuple([x, 3])


def test_flatten_outputs_names_nested_tensors_in_exporter_order():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    named = flatten_outputs({"logits": a, "aux": [b, (c, "not a tensor")]})
    assert [name for name, _ in named] == [
        "output['logits']", "output['aux'][0]", "output['aux'][1][0]"]
    assert [t is s for (_, t), s in zip(named, (a, b, c), strict=True)] == [True] * 3


def test_model_on_never_moves_the_callers_model():
    model = nn.Linear(2, 2)
    assert model_on(model, torch.device("cpu")) is model
    doubled = model_on(model, torch.device("cpu"), torch.float64)
    assert doubled is not model and model_dtype(doubled) == torch.float64
    assert model.weight.dtype == torch.float32 and model_device(model).type == "cpu"
    assert model_dtype(nn.ReLU()) == torch.float32  # no tensors: the default


def test_cast_inputs_casts_floating_point_only():
    x, ids = torch.zeros(2), torch.arange(2)
    cast = cast_inputs((x, ids), torch.device("cpu"), torch.float64)
    assert cast[0].dtype == torch.float64 and cast[1].dtype == torch.int64


def test_tf32_switches_are_restored():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with tf32_allowed(not saved[0]):
        assert torch.backends.cuda.matmul.allow_tf32 is (not saved[0])
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def test_export_inputs_doubles_a_single_example_only_for_a_dynamic_batch():
    one = torch.randn(1, 3)
    (doubled,) = export_inputs((one,), True)
    assert doubled.shape == (2, 3) and torch.equal(doubled[1], one[0])
    assert export_inputs((one,), False)[0] is one
    two = torch.randn(2, 3)
    assert export_inputs((two,), True)[0] is two


def test_check_eval_mode_names_the_training_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    with pytest.raises(InvalidInputError, match=r"eval mode.*\(at 1\)"):
        check_eval_mode(model, what="export_onnx")
    check_eval_mode(model.eval(), what="export_onnx")
    with pytest.raises(IncompatibleModuleError, match="needs a torch.nn.Module"):
        check_eval_mode({"weight": torch.zeros(1)}, what="export_onnx")
