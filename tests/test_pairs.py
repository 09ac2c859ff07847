"""Tests of BatchNorm pair discovery (bnsurgery.pairs) on the tiny-model suite and edge cases."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CASES, make, random_input
from torch import nn

from bnsurgery.errors import InvalidInputError
from bnsurgery.pairs import (
    DISCOVERY_METHODS,
    DiscoveryAttempt,
    FoldPair,
    PairSearch,
    as_forward_args,
    find_fold_pairs,
)

_AVAILABLE = [c for c in CASES.values() if c.available()]


@pytest.mark.parametrize("case", _AVAILABLE, ids=[c.name for c in _AVAILABLE])
def test_tiny_case_pairs(case):
    model, inputs = make(case)
    search = find_fold_pairs(model, inputs)
    assert search.method == case.method
    assert {p.batchnorm: p.targets for p in search.pairs} == case.folded
    following = {p.batchnorm for p in search.pairs if p.direction == "following"}
    assert following == set(case.following)
    assert all(p.method == case.method for p in search.pairs)
    assert set(search.skipped) == set(case.skipped)
    for name, pattern in case.skipped.items():
        assert re.search(pattern, search.skipped[name]), (name, search.skipped[name])


def _conv_bn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()


@pytest.mark.parametrize("method", DISCOVERY_METHODS)
def test_each_method_finds_the_same_pairs(method):
    model, inputs = make(CASES["registration_order"])
    search = find_fold_pairs(model, inputs, methods=(method,))
    assert search.method == method
    assert [(p.batchnorm, p.targets, p.direction, p.method) for p in search.pairs] == [
        ("bn2", ("conv2",), "preceding", method), ("bn1", ("conv1",), "preceding", method)]
    assert search.attempts == (DiscoveryAttempt(method, "used"),)


def test_fallback_chain_records_every_attempt():
    model, inputs = make(CASES["data_dependent_branch"])
    search = find_fold_pairs(model, inputs)
    assert [(a.method, a.status) for a in search.attempts] == [
        ("fx", "failed"), ("export", "failed"), ("hooks", "used")]
    assert "TraceError" in search.attempts[0].detail


def test_without_example_inputs_untraceable_model_is_explained():
    model, _ = make(CASES["data_dependent_branch"])
    search = find_fold_pairs(model)
    assert search.pairs == () and search.method is None
    assert [(a.method, a.status) for a in search.attempts] == [
        ("fx", "failed"), ("export", "not tried"), ("hooks", "not tried")]
    for reason in search.skipped.values():
        assert "could not find the model's dataflow" in reason
        assert "pass example_inputs" in reason


def test_linear_needs_example_inputs_to_check_its_rank():
    model, inputs = make(CASES["linear_bn"])
    without = find_fold_pairs(model)
    assert without.pairs == ()
    assert re.search("rank of its output is unknown; pass example_inputs", without.skipped["bn"])
    with_inputs = find_fold_pairs(model, inputs)
    assert [p.targets for p in with_inputs.pairs] == [("fc",)]


class _MetadataReader(nn.Module):
    """Reads the conv output's shape (metadata only) before the BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        batch = y.shape[0]
        return self.bn(y).reshape(batch, -1)


class _InPlaceEdit(nn.Module):
    """Edits the conv output in place before the BatchNorm: a second user of that tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.add_(1.0)
        return self.bn(y)


@pytest.mark.parametrize("method", DISCOVERY_METHODS)
def test_metadata_reads_do_not_block_and_in_place_edits_do(method):
    x = random_input(2, 3, 6, 6)
    reader = find_fold_pairs(_MetadataReader().eval(), x, methods=(method,))
    assert [p.batchnorm for p in reader.pairs] == ["bn"]
    editor = find_fold_pairs(_InPlaceEdit().eval(), x, methods=(method,))
    assert editor.pairs == () and "bn" in editor.skipped


def test_hooks_on_a_layer_or_batchnorm_block_the_fold():
    model = _conv_bn()
    handle = model[0].register_forward_hook(lambda *args: None)
    search = find_fold_pairs(model)
    assert "has forward hooks registered" in search.skipped["1"]
    handle.remove()
    handle = model[1].register_forward_pre_hook(lambda *args: None)
    search = find_fold_pairs(model)
    assert "it has forward hooks registered" in search.skipped["1"]
    handle.remove()
    assert [p.batchnorm for p in find_fold_pairs(model).pairs] == ["1"]


class DetectronStyleFrozenBatchNorm2d(nn.Module):
    """A frozen BatchNorm from another library: recognised as BatchNorm-like, not folded."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


def test_unknown_batchnorm_like_class_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DetectronStyleFrozenBatchNorm2d(4)).eval()
    search = find_fold_pairs(model)
    assert search.pairs == ()
    assert "is not a BatchNorm bnsurgery knows how to fold" in search.skipped["1"]


def test_discovery_leaves_the_model_untouched():
    model, inputs = make(CASES["data_dependent_branch"])
    model.bn_b.train()  # a training-mode BatchNorm would update its statistics if run
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    find_fold_pairs(model, inputs, methods=("export", "hooks"))
    find_fold_pairs(model, (-inputs[0],), methods=("hooks",))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(rng, torch.get_rng_state())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class _CatAlongWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.conv_b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], dim=-1))


def test_concatenation_along_another_axis_is_not_split():
    search = find_fold_pairs(_CatAlongWidth().eval(), random_input(1, 3, 4, 4))
    assert "concatenation along dim -1, not along the channel axis" in search.skipped["bn"]


def test_batchnorm_reached_through_functional_op_is_explained():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(F.relu(self.conv(x)))

    search = find_fold_pairs(Model().eval())
    assert re.search(r"its input comes from torch\.nn\.functional\.relu", search.skipped["bn"])
    assert "it feeds the model output" in search.skipped["bn"]


def test_as_forward_args():
    x = torch.zeros(1)
    assert as_forward_args(None) is None
    assert as_forward_args(x)[0] is x
    assert as_forward_args([x, x]) == (x, x)
    images = [x, x]
    assert as_forward_args((images,)) == (images,)
    assert as_forward_args({"a": x}) == ({"a": x},)


def test_unknown_method_is_rejected():
    with pytest.raises(InvalidInputError, match="Unknown dataflow discovery method"):
        find_fold_pairs(_conv_bn(), methods=("jit",))
    with pytest.raises(InvalidInputError, match="Unknown dataflow discovery method"):
        find_fold_pairs(_conv_bn(), methods=())


def test_records_are_json_ready():
    search = find_fold_pairs(_conv_bn())
    assert isinstance(search, PairSearch) and isinstance(search.pairs[0], FoldPair)
    data = json.loads(json.dumps(search.to_dict()))
    assert data["pairs"] == [{"batchnorm": "1", "targets": ["0"], "direction": "preceding",
                              "method": "fx"}]
    assert data["attempts"] == [{"method": "fx", "status": "used", "detail": ""}]


def test_a_layer_registered_under_two_names_is_not_shared():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.alias = self.conv  # the same conv object under a second name
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.alias(x))

    search = find_fold_pairs(Model().eval())
    assert [(p.batchnorm, p.targets) for p in search.pairs] == [("bn", ("conv",))]


class _SlicedSequential(nn.Module):
    """Runs a slice of its body (``for m in self.body[:-1]``), as ultralytics RT-DETR does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten())

    def forward(self, x):
        for module in self.body[:-1]:
            x = module(x)
        return x


def test_export_paths_through_a_sequential_slice_are_mapped_back():
    from bnsurgery._dataflow import resolve_module_path

    model = _SlicedSequential().eval()
    assert resolve_module_path(model, "body.slice(None, -1, None).3") is model.body[3]
    assert resolve_module_path(model, "body.slice(None, -1, None).9") is None
    search = find_fold_pairs(model, torch.randn(2, 3, 6, 6), methods=("export",))
    assert {p.batchnorm: p.targets for p in search.pairs} == {"body.1": ("body.0",),
                                                              "body.4": ("body.3",)}
