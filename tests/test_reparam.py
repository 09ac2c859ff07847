"""Tests for bnsurgery.reparam: merging parallel conv+BatchNorm branches into one conv.

Every merge is judged against a float64 run of the original model; the exported graph is checked
for one conv per merged block and no leftover additions; blocks that must not merge are checked
for the reason in the report. timm's own re-parameterisation is the reference on its models.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnsurgery.calibrate import calibrate_batchnorm
from bnsurgery.errors import InvalidInputError
from bnsurgery.reparam import (
    ReparamPlan,
    merge_branch_kernels,
    plan_reparameterization,
    reparameterize_branches,
)


def _bn(channels: int, dims: int = 2) -> nn.Module:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](channels)


class Branches(nn.Module):
    """``sum_i scale_i * bn_i(conv_i(x))`` with configurable branches (``None`` conv: identity)."""

    def __init__(self, specs: list[dict], channels: int = 4, out_channels: int | None = None,
                 dims: int = 2, constant: float | None = None) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.scales = []
        for spec in specs:
            spec = dict(spec)
            self.scales.append(spec.pop("scale", None))
            with_bn = spec.pop("bn", True)
            if spec.pop("identity", False):
                self.convs.append(nn.Identity())
            else:
                spec.setdefault("bias", False)
                self.convs.append(conv_cls(channels, out_channels, **spec))
            self.bns.append(_bn(out_channels, dims) if with_bn else nn.Identity())
        self.constant = constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for conv, bn, scale in zip(self.convs, self.bns, self.scales, strict=True):
            term = bn(conv(x))
            if scale is not None:
                term = term * scale
            out = term if out is None else out + term
        if self.constant is not None:
            out = out + self.constant
        return out


K3 = {"kernel_size": 3, "padding": 1}
K1 = {"kernel_size": 1}
IDENTITY = {"identity": True}

MERGE_CASES = {
    "repvgg": (lambda: Branches([K3, K1, IDENTITY]), 1),
    "depthwise_identity": (lambda: Branches([{**K3, "groups": 4}, {**K1, "groups": 4}, IDENTITY]),
                           1),
    "grouped": (lambda: Branches([{**K3, "groups": 2}, IDENTITY], channels=4), 1),
    "acnet_asymmetric": (lambda: Branches([K3, {"kernel_size": (1, 3), "padding": (0, 1)},
                                           {"kernel_size": (3, 1), "padding": (1, 0)}]), 1),
    "conv_without_bn_and_bias": (lambda: Branches([{**K3, "bias": True, "bn": False},
                                                   {**K1, "bias": True}]), 1),
    "scaled": (lambda: Branches([{**K3, "scale": 0.5}, {**K1, "scale": 2.0}, IDENTITY]), 1),
    "plus_constant_zero": (lambda: Branches([K3, K1], constant=0), 1),
    "conv1d_5_and_3": (lambda: Branches([{"kernel_size": 5, "padding": 2},
                                         {"kernel_size": 3, "padding": 1}], dims=1), 1),
    "dilated": (lambda: Branches([{"kernel_size": 3, "padding": 2, "dilation": 2},
                                  {"kernel_size": 1, "dilation": 2}, IDENTITY]), 1),
    "even_same_padding": (lambda: Branches([{"kernel_size": 4, "padding": "same"},
                                            {"kernel_size": 2, "padding": "same"}]), 1),
    "stride2_no_identity": (lambda: Branches([{**K3, "stride": 2}, {**K1, "stride": 2}],
                                             out_channels=6), 1),
    "two_blocks": (lambda: nn.Sequential(Branches([K3, K1, IDENTITY]), nn.ReLU(),
                                         Branches([K3, IDENTITY])), 2),
}


def _input(model: nn.Module, size: int = 8) -> torch.Tensor:
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    shape = (2, 4, size) if isinstance(first, nn.Conv1d) else (2, 4, size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return calibrate_batchnorm(model, x).eval()


def _conv_and_add_calls(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    program = torch.export.export(model, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    return (sum("conv" in t for t in targets), sum(".add" in t for t in targets))


@pytest.mark.parametrize("name", list(MERGE_CASES))
def test_merges_exactly_into_one_conv_per_block(name: str) -> None:
    build, blocks = MERGE_CASES[name]
    model = build()
    x = _input(model, 7 if "stride2" in name else 8)
    model = nn.Sequential(_calibrated(model, x)) if name != "two_blocks" else _calibrated(model, x)
    plan = plan_reparameterization(model)
    assert len(plan.merged) == blocks, str(plan)
    merged = reparameterize_branches(model, x, plan=plan)
    reference = copy.deepcopy(model).double()(x.double())
    with torch.no_grad():
        out = merged(x)
        base = model(x)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    # As accurate as the original float32 run, within rounding noise.
    error = (out.double() - reference).abs().max()
    assert error <= 4 * (base.double() - reference).abs().max() + 1e-6
    assert _conv_and_add_calls(merged, x) == (blocks, 0)
    assert type(merged) is type(model)
    for block in plan.merged:
        assert isinstance(merged.get_submodule(block.block), Branches)


def test_caller_model_untouched_and_inplace() -> None:
    x = _input(Branches([K3]))
    model = nn.Sequential(_calibrated(Branches([K3, K1, IDENTITY]), x))
    before = copy.deepcopy(model.state_dict())
    merged = reparameterize_branches(model, x)
    assert merged is not model
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    same = reparameterize_branches(model, x, inplace=True)
    assert same is model and isinstance(model[0].bns[1], nn.Identity)


def test_model_level_sum_keeps_isinstance() -> None:
    x = _input(Branches([K3]))
    model = _calibrated(Branches([K3, K1, IDENTITY]), x)
    merged = reparameterize_branches(model, x)
    assert isinstance(merged, Branches) and merged.reparameterized_from is Branches
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x.flip(-1)))


class WithRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.a(x)) + F.relu(self.bn_b(self.b(x)))


class NormActBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from bnsurgery.batchnorm import BatchNormAct2d

        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), BatchNormAct2d(4, act=nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_a(self.a(x)) + self.bn_b(self.b(x))
        return y + self.b(y)


class ReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn_b(self.b(x))
        return (self.bn_a(self.a(x)) + branch) * branch


class TensorScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.full((1, 4, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x)) * self.gamma


class OnlyBatchNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(x) + self.bn_b(x)


REFUSED = {
    "different_strides": (lambda: Branches([{**K3, "stride": 2}, {**K1, "stride": 1,
                                                                   "padding": 0}]),
                          9, "different stride"),
    "non_centred_padding": (lambda: Branches([{**K3, "stride": 2}, {**K1, "stride": 2,
                                                                    "padding": 1}]),
                            7, "non-centred padding"),
    "different_dilation": (lambda: Branches([K3, {"kernel_size": 3, "padding": 2,
                                                  "dilation": 2}]), 8, "different dilation"),
    "reflect_padding": (lambda: Branches([{**K3, "padding_mode": "reflect"}, K1]), 8,
                        "reflect"),
    "identity_with_stride": (lambda: Branches([{**K3, "stride": 2}, IDENTITY]), 8, None),
    "identity_channels": (lambda: Branches([K3, IDENTITY], out_channels=6), 8, None),
    "relu_in_branch": (WithRelu, 8, "is not a convolution"),
    "norm_act_branch": (NormActBranch, 8, "a branch with a nonlinearity"),
    "different_inputs": (TwoInputs, 8, "do not read the same tensor"),
    "conv_called_twice": (SharedConv, 8, "runs 2 times"),
    "branch_read_twice": (ReadTwice, 8, "also read outside the sum"),
    "tensor_scale": (TensorScaled, 8, "mul is not a convolution"),
    "no_conv": (OnlyBatchNorms, 8, "no branch has a convolution"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refuses_with_reason(name: str) -> None:
    build, size, pattern = REFUSED[name]
    model = build()
    x = _input(model, size) if name != "no_conv" else torch.randn(2, 4, size, size)
    try:
        model(x)
    except RuntimeError:  # shapes that cannot be summed: a graph-only check
        x = None
    if x is not None:
        model = _calibrated(model, x)
    model = nn.Sequential(model.eval())
    plan = plan_reparameterization(model)
    assert not plan.merged, str(plan)
    assert plan.not_merged
    if pattern is not None:
        assert any(pattern in item.reason for item in plan.not_merged), str(plan)
    if x is not None:
        same = reparameterize_branches(model, x, plan=plan)
        torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)


def test_training_mode_batchnorm_is_refused() -> None:
    model = nn.Sequential(Branches([K3, K1]))
    plan = plan_reparameterization(model)
    assert not plan.merged and "training mode" in plan.not_merged[0].reason


def test_plan_to_dict_and_str() -> None:
    x = _input(Branches([K3]))
    model = nn.Sequential(_calibrated(Branches([K3, {**K1, "scale": 2.0}, IDENTITY]), x))
    plan = plan_reparameterization(model)
    data = plan.to_dict()
    assert data["merged"][0]["conv"] == "0.convs.0"
    assert [b["kind"] for b in data["merged"][0]["branches"]] == ["conv+batchnorm"] * 2 + [
        "batchnorm"]
    assert data["merged"][0]["branches"][1]["scale"] == 2.0
    assert "1 of 1 sums merged" in str(plan)
    assert isinstance(plan, ReparamPlan)


def test_merge_branch_kernels_rejects_misfit() -> None:
    kernel = torch.ones(2, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="does not fit"):
        merge_branch_kernels([kernel], [torch.zeros(2, dtype=torch.float64)], [(1, 1)], (3, 3),
                             dtype=torch.float32)


def test_unknown_method() -> None:
    with pytest.raises(InvalidInputError, match="Unknown dataflow discovery method"):
        plan_reparameterization(nn.Sequential(), methods=("magic",))


def test_export_and_hooks_dataflow_find_the_same_blocks() -> None:
    x = _input(Branches([K3]))
    model = nn.Sequential(_calibrated(Branches([K3, K1, IDENTITY]), x))
    for method in ("export", "hooks"):
        plan = plan_reparameterization(model, x, methods=(method,))
        assert plan.method == method and len(plan.merged) == 1, str(plan)


def test_onnx_graph_has_one_conv_and_no_add(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from bnsurgery.onnx_export import export_onnx

    x = _input(Branches([K3]))
    model = nn.Sequential(_calibrated(Branches([K3, K1, IDENTITY]), x), nn.ReLU())
    merged = reparameterize_branches(model, x)
    path = export_onnx(merged, x, tmp_path / "merged.onnx", fuse=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 1 and "Add" not in ops and "BatchNormalization" not in ops, ops


def _merged_two_blocks() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    build, _ = MERGE_CASES["two_blocks"]
    model = build()
    x = _input(model)
    model = _calibrated(model, x)
    return model, reparameterize_branches(model, x), x


def _assert_same_merged_model(copied: nn.Module, merged: nn.Module, x: torch.Tensor) -> None:
    """``copied`` is a separate model computing exactly what ``merged`` computes."""
    with torch.no_grad():
        torch.testing.assert_close(copied(x), merged(x), rtol=0, atol=0)
    for index in (0, 2):
        block = copied[index]
        assert type(block) is type(merged[index]) and block.reparameterized_from is Branches
        assert isinstance(block, Branches) and isinstance(block.bns[1], nn.Identity)
        assert block.convs[0].weight is not merged[index].convs[0].weight
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(copied.state_dict()[key], value, rtol=0, atol=0)


PLAN_MISMATCHES = {
    # The planned branch conv is an nn.Identity in the other model.
    "conv_is_identity": (Branches([K3, IDENTITY, IDENTITY]), "a branch conv is not a convolution"),
    # The planned identity-branch BatchNorm is an nn.Identity in the other model.
    "batchnorm_is_identity": (Branches([K3, K1, {"identity": True, "bn": False}]),
                              "a branch BatchNorm has no running statistics"),
}


@pytest.mark.parametrize("name", list(PLAN_MISMATCHES))
def test_plan_for_another_model_is_refused(name: str) -> None:
    x = _input(Branches([K3]))
    plan = plan_reparameterization(_calibrated(Branches([K3, K1, IDENTITY]), x))
    other, reason = PLAN_MISMATCHES[name]
    other = _calibrated(other, x)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(InvalidInputError, match=f"plan does not match the model: {reason}"):
        reparameterize_branches(other, x, plan=plan, inplace=True)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_merged_model_pickles_and_deep_copies() -> None:
    model, merged, x = _merged_two_blocks()
    for copied in (pickle.loads(pickle.dumps(merged)), copy.deepcopy(merged)):
        _assert_same_merged_model(copied, merged, x)
    with torch.no_grad():  # and a copy still computes what the original, unmerged model does
        torch.testing.assert_close(pickle.loads(pickle.dumps(merged))(x), model(x),
                                   rtol=1e-5, atol=1e-5)


def test_merged_model_saves_whole_with_torch_save(tmp_path) -> None:
    _, merged, x = _merged_two_blocks()
    torch.save(merged, tmp_path / "merged.pt")
    loaded = torch.load(tmp_path / "merged.pt", weights_only=False)  # a trusted file: this test's
    _assert_same_merged_model(loaded, merged, x)
    assert _conv_and_add_calls(loaded, x) == (2, 0)


TIMM_MODELS = ["repvgg_a0", "mobileone_s0", "repghostnet_050"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_match_timm_reparameterize(name: str) -> None:
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    model = calibrate_batchnorm(timm.create_model(name, pretrained=False), x).eval()
    ours = reparameterize_branches(model, x)
    theirs = reparameterize_model(copy.deepcopy(model))
    assert _conv_and_add_calls(ours, x) == _conv_and_add_calls(theirs, x)
    reference = copy.deepcopy(model).double()(x.double())
    with torch.no_grad():
        ours_error = (ours(x).double() - reference).abs().max()
        theirs_error = (theirs(x).double() - reference).abs().max()
    scale = reference.abs().max()
    assert ours_error <= 2 * theirs_error + 1e-6 * scale, (ours_error, theirs_error)
