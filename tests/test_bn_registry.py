"""The one exact-type registry of BatchNorm-like classes: folding, replacement, restoring."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bnsurgery
from bnsurgery._bn_registry import (
    add_replacement,
    batchnorm_input_rank,
    batchnorm_kind,
    default_restore_class,
    is_bnsurgery_class,
    looks_like_batchnorm,
    static_skip_reason,
    swap_class,
)


class _Tagged(nn.BatchNorm2d):
    """Adds nothing to the computation: swapped like its base, and stays a _Tagged."""


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_exact_types_only():
    timm = pytest.importorskip("timm")
    assert batchnorm_kind(nn.BatchNorm2d(3)).keeps == ()
    assert batchnorm_kind(bnsurgery.BatchNorm2d(3)) is not None
    act = batchnorm_kind(timm.layers.BatchNormAct2d(3))
    assert act is not None and act.keeps == ("drop", "act")  # the activation survives folding
    assert batchnorm_kind(_OwnForward(3)) is None
    assert looks_like_batchnorm(_OwnForward(3))
    assert not looks_like_batchnorm(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize(("module", "match"), [
    (_OwnForward(3).eval(), "not one bnsurgery knows"),
    (nn.BatchNorm2d(3).train(), "training mode"),
    (nn.BatchNorm2d(3, track_running_stats=False).eval(), "no running statistics"),
], ids=["subclass", "training", "no-stats"])
def test_skip_reasons(module, match):
    assert match in static_skip_reason(module)


def test_bad_statistics_and_hooks_are_reasons():
    bn = nn.BatchNorm2d(3).eval()
    assert static_skip_reason(bn) is None
    bn.running_var[0] = -1.0
    assert "not positive" in static_skip_reason(bn)
    bn = nn.BatchNorm2d(3).eval()
    bn.register_forward_hook(lambda *args: None)
    assert "forward hooks" in static_skip_reason(bn)


def test_swapped_class_is_an_instance_of_both_and_is_cached():
    timm = pytest.importorskip("timm")
    source = timm.layers.BatchNormAct2d
    swapped = swap_class(source)
    assert issubclass(swapped, bnsurgery.BatchNormAct2d) and issubclass(swapped, source)
    assert swap_class(source) is swapped  # one class per pair, not one per layer
    assert swapped.forward is bnsurgery.BatchNormAct2d.forward  # bnsurgery's maths run
    layer = swapped(3, act_layer=nn.ReLU)  # built with the arguments timm's class takes
    assert isinstance(layer.act, nn.ReLU)
    kind = batchnorm_kind(layer)
    assert kind.keeps == ("drop", "act") and kind.restore is source and kind.input_rank == 4
    assert default_restore_class(swapped) is source
    assert is_bnsurgery_class(swapped)


@pytest.mark.parametrize(("source", "sync", "expected"), [
    (nn.BatchNorm2d, False, bnsurgery.BatchNorm2d),
    (nn.SyncBatchNorm, False, bnsurgery.SyncBatchNorm),
    (nn.SyncBatchNorm, True, bnsurgery.SyncBatchNorm),
    (bnsurgery.BatchNorm1d, False, bnsurgery.BatchNorm1d),
    (_OwnForward, False, None),
], ids=["torch", "torch-sync", "torch-sync-sync", "bnsurgery", "own-forward"])
def test_table_counterparts(source, sync, expected):
    assert swap_class(source, sync=sync) is expected


def test_synced_counterpart_of_a_plain_batchnorm_keeps_its_class():
    swapped = swap_class(nn.BatchNorm3d, sync=True)
    assert issubclass(swapped, bnsurgery.SyncBatchNorm) and issubclass(swapped, nn.BatchNorm3d)
    # Not torch's SyncBatchNorm: DDP refuses those in CPU models.
    assert not issubclass(swapped, nn.SyncBatchNorm)


def test_mapping_and_handles_win_newest_first_and_undo():
    class Mine(bnsurgery.BatchNorm2d):
        pass

    class Other(bnsurgery.BatchNorm2d):
        pass

    assert issubclass(swap_class(_OwnForward, mapping={_OwnForward: Mine}), Mine)
    with add_replacement(_OwnForward, Mine):
        with add_replacement(_OwnForward, Other):
            assert issubclass(swap_class(_OwnForward), Other)
        assert issubclass(swap_class(_OwnForward), Mine)
        assert issubclass(swap_class(_OwnForward, mapping={_OwnForward: Other}), Other)
    assert swap_class(_OwnForward) is None


def test_input_rank_comes_from_the_table():
    assert batchnorm_input_rank(nn.BatchNorm3d(2)) == 5
    assert batchnorm_input_rank(bnsurgery.BatchNorm2d(2)) == 4
    assert batchnorm_input_rank(nn.BatchNorm1d(2)) is None  # (N, C) and (N, C, L)
    assert batchnorm_input_rank(_OwnForward(2)) is None


def test_swapped_layers_pickle_and_copy():
    model = bnsurgery.calibrate_batchnorm(nn.Sequential(_Tagged(3)), torch.randn(4, 3, 2, 2))
    replaced = bnsurgery.replace_batchnorm(model.eval())
    buffer = io.BytesIO()
    torch.save(replaced, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # whole-model pickles need it, as in torch
    for clone in (loaded, copy.deepcopy(replaced)):
        assert type(clone[0]) is type(replaced[0]) and isinstance(clone[0], _Tagged)
        x = torch.randn(2, 3, 2, 2)
        torch.testing.assert_close(clone(x), model(x))
        assert type(bnsurgery.restore_batchnorm(clone)[0]) is _Tagged


def test_a_replaced_timm_model_folds_with_its_activations():
    """The swapped classes are registry rows too: folding finds every one and keeps drop/act."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    bnsurgery.calibrate_batchnorm(model, torch.randn(4, 3, 64, 64), inplace=True).eval()
    replaced = bnsurgery.replace_batchnorm(model)
    plan = bnsurgery.plan_fusion(replaced, x)
    n_act = sum(type(m) is timm.layers.BatchNormAct2d for m in model.modules())
    assert not plan.skipped
    assert sum(r.replacement == "FoldedBatchNormAct" for r in plan.folded) == n_act > 0
    with torch.no_grad():
        expected, got = model(x), bnsurgery.fuse_batchnorm(replaced, x)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
