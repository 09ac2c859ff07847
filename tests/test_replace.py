"""replace_batchnorm / restore_batchnorm on real networks and on the awkward cases."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import AtenOpRecorder, requires_cuda
from torch import nn

import bnsurgery
from bnsurgery.errors import InvalidInputError, ReplacementError

SHAPE = (4, 3, 64, 64)
TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
               "regnet_y_400mf"]
TIMM = ["efficientnet_b0", "mobilenetv3_small_100"]


def _one_per_family(names, fast):
    """Readable ids; the nets outside ``fast`` repeat a block family and are marked slow."""
    return [pytest.param(name, id=name, marks=() if name in fast else pytest.mark.slow)
            for name in names]


# Basic residual blocks, inverted residuals with squeeze-excitation, dense concatenations;
# efficientnet_b0 and regnet_y_400mf repeat the inverted-residual and squeeze-excitation blocks.
EVAL_FAST = {"resnet18", "mobilenet_v3_small", "densenet121"}


def _calibrated(factory, name):
    torch.manual_seed(0)
    model = factory(name)
    return bnsurgery.calibrate_batchnorm(model, torch.randn(SHAPE), inplace=True).eval()


def _torchvision_model(torchvision, name):
    return _calibrated(lambda n: torchvision.models.get_model(n, weights=None), name)


def _timm_model(timm, name):
    return _calibrated(lambda n: timm.create_model(n, pretrained=False), name)


def _snapshot(model):
    """Everything that must not change in the caller's model: state, types, flags."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m), m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _assert_snapshot_equal(before, after):
    assert list(before[0]) == list(after[0])
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert before[1] == after[1]
    assert before[2] == after[2]


def _count_bn(model, types):
    return sum(type(m) in types for m in model.modules())


@pytest.fixture(scope="module", params=_one_per_family(TORCHVISION, EVAL_FAST))
def torchvision_model(request, torchvision):
    return request.param, _torchvision_model(torchvision, request.param)


def test_torchvision_eval_replace_restore(torchvision_model):
    name, model = torchvision_model
    before = _snapshot(model)
    x = torch.randn(SHAPE)
    replaced = bnsurgery.replace_batchnorm(model)
    _assert_snapshot_equal(before, _snapshot(model))  # caller's model untouched
    assert _count_bn(replaced, {nn.BatchNorm2d}) == 0
    assert _count_bn(replaced, {bnsurgery.BatchNorm2d}) == _count_bn(model, {nn.BatchNorm2d}) > 0
    assert list(replaced.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        with AtenOpRecorder() as rec:
            out = replaced(x)
        assert rec.ops and rec.batch_norm_ops() == []
        ref = model(x)
        exact = copy.deepcopy(model).double()(x.double())
    # Agreement to float32 rounding: no further from the float64 truth than torch itself.
    scale = exact.abs().max()
    ref_err = (ref.double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * ref_err + 1e-6 * scale
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(scale))
    restored = bnsurgery.restore_batchnorm(replaced)
    assert [type(m) for m in restored.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(restored(x), ref)
    # Checkpoints load strictly both ways.
    replaced.load_state_dict(model.state_dict(), strict=True)
    model_copy = copy.deepcopy(model)
    model_copy.load_state_dict(replaced.state_dict(), strict=True)


def _sgd_steps(model, batches, dtype):
    """Train a copy for len(batches) SGD steps; the last step's train-mode output and the state."""
    model = copy.deepcopy(model).to(dtype).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    for x, target in batches:
        opt.zero_grad()
        out = model(x.to(dtype))
        nn.functional.cross_entropy(out, target).backward()
        opt.step()
    state = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    return out.detach().double(), state


def _relative_state_error(state, exact):
    """||state - exact|| / ||exact|| over every floating-point parameter and buffer together.

    A whole-model norm, because single elements of a randomly initialised net after a few SGD
    steps can be ill-conditioned (torch's own float32 run then moves by orders of magnitude).
    """
    num = sum(((state[k] - exact[k]) ** 2).sum() for k in exact)
    den = sum((exact[k] ** 2).sum() for k in exact)
    return float((num / den).sqrt())


@pytest.mark.parametrize("name", _one_per_family(TORCHVISION, {"resnet18"}))
def test_torchvision_training_is_as_accurate_as_torch(torchvision, name):
    model = _torchvision_model(torchvision, name)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(SHAPE, generator=gen), torch.randint(0, 1000, (SHAPE[0],),
                                                                 generator=gen))
               for _ in range(3)]
    exact_out, exact_state = _sgd_steps(model, batches, torch.float64)
    ref_out, ref_state = _sgd_steps(model, batches, torch.float32)
    with AtenOpRecorder() as rec:
        ours_out, ours_state = _sgd_steps(bnsurgery.replace_batchnorm(model), batches,
                                          torch.float32)
    assert rec.ops and rec.batch_norm_ops() == []
    scale = exact_out.abs().max()
    ref_err = (ref_out - exact_out).abs().max()
    ours_err = (ours_out - exact_out).abs().max()
    assert ours_err <= 2 * ref_err + 1e-5 * scale, (float(ours_err), float(ref_err))
    ref_err = _relative_state_error(ref_state, exact_state)
    ours_err = _relative_state_error(ours_state, exact_state)
    assert ours_err <= 2 * ref_err + 1e-6, (ours_err, ref_err)


@pytest.mark.parametrize("name", _one_per_family(TIMM, {"mobilenetv3_small_100"}))
def test_timm_batchnorm_act_keeps_its_activation(timm, name):
    model = _timm_model(timm, name)
    act_type = timm.layers.BatchNormAct2d
    n_act = _count_bn(model, {act_type})
    assert n_act > 0
    replaced = bnsurgery.replace_batchnorm(model)
    assert _count_bn(replaced, {act_type}) == 0
    swapped = [m for m in replaced.modules() if isinstance(m, bnsurgery.BatchNormAct2d)]
    # Still timm's class for everybody else's isinstance checks.
    assert len(swapped) == n_act and all(isinstance(m, act_type) for m in swapped)
    acts = [type(m.act) for m in swapped]
    assert acts == [type(m.act) for m in model.modules() if type(m) is act_type]
    assert any(not issubclass(a, nn.Identity) for a in acts)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        ref = model(x)
        with AtenOpRecorder() as rec:
            out = replaced(x)
    assert rec.batch_norm_ops() == []
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    restored = bnsurgery.restore_batchnorm(replaced)
    assert _count_bn(restored, {act_type}) == n_act
    with torch.no_grad():
        assert torch.equal(restored(x), ref)


def test_batchnorm_act_activation_really_runs(timm):
    # If the activation were dropped, negative outputs would appear.
    layer = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU)
    bnsurgery.calibrate_batchnorm(layer, torch.randn(8, 4, 3, 3), inplace=True)
    replaced = bnsurgery.replace_batchnorm(layer)
    assert isinstance(replaced, bnsurgery.BatchNormAct2d)
    assert isinstance(replaced, timm.layers.BatchNormAct2d)
    out = replaced(torch.randn(8, 4, 3, 3) * 3)
    assert out.min() >= 0 and out.max() > 0


def _convnet():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(2))


def test_inplace_keeps_parameters_optimizer_hooks_and_flags():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.Linear(5, 2),
                          nn.BatchNorm1d(3))
    model[3].weight.requires_grad_(False)
    model[1].eval()
    params = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    calls = []
    handle = model[1].register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    result = bnsurgery.replace_batchnorm(model, inplace=True)
    assert result is model
    assert type(model[1]) is bnsurgery.BatchNorm1d
    for name, p in model.named_parameters():
        assert p is params[name]
    assert model[1].training is False and model[3].training is True
    assert model[3].weight.requires_grad is False
    x = torch.randn(4, 2, 5)
    (model(x) * torch.randn(4, 3, 2)).sum().backward()
    assert calls == [bnsurgery.BatchNorm1d]
    before = model[1].bias.detach().clone()
    opt.step()  # the optimizer built before the swap updates the swapped layer
    assert not torch.equal(model[1].bias, before)
    handle.remove()  # a handle taken before the swap still removes the hook
    model(x)
    assert calls == [bnsurgery.BatchNorm1d]


@pytest.mark.parametrize("device", [
    "cpu",
    "meta",  # a device other than the default one, present on every machine
    pytest.param("cuda", marks=[requires_cuda, pytest.mark.gpu]),
])
def test_dtype_and_device_are_kept(device):
    model = nn.Sequential(nn.BatchNorm2d(3)).to(device=device, dtype=torch.float64)
    replaced = bnsurgery.replace_batchnorm(model)
    assert type(replaced[0]) is bnsurgery.BatchNorm2d
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    got = {**dict(replaced.named_parameters()), **dict(replaced.named_buffers())}
    assert list(got) == list(expected)
    for name, tensor in got.items():
        assert (tensor.device, tensor.dtype) == (expected[name].device, expected[name].dtype), name
    assert got["0.num_batches_tracked"].dtype == torch.long
    if device != "meta":  # meta tensors have no values to compare
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64, device=device)
        out = replaced(x)
        assert (out.device, out.dtype) == (x.device, torch.float64)
        torch.testing.assert_close(out, model(x))


def test_shared_layer_stays_shared():
    bn = nn.BatchNorm2d(3)
    model = nn.ModuleDict({"a": bn, "b": nn.Sequential(bn)})
    replaced = bnsurgery.replace_batchnorm(model)
    assert replaced["a"] is replaced["b"][0]
    assert type(replaced["a"]) is bnsurgery.BatchNorm2d


def test_model_that_is_itself_a_batchnorm():
    bn = nn.BatchNorm3d(2)
    replaced = bnsurgery.replace_batchnorm(bn)
    assert type(replaced) is bnsurgery.BatchNorm3d
    assert type(bnsurgery.restore_batchnorm(replaced)) is nn.BatchNorm3d


def test_uninitialised_lazy_batchnorm_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ReplacementError, match=r"LazyBatchNorm2d '1' has not been initialised"
                                               r"(.|\n)*Hint: run one forward pass"):
        bnsurgery.replace_batchnorm(model)


def test_initialised_lazy_batchnorm_is_replaced():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    model(torch.randn(2, 3, 4, 4))
    replaced = bnsurgery.replace_batchnorm(model)
    assert type(replaced[1]) is bnsurgery.BatchNorm2d
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(replaced(x), model(x))


class _ScaledBN(nn.BatchNorm2d):
    """A subclass with its own forward: swapping it would lose the doubling."""

    def forward(self, x):
        return 2 * super().forward(x)


class _TaggedBN(nn.BatchNorm2d):
    """A subclass that adds nothing to the computation."""

    tag = "kept"


def test_subclass_with_own_forward_is_skipped_and_reported():
    model = nn.Sequential(_ScaledBN(3), nn.BatchNorm2d(3))
    plan = bnsurgery.plan_replacement(model)
    assert [r.name for r in plan.replaced] == ["1"]
    assert "own forward" in plan.skipped["0"] and "register_replacement" in plan.skipped["0"]
    with pytest.warns(UserWarning, match=r"1 BatchNorm-like layer\(s\) left as they are"):
        replaced = bnsurgery.replace_batchnorm(model)
    assert type(replaced[0]) is _ScaledBN
    with pytest.raises(ReplacementError, match=r"cannot be replaced:\n  0: .*_ScaledBN"):
        bnsurgery.replace_batchnorm(model, strict=True)
    assert plan.to_dict()["skipped"]["0"] == plan.skipped["0"]
    assert "skip  0" in str(plan)


def test_subclass_without_own_forward_round_trips_to_itself():
    model = nn.Sequential(_TaggedBN(3))
    replaced = bnsurgery.replace_batchnorm(model)
    assert isinstance(replaced[0], bnsurgery.BatchNorm2d) and isinstance(replaced[0], _TaggedBN)
    assert replaced[0].tag == "kept"
    restored = bnsurgery.restore_batchnorm(replaced)
    assert type(restored[0]) is _TaggedBN and restored[0].tag == "kept"
    assert not hasattr(restored[0], "_bnsurgery_origin")


class _ScaledScratch(bnsurgery.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


def _scaled_model():
    return bnsurgery.calibrate_batchnorm(nn.Sequential(_ScaledBN(3)),
                                         torch.randn(4, 3, 2, 2)).eval()


def _check_scaled_swap(model, replaced):
    # An instance of both: bnsurgery's maths, and still the user's class for isinstance checks.
    assert isinstance(replaced[0], _ScaledScratch) and isinstance(replaced[0], _ScaledBN)
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(replaced(x), model(x))
    assert type(bnsurgery.restore_batchnorm(replaced)[0]) is _ScaledBN


def test_register_replacement_holds_inside_its_with_block_only():
    model = _scaled_model()
    with bnsurgery.register_replacement(_ScaledBN, _ScaledScratch) as handle:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            replaced = bnsurgery.replace_batchnorm(model)
        _check_scaled_swap(model, replaced)
    assert "_ScaledScratch" in repr(handle)
    assert [r.name for r in bnsurgery.plan_replacement(model).replaced] == []
    assert "own forward" in bnsurgery.plan_replacement(model).skipped["0"]


def test_register_replacement_handle_removes_it():
    model = _scaled_model()
    handle = bnsurgery.register_replacement(_ScaledBN, _ScaledScratch)
    try:
        assert [r.name for r in bnsurgery.plan_replacement(model).replaced] == ["0"]
    finally:
        handle.remove()
    handle.remove()  # twice is harmless
    assert "0" in bnsurgery.plan_replacement(model).skipped


def test_mapping_for_one_call():
    model = _scaled_model()
    replaced = bnsurgery.replace_batchnorm(model, mapping={_ScaledBN: _ScaledScratch})
    _check_scaled_swap(model, replaced)
    assert "0" in bnsurgery.plan_replacement(model).skipped  # nothing registered globally
    with pytest.raises(InvalidInputError, match=r"mapping=.*module classes.*target"):
        bnsurgery.replace_batchnorm(model, mapping={_ScaledBN: "BatchNorm2d"})


def test_register_replacement_rejects_non_modules():
    with pytest.raises(InvalidInputError, match="module classes.*source"):
        bnsurgery.register_replacement(int, bnsurgery.BatchNorm2d)


def test_frozen_batchnorm_is_reported_not_dropped(torchvision):
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(3)
    plan = bnsurgery.plan_replacement(nn.Sequential(frozen))
    assert "frozen BatchNorm" in plan.skipped["0"]


def test_directly_built_layers_restore_to_torch_classes():
    model = nn.Sequential(bnsurgery.BatchNorm1d(3), bnsurgery.BatchNorm2d(3))
    restored = bnsurgery.restore_batchnorm(model)
    assert [type(m) for m in restored] == [nn.BatchNorm1d, nn.BatchNorm2d]


def test_not_a_module_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="needs a torch.nn.Module.*Got dict"):
        bnsurgery.replace_batchnorm({})


def test_torch_syncbatchnorm_round_trips():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4))
    bnsurgery.calibrate_batchnorm(model, torch.randn(4, 3, 5, 5), inplace=True).eval()
    replaced = bnsurgery.replace_batchnorm(model)
    assert type(replaced[1]) is bnsurgery.SyncBatchNorm
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(replaced(x), model(x))
    restored = bnsurgery.restore_batchnorm(replaced)
    assert type(restored[1]) is nn.SyncBatchNorm
    assert torch.equal(restored(x), model(x))


def test_sync_conversion_keeps_activation_and_restores_plain_classes(timm):
    model = nn.Sequential(nn.BatchNorm2d(4), timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU))
    synced = bnsurgery.replace_batchnorm(model, sync=True)
    assert isinstance(synced[0], bnsurgery.SyncBatchNorm) and isinstance(synced[0], nn.BatchNorm2d)
    assert isinstance(synced[1], bnsurgery.SyncBatchNormAct)
    assert isinstance(synced[1], timm.layers.BatchNormAct2d)
    assert isinstance(synced[1].act, nn.ReLU)
    restored = bnsurgery.restore_batchnorm(synced)
    assert [type(m) for m in restored] == [nn.BatchNorm2d, timm.layers.BatchNormAct2d]
    assert not hasattr(restored[0], "process_group")


class _AliasedBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.alias_bn = self.bn  # the same module under a second name; forward calls this one

    def forward(self, x):
        return self.alias_bn(self.conv(x))


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_batchnorm_registered_under_two_names_is_replaced_under_both(inplace):
    model = _AliasedBatchNorm().eval()
    replaced = bnsurgery.replace_batchnorm(model, inplace=inplace)
    assert type(replaced.bn) is bnsurgery.BatchNorm2d
    assert replaced.alias_bn is replaced.bn
    recorder = AtenOpRecorder()
    with recorder, torch.no_grad():
        replaced(torch.randn(2, 3, 6, 6))
    assert recorder.batch_norm_ops() == []  # torch's kernel no longer runs under either name
    restored = bnsurgery.restore_batchnorm(replaced)
    assert type(restored.alias_bn) is nn.BatchNorm2d and restored.alias_bn is restored.bn


def _freeze(timm, model):
    timm.utils.freeze(model)  # in place, returns nothing
    return model


def _freeze_unfreeze(timm, model):
    return timm.layers.unfreeze_batch_norm_2d(timm.layers.freeze_batch_norm_2d(model))


# Looked up when a test runs, so that collecting this file does not need timm.
TIMM_BN_UTILITIES = {
    "utils.freeze": _freeze,
    "freeze_batch_norm_2d": lambda timm, model: timm.layers.freeze_batch_norm_2d(model),
    "unfreeze_batch_norm_2d": _freeze_unfreeze,
    "convert_sync_batchnorm": lambda timm, model: timm.layers.convert_sync_batchnorm(model),
}


@pytest.mark.parametrize("utility", list(TIMM_BN_UTILITIES), ids=list(TIMM_BN_UTILITIES))
def test_timm_batchnorm_utilities_on_a_replaced_model(timm, utility):
    """timm's utilities dispatch on isinstance; on a replaced model they must build what they
    build from the original (a frozen BatchNormAct2d keeps its activation) and compute the same."""
    def operation(model):
        return TIMM_BN_UTILITIES[utility](timm, model)

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    bnsurgery.calibrate_batchnorm(model, torch.randn(4, 3, 64, 64), inplace=True).eval()
    assert _count_bn(model, {timm.layers.BatchNormAct2d}) > 0
    expected_model = operation(copy.deepcopy(model)).eval()
    got_model = operation(bnsurgery.replace_batchnorm(model)).eval()
    norms = lambda m: [type(n).__name__ for n in m.modules() if "Norm" in type(n).__name__]  # noqa: E731
    assert norms(got_model) == norms(expected_model)
    with torch.no_grad():
        expected, got = expected_model(x), got_model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
