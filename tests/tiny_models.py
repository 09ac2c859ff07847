"""Tiny models, one per BatchNorm-folding case, with what a correct fuser must do for each.

Shared by ``tests/test_fuse.py`` and ``benchmarks/fuse_vs_fx.py``. Every case names the BatchNorms
that must be folded (and into which layers), the ones that must be left alone (with a pattern
their reason must match) and the dataflow builder expected to find the pairs. The traps published
fusers fall into are here on purpose: a conv used at two call sites, a conv output with two
readers, Linear + BatchNorm1d on ``(N, C, L)`` with ``L == C``, grouped and square
ConvTranspose, modules registered in an order unlike the dataflow, reflect padding, a BatchNorm
subclass with its own forward, timm's ``BatchNormAct2d``, and so on.

:func:`make` returns a calibrated model (random affine parameters, measured and nudged running
statistics) in eval mode, plus the inputs to check it on. :class:`TinyNet` is the one small
classifier the export and validation tests share: it exports and validates in about a second.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bnsurgery.calibrate import calibrate_batchnorm

__all__ = ["CASES", "TinyCase", "TinyNet", "make", "random_input"]


def random_input(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reproducible standard-normal tensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


@dataclass(frozen=True)
class TinyCase:
    """One folding case.

    Attributes:
        name: Readable id.
        build: Returns the (uncalibrated) model.
        inputs: Returns the example inputs (positional forward arguments).
        folded: BatchNorm name -> the layer(s) it must fold into.
        skipped: BatchNorm name -> a regex its skip reason must match.
        following: BatchNorms that fold into the layer *after* them.
        method: The dataflow builder expected to be used.
        more_inputs: Further inputs to compare outputs on (e.g. the other branch of an ``if``).
        finish: Applied after calibration and ``eval()`` (casts, training-mode layers).
        requires: An optional package the case needs.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    folded: dict[str, tuple[str, ...]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    following: tuple[str, ...] = ()
    method: str = "fx"
    more_inputs: Callable[[], list[tuple[torch.Tensor, ...]]] | None = None
    finish: Callable[[nn.Module], nn.Module] | None = None
    requires: str | None = None

    def available(self) -> bool:
        """Whether the optional package this case needs is installed."""
        if self.requires is None:
            return True
        try:
            return importlib.util.find_spec(self.requires) is not None
        except ImportError:  # a blocking import hook refuses even to look the package up
            return False

    def check_inputs(self) -> list[tuple[torch.Tensor, ...]]:
        """The example inputs, another random batch, and :attr:`more_inputs`."""
        first = self.inputs()
        second = tuple(random_input(*t.shape, seed=7, dtype=t.dtype).contiguous(
            memory_format=_format_of(t)) for t in first)
        return [first, second, *(self.more_inputs() if self.more_inputs else [])]


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def make(case: TinyCase) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build, calibrate and ``eval()`` the case's model; return it with its example inputs."""
    torch.manual_seed(0)
    model = case.build()
    inputs = case.inputs()
    float_inputs = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    model = calibrate_batchnorm(model, float_inputs, seed=1).eval()
    if case.finish is not None:
        model = case.finish(model)
    return model, inputs


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _images(channels: int = 3, size: int = 8) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (random_input(2, channels, size, size),)


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> global pool -> linear, on 3-channel images of any size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.conv(x))).mean((2, 3)))


# --- models whose forward is more than a chain --------------------------------------------------

class ConvTwoCallSites(nn.Module):
    """One conv module used twice: its weights cannot be folded for one call only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv(self.stem(x)))
        return self.bn2(self.conv(F.relu(y)))


class ConvOutputTwoUsers(nn.Module):
    """A conv output read by the BatchNorm and by a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class ConvOutputReturned(nn.Module):
    """A conv output that is also a model output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return self.bn(y), y


class LinearOnSequence(nn.Module):
    """Linear on (N, C, L) with L == C, then BatchNorm1d over C: different axes, same size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class RegisteredOutOfOrder(nn.Module):
    """Modules registered conv1, conv2, bn2, bn1; zip(convs, bns) would pair them wrongly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.bn1 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(x))


class DataDependentBranch(nn.Module):
    """Python control flow on tensor values: torch.fx and torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(3, 4, 1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.bn_a(self.conv_a(x))
        return self.bn_b(self.conv_b(x))


class ShapeDependentBranch(nn.Module):
    """Python control flow on shapes: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 6:
            x = F.avg_pool2d(x, 2)
        return F.relu(self.bn(self.conv(x)))


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward does more than normalise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0 + 1.0


class StandardizedConv2d(nn.Conv2d):
    """A conv subclass that standardises its weight in forward (as timm's StdConv2d does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) / (
            self.weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class MixedKernels(nn.Module):
    """Channel groups through different kernels, concatenated, then one BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.conv5 = nn.Conv2d(2, 5, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [2, 2], dim=1)
        return self.bn(torch.cat([self.conv3(a), self.conv5(b)], dim=1))


class ConcatWithPool(nn.Module):
    """A concatenation of a conv output and a pooled input: the pool slice cannot absorb."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.conv(x), F.max_pool2d(x, 3, 1, 1)], dim=1))


class SharedWeights(nn.Module):
    """Two convs sharing one weight Parameter; folding one would change the other."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b.weight = self.conv_a.weight
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x))


class RegisteredTwice(nn.Module):
    """One BatchNorm reachable under two attribute names, called once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.alias = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alias(self.conv(x))


# --- builders needing optional or sibling packages ---------------------------------------------

def _timm_norm_act() -> nn.Module:
    from timm.layers import BatchNormAct2d

    return _seq(conv=nn.Conv2d(3, 8, 3, padding=1, bias=False),
                bn=BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=None))


def _timm_frozen_norm_act() -> nn.Module:
    from timm.layers import FrozenBatchNormAct2d

    return _seq(conv=nn.Conv2d(3, 8, 3, padding=1), bn=FrozenBatchNormAct2d(8, act_layer=nn.GELU))


def _timm_mixed_conv() -> nn.Module:
    from timm.layers import MixedConv2d

    return _seq(conv=MixedConv2d(4, 9, kernel_size=[3, 5, 7], padding=""), bn=nn.BatchNorm2d(9))


def _frozen() -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return _seq(conv=nn.Conv2d(3, 8, 3, padding=1, bias=False), bn=FrozenBatchNorm2d(8))


def _own_norm_act() -> nn.Module:
    from bnsurgery.batchnorm import BatchNormAct2d

    return _seq(conv=nn.Conv2d(3, 8, 3, padding=1), bn=BatchNormAct2d(8, act=nn.Hardswish()))


def _own_batchnorms() -> nn.Module:
    from bnsurgery.batchnorm import BatchNorm2d

    return _seq(conv=nn.Conv2d(3, 8, 3, padding=1), bn=BatchNorm2d(8), relu=nn.ReLU(),
                conv2=nn.Conv2d(8, 4, 1), bn2=BatchNorm2d(4))


def _own_batchnorm_1d() -> nn.Module:
    from bnsurgery.batchnorm import BatchNorm1d

    return _seq(conv=nn.Conv1d(4, 6, 3), bn=BatchNorm1d(6))


def _own_sync() -> nn.Module:
    from bnsurgery.sync_batchnorm import SyncBatchNorm

    return _seq(conv=nn.Conv2d(3, 8, 3, padding=1), bn=SyncBatchNorm(8))


def _train_second(model: nn.Module) -> nn.Module:
    model.bn2.train()
    return model


def _to_bfloat16(model: nn.Module) -> nn.Module:
    return model.to(torch.bfloat16)


def _to_channels_last(model: nn.Module) -> nn.Module:
    return model.to(memory_format=torch.channels_last)


def _both_branches() -> list[tuple[torch.Tensor, ...]]:
    x = random_input(2, 3, 8, 8, seed=3)
    return [(x.abs() + 0.1,), (-x.abs() - 0.1,)]


_CASES: list[TinyCase] = [
    TinyCase("conv2d_bn", lambda: _seq(conv=nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                       bn=nn.BatchNorm2d(8), relu=nn.ReLU()),
             _images(), folded={"bn": ("conv",)}),
    TinyCase("conv2d_bias_stride_dilation",
             lambda: _seq(conv=nn.Conv2d(3, 8, 3, stride=2, dilation=2, padding=2),
                          bn=nn.BatchNorm2d(8)),
             _images(size=9), folded={"bn": ("conv",)}),
    TinyCase("conv1d_bn", lambda: _seq(conv=nn.Conv1d(4, 6, 3), bn=nn.BatchNorm1d(6)),
             lambda: (random_input(2, 4, 10),), folded={"bn": ("conv",)}),
    TinyCase("conv3d_bn", lambda: _seq(conv=nn.Conv3d(2, 4, 3, padding=1), bn=nn.BatchNorm3d(4)),
             lambda: (random_input(2, 2, 4, 5, 5),), folded={"bn": ("conv",)}),
    TinyCase("grouped_conv_bn", lambda: _seq(conv=nn.Conv2d(4, 8, 3, groups=2),
                                             bn=nn.BatchNorm2d(8)),
             _images(4), folded={"bn": ("conv",)}),
    TinyCase("depthwise_conv_bn", lambda: _seq(conv=nn.Conv2d(6, 6, 3, padding=1, groups=6),
                                               bn=nn.BatchNorm2d(6)),
             _images(6), folded={"bn": ("conv",)}),
    TinyCase("reflect_padding", lambda: _seq(
                 conv=nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=False),
                 bn=nn.BatchNorm2d(8)),
             _images(), folded={"bn": ("conv",)}),
    TinyCase("conv_transpose_grouped", lambda: _seq(
                 conv=nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), bn=nn.BatchNorm2d(6)),
             _images(4, 5), folded={"bn": ("conv",)}),
    TinyCase("conv_transpose_square", lambda: _seq(
                 conv=nn.ConvTranspose2d(8, 8, 2, stride=2, bias=False), bn=nn.BatchNorm2d(8)),
             _images(8, 4), folded={"bn": ("conv",)}),
    TinyCase("conv_transpose1d_grouped", lambda: _seq(
                 conv=nn.ConvTranspose1d(4, 4, 3, groups=2), bn=nn.BatchNorm1d(4)),
             lambda: (random_input(2, 4, 7),), folded={"bn": ("conv",)}),
    TinyCase("conv_transpose3d", lambda: _seq(
                 conv=nn.ConvTranspose3d(2, 4, 2, stride=2), bn=nn.BatchNorm3d(4)),
             lambda: (random_input(2, 2, 3, 3, 3),), folded={"bn": ("conv",)}),
    TinyCase("linear_bn", lambda: _seq(fc=nn.Linear(10, 6), bn=nn.BatchNorm1d(6)),
             lambda: (random_input(4, 10),), folded={"bn": ("fc",)}),
    TinyCase("linear_bn_ncl_square", LinearOnSequence, lambda: (random_input(4, 5, 5),),
             skipped={"bn": "writes the last axis"}),
    TinyCase("bn_linear", lambda: _seq(bn=nn.BatchNorm1d(6), fc=nn.Linear(6, 3)),
             lambda: (random_input(4, 6),), folded={"bn": ("fc",)}, following=("bn",)),
    TinyCase("bn_linear_ncl_square", lambda: _seq(bn=nn.BatchNorm1d(5), fc=nn.Linear(5, 3)),
             lambda: (random_input(4, 5, 5),), skipped={"bn": "on a 3-D tensor"}),
    TinyCase("bn_conv_transpose1x1", lambda: _seq(bn=nn.BatchNorm2d(4),
                                                  conv=nn.ConvTranspose2d(4, 6, 1, groups=2)),
             _images(4), folded={"bn": ("conv",)}, following=("bn",)),
    TinyCase("bn_conv_transpose3x3", lambda: _seq(bn=nn.BatchNorm2d(4),
                                                  conv=nn.ConvTranspose2d(4, 6, 3, stride=2)),
             _images(4), skipped={"bn": "transposed convolution"}),
    TinyCase("bn_conv1x1", lambda: _seq(bn=nn.BatchNorm2d(3), conv=nn.Conv2d(3, 8, 1)),
             _images(), folded={"bn": ("conv",)}, following=("bn",)),
    TinyCase("bn_conv_zero_padded", lambda: _seq(bn=nn.BatchNorm2d(3),
                                                 conv=nn.Conv2d(3, 8, 3, padding=1)),
             _images(), skipped={"bn": "pads with zeros"}),
    TinyCase("bn_conv_reflect_padded", lambda: _seq(
                 bn=nn.BatchNorm2d(3),
                 conv=nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", groups=1)),
             _images(), folded={"bn": ("conv",)}, following=("bn",)),
    TinyCase("bn_conv_bn", lambda: _seq(bn_in=nn.BatchNorm2d(4),
                                        conv=nn.Conv2d(4, 6, 1, groups=2),
                                        bn_out=nn.BatchNorm2d(6)),
             _images(4), folded={"bn_in": ("conv",), "bn_out": ("conv",)},
             following=("bn_in",)),
    TinyCase("conv_two_call_sites", ConvTwoCallSites, _images(),
             skipped={"bn1": "runs 2 times", "bn2": "runs 2 times"}),
    TinyCase("conv_output_two_users", ConvOutputTwoUsers, _images(),
             skipped={"bn": "also read by"}),
    TinyCase("conv_output_returned", ConvOutputReturned, _images(),
             skipped={"bn": "also read by the model output"}),
    TinyCase("registration_order", RegisteredOutOfOrder, _images(),
             folded={"bn1": ("conv1",), "bn2": ("conv2",)}),
    TinyCase("channels_last", lambda: _seq(conv=nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                           bn=nn.BatchNorm2d(8), relu=nn.ReLU(),
                                           conv2=nn.Conv2d(8, 8, 3, padding=1, groups=2),
                                           bn2=nn.BatchNorm2d(8)),
             lambda: (random_input(2, 3, 8, 8).contiguous(memory_format=torch.channels_last),),
             folded={"bn": ("conv",), "bn2": ("conv2",)}, finish=_to_channels_last),
    TinyCase("data_dependent_branch", DataDependentBranch,
             lambda: (random_input(2, 3, 8, 8, seed=3).abs() + 0.1,),
             folded={"bn_a": ("conv_a",)}, skipped={"bn_b": "never called on the example"},
             method="hooks", more_inputs=_both_branches),
    TinyCase("shape_dependent_branch", ShapeDependentBranch, _images(),
             folded={"bn": ("conv",)}, method="export"),
    TinyCase("bn_subclass_own_forward", lambda: _seq(conv=nn.Conv2d(3, 4, 3, padding=1),
                                                     bn=ScaledBatchNorm2d(4)),
             _images(), skipped={"bn": "not one bnsurgery knows"}),
    TinyCase("conv_subclass", lambda: _seq(conv=StandardizedConv2d(3, 4, 3, padding=1),
                                           bn=nn.BatchNorm2d(4)),
             _images(), skipped={"bn": "overrides how nn.Conv"}),
    TinyCase("mixed_kernel_concat", MixedKernels, _images(4),
             folded={"bn": ("conv3", "conv5")}),
    TinyCase("concat_with_pool", ConcatWithPool, _images(),
             skipped={"bn": "concatenates"}),
    TinyCase("affine_false_bias_false", lambda: _seq(
                 conv=nn.Conv2d(3, 6, 3, padding=1), bn=nn.BatchNorm2d(6, affine=False),
                 conv2=nn.Conv2d(6, 4, 1, bias=False), bn2=nn.BatchNorm2d(4, bias=False)),
             _images(), folded={"bn": ("conv",), "bn2": ("conv2",)}),
    TinyCase("bn_in_training_mode", lambda: _seq(
                 conv=nn.Conv2d(3, 6, 3, padding=1), bn=nn.BatchNorm2d(6),
                 conv2=nn.Conv2d(6, 4, 1), bn2=nn.BatchNorm2d(4)),
             _images(), folded={"bn": ("conv",)}, skipped={"bn2": "training mode"},
             finish=_train_second),
    TinyCase("no_running_stats", lambda: _seq(conv=nn.Conv2d(3, 4, 3, padding=1),
                                              bn=nn.BatchNorm2d(4, track_running_stats=False)),
             _images(), skipped={"bn": "no running statistics"}),
    TinyCase("shared_conv_weights", SharedWeights, _images(),
             skipped={"bn_a": "shared with", "bn_b": "shared with"}),
    TinyCase("registered_twice", RegisteredTwice, _images(), folded={"bn": ("conv",)}),
    TinyCase("bfloat16_weights", lambda: _seq(conv=nn.Conv2d(3, 8, 3, padding=1),
                                              bn=nn.BatchNorm2d(8), relu=nn.ReLU(),
                                              conv2=nn.Conv2d(8, 4, 1, bias=False),
                                              bn2=nn.BatchNorm2d(4)),
             lambda: (random_input(2, 3, 8, 8, dtype=torch.bfloat16),),
             folded={"bn": ("conv",), "bn2": ("conv2",)}, finish=_to_bfloat16),
    TinyCase("sync_batchnorm_eval", lambda: _seq(conv=nn.Conv2d(3, 8, 3, padding=1),
                                                 bn=nn.SyncBatchNorm(8)),
             _images(), folded={"bn": ("conv",)}),
    TinyCase("frozen_batchnorm", _frozen, _images(), folded={"bn": ("conv",)},
             requires="torchvision"),
    TinyCase("timm_batchnorm_act", _timm_norm_act, _images(), folded={"bn": ("conv",)},
             requires="timm"),
    TinyCase("timm_frozen_batchnorm_act", _timm_frozen_norm_act, _images(),
             folded={"bn": ("conv",)}, requires="timm"),
    TinyCase("timm_mixed_conv", _timm_mixed_conv, _images(4),
             folded={"bn": ("conv.0", "conv.1", "conv.2")}, requires="timm"),
    TinyCase("bnsurgery_batchnorm", _own_batchnorms, _images(),
             folded={"bn": ("conv",), "bn2": ("conv2",)}),
    TinyCase("bnsurgery_batchnorm1d", _own_batchnorm_1d, lambda: (random_input(2, 4, 9),),
             folded={"bn": ("conv",)}),
    TinyCase("bnsurgery_batchnorm_act", _own_norm_act, _images(), folded={"bn": ("conv",)}),
    TinyCase("bnsurgery_sync_batchnorm", _own_sync, _images(), folded={"bn": ("conv",)}),
]

#: Every case by name.
CASES: dict[str, TinyCase] = {case.name: case for case in _CASES}
