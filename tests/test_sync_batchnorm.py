"""SyncBatchNorm: single-process behaviour, and two gloo processes against one process.

The distributed tests start two CPU processes once per module and kernel (a file rendezvous, a
timeout on the processes and on every collective, so a hang fails instead of blocking): once as
bnsurgery runs by default, the compiled CPU kernels computing each rank's share, and once with
``BNSURGERY_KERNEL=reference``, the pure-tensor building blocks. The processes run every
scenario, save what they computed, and the tests here compare it with ONE process running a plain
BatchNorm on the concatenated batch: float64 runs must agree to rounding, float32 runs may be at
most about as far from the float64 reference as a single float32 process is.

The compiled local steps are also checked one by one against the pure-tensor functions and a
float64 oracle, in one process.
"""

from __future__ import annotations

import copy
import datetime
import inspect
import os
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import AtenOpRecorder
from torch import nn

import bnsurgery.sync_batchnorm as sync_module
from bnsurgery import kernel_cpp, kernels
from bnsurgery.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d
from bnsurgery.calibrate import calibrate_batchnorm
from bnsurgery.errors import InvalidInputError, KernelUnavailableError
from bnsurgery.functional import batch_norm
from bnsurgery.replace import convert_sync_batchnorm
from bnsurgery.sync_batchnorm import SyncBatchNorm, SyncBatchNormAct

WORLD = 2
PROCESS_TIMEOUT_S = 150  # the whole two-process run; a hang fails the tests after this
COLLECTIVE_TIMEOUT_S = 60  # each gloo collective

TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


# --------------------------------------------------------------------------------------------
# Single process: no process group, so no synchronisation.
# --------------------------------------------------------------------------------------------

def _torch_bn_for(x: torch.Tensor) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]


def _bnsurgery_bn_for(x: torch.Tensor) -> type[nn.Module]:
    return {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}[x.dim()]


def _calibrated_pair(num_features, example, **kwargs):
    """A torch BatchNorm with realistic state, and a SyncBatchNorm holding the same state."""
    torch_bn = _torch_bn_for(example)(num_features, **kwargs).to(example.dtype)
    torch_bn = calibrate_batchnorm(nn.Sequential(torch_bn), example)[0]
    sync_bn = SyncBatchNorm(num_features, **kwargs).to(example.dtype)
    sync_bn.load_state_dict(torch_bn.state_dict())
    return torch_bn, sync_bn


def _step(module, x, grad):
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad)
    grads = [p.grad.clone() for p in module.parameters()]
    return y.detach(), x.grad, grads, [b.clone() for b in module.buffers()]


LOCAL_CASES = {
    "2d-train": dict(shape=(6, 5), train=True),
    "3d-train": dict(shape=(4, 5, 7), train=True),
    "4d-train": dict(shape=(4, 5, 3, 3), train=True),
    "5d-train": dict(shape=(2, 5, 3, 2, 3), train=True),
    "4d-eval": dict(shape=(4, 5, 3, 3), train=False),
    "4d-momentum_none": dict(shape=(4, 5, 3, 3), train=True, momentum=None),
    "4d-no_affine_no_stats": dict(shape=(4, 5, 3, 3), train=True, affine=False,
                                  track_running_stats=False),
    "4d-no_stats-eval": dict(shape=(4, 5, 3, 3), train=False, track_running_stats=False),
    "4d-float64": dict(shape=(4, 5, 3, 3), train=True, dtype=torch.float64),
}


@pytest.mark.parametrize("case", LOCAL_CASES.values(), ids=LOCAL_CASES.keys())
def test_without_process_group_matches_torch_batchnorm(case):
    case = dict(case)
    shape, train = case.pop("shape"), case.pop("train")
    dtype = case.pop("dtype", torch.float32)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    torch_bn, sync_bn = _calibrated_pair(shape[1], x, **case)
    torch_bn.train(train)
    sync_bn.train(train)
    for step in range(2):  # two steps: the running statistics are read back after an update
        x = torch.randn(shape, dtype=dtype) * 2 + step
        grad = torch.randn(shape, dtype=dtype)
        expected, got = _step(torch_bn, x, grad), _step(sync_bn, x, grad)
        for exp, act in zip(expected, got, strict=True):
            torch.testing.assert_close(act, exp, **TOL[dtype])


def test_without_process_group_equals_bnsurgery_batchnorm_bit_for_bit():
    x = torch.randn(4, 6, 5, 5) * 3 + 2
    grad = torch.randn_like(x)
    plain = calibrate_batchnorm(nn.Sequential(BatchNorm2d(6)), x)[0]
    synced = SyncBatchNorm(6)
    synced.load_state_dict(plain.state_dict())
    for exp, act in zip(_step(plain, x, grad), _step(synced, x, grad), strict=True):
        torch.testing.assert_close(act, exp, rtol=0, atol=0)


def test_uses_no_torch_batch_norm_kernel():
    sync_bn = SyncBatchNorm(3)
    x = torch.randn(4, 3, 5, requires_grad=True)
    with AtenOpRecorder() as recorder:
        sync_bn(x).square().sum().backward()
        sync_bn.eval()(x)
    assert recorder.batch_norm_ops() == []


def test_constructor_and_state_dict_match_torch_syncbatchnorm():
    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]
    x = torch.randn(8, 4, 3, 3)
    torch_sync = calibrate_batchnorm(nn.Sequential(nn.SyncBatchNorm(4, momentum=None)), x)[0]
    ours_bn = SyncBatchNorm(4, momentum=None)
    ours_bn.load_state_dict(torch_sync.state_dict())
    back = nn.SyncBatchNorm(4, momentum=None)
    back.load_state_dict(ours_bn.state_dict())
    assert list(ours_bn.state_dict()) == list(torch_sync.state_dict())
    for key, value in torch_sync.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # Not a torch SyncBatchNorm on purpose: DDP rejects those in CPU models (see the DDP test).
    assert not isinstance(ours_bn, nn.SyncBatchNorm)
    assert [p.kind for p in ours.values()] == [p.kind for p in theirs.values()]


def test_instance_built_without_init_from_a_batchnorm_works():
    """How replace_batchnorm builds it: torch's attributes only, no __init__."""
    x = torch.randn(6, 4)
    plain = calibrate_batchnorm(nn.Sequential(BatchNorm1d(4)), x)[0]
    synced = SyncBatchNorm.__new__(SyncBatchNorm)
    synced.__dict__.update(copy.copy(plain).__dict__)
    synced.process_group = None
    reference = copy.deepcopy(plain)
    for train in (True, False):
        synced.train(train)
        reference.train(train)
        torch.testing.assert_close(synced(x), reference(x), rtol=0, atol=0)
    # Unlike BatchNorm1d, a SyncBatchNorm takes any rank from 2 up.
    assert synced(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_sync_batchnorm_act_applies_drop_then_act_like_batchnorm_act2d(train):
    x = torch.randn(4, 6, 5, 5)
    order = []

    class Recorder(nn.Module):
        def __init__(self, name, fn):
            super().__init__()
            self.name, self.fn = name, fn

        def forward(self, t):
            order.append(self.name)
            return self.fn(t)

    plain = BatchNormAct2d(6, act=nn.SiLU(), drop=nn.Identity())
    plain = calibrate_batchnorm(nn.Sequential(plain), x)[0].train(train)
    synced = SyncBatchNormAct(6, act=Recorder("act", F.silu), drop=Recorder("drop", lambda t: t))
    synced.load_state_dict(plain.state_dict())
    synced.train(train)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    assert order == ["drop", "act"]
    # A converted timm SyncBatchNormAct may lack the children; it then only normalises.
    bare = SyncBatchNormAct(6)
    del bare.drop, bare.act
    assert torch.equal(bare.eval()(x), SyncBatchNorm(6).eval()(x))


def test_replace_batchnorm_sync_round_trip():
    from bnsurgery.replace import replace_batchnorm, restore_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          BatchNormAct2d(4, act=nn.ReLU()))
    x = torch.randn(4, 3, 8, 8)
    model = calibrate_batchnorm(model, x).eval()
    synced = replace_batchnorm(model, sync=True)
    assert [type(m).__name__ for m in synced][1::2] == ["SyncBatchNorm", "SyncBatchNormAct"]
    assert isinstance(synced[1], SyncBatchNorm) and isinstance(synced[1], nn.BatchNorm2d)
    assert isinstance(synced[3], SyncBatchNormAct) and isinstance(synced[3], BatchNormAct2d)
    torch.testing.assert_close(synced(x), model(x), rtol=1e-5, atol=1e-6)
    synced.train()(x)  # no process group: a local training step
    restored = restore_batchnorm(synced)
    assert [type(m) for m in restored][1::2] == [nn.BatchNorm2d, BatchNormAct2d]


def test_convert_sync_batchnorm_builds_bnsurgery_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    converted = convert_sync_batchnorm(model)
    assert converted is model and isinstance(converted[1], SyncBatchNorm)
    assert converted[1].process_group is None


def test_process_group_without_initialised_distributed_raises():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("this process already has an initialised process group")
    layer = SyncBatchNorm(4, process_group=object())
    with pytest.raises(InvalidInputError, match="torch.distributed is not initialised"):
        layer(torch.randn(4, 4))
    # Evaluation needs no process group, so it still works.
    assert layer.eval()(torch.randn(4, 4)).shape == (4, 4)


@pytest.mark.parametrize(("shape", "match"), [((4,), "needs an input with a channel dimension"),
                                              ((4, 3, 2), "got the wrong number of channels")],
                         ids=["1d-input", "wrong-channels"])
def test_bad_input_without_process_group(shape, match):
    with pytest.raises(InvalidInputError, match=match):
        SyncBatchNorm(4)(torch.randn(shape))


def test_merge_is_exact_where_sum_of_squares_is_not():
    """Chan's merge of per-rank (n, sum, M2) against E[x^2] - E[x]^2, in float32."""
    gen = torch.Generator().manual_seed(0)
    # float32-representable values, so the float64 results below are the exact answer.
    chunks = [(1e3 + 0.1 * torch.randn(n, 3, generator=gen) + shift).double()
              for n, shift in ((3, 0.0), (0, 0.0), (5, 0.2), (7, -0.1))]
    full = torch.cat(chunks)
    exact_var, exact_mean = torch.var_mean(full, dim=0, correction=0)

    def rows(dtype):
        counts = torch.tensor([len(c) for c in chunks], dtype=dtype)
        sums = torch.stack([c.to(dtype).sum(0) for c in chunks])
        m2 = torch.stack([((c.to(dtype) - c.to(dtype).mean(0)) ** 2).sum(0) if len(c)
                          else torch.zeros(3, dtype=dtype) for c in chunks])
        squares = torch.stack([c.to(dtype).square().sum(0) for c in chunks])
        return counts, sums, m2, squares

    total, mean, var = sync_module._merge_statistics(*rows(torch.float64)[:3])
    assert total == len(full)
    torch.testing.assert_close(mean, exact_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(var, exact_var, rtol=1e-9, atol=0)
    counts, sums, m2, squares = rows(torch.float32)
    _, _, var32 = sync_module._merge_statistics(counts, sums, m2)
    naive32 = squares.sum(0) / len(full) - (sums.sum(0) / len(full)) ** 2
    merge_error = (var32.double() - exact_var).abs().max() / exact_var.max()
    naive_error = (naive32.double() - exact_var).abs().max() / exact_var.max()
    assert merge_error < 1e-3  # measured 2.6e-4: float32 sums of values near 1e3
    assert naive_error > 0.1  # measured 3.5: every digit lost


# --------------------------------------------------------------------------------------------
# The compiled local steps (bnsurgery/csrc/sync_cpu.cpp) against the pure-tensor ones.
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled():
    try:
        kernel_cpp.build()
    except KernelUnavailableError as exc:
        pytest.skip(f"the C++ kernel cannot be built here: {exc}")
    return kernel_cpp


STEP_INPUTS = {  # shape, layout: both memory paths of the kernel, several blocks and parts
    "2d": ((64, 5), "contiguous"),
    "2d-many_rows": ((4096, 64), "contiguous"),
    "3d": ((4, 5, 33), "contiguous"),
    "4d": ((3, 5, 7, 9), "contiguous"),
    "4d-wide": ((8, 16, 32, 32), "contiguous"),
    "4d-channels_last": ((3, 5, 7, 9), "channels_last"),
    "5d-channels_last": ((2, 5, 3, 4, 5), "channels_last"),
    "4d-strided": ((3, 5, 7, 9), "strided"),
}
STEP_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
               "bfloat16": torch.bfloat16}
# Against the float64 oracle, relative to the largest magnitude of the quantity.
ORACLE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3,
               torch.bfloat16: 3e-2}


def _step_input(shape, layout, dtype, offset=1.0, spread=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * spread + offset
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    elif layout == "strided":  # every other value of a twice-as-long last dimension
        x = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
    return x.to(dtype)


def _dims(x):
    return [0, *range(2, x.dim())]


def _oracle_close(actual, reference, oracle, dtype, what):
    """float64: equal to the pure-tensor result to rounding. Lower precision: within the dtype's
    tolerance of the float64 oracle, and no further from it than the pure-tensor result (times
    two, plus a few roundings of the largest value)."""
    scale = max(oracle.abs().max().item(), 1e-30)
    if dtype == torch.float64:
        torch.testing.assert_close(actual, reference, rtol=1e-12, atol=1e-12 * scale, msg=what)
    error = _max_error(actual, oracle) / scale
    assert error <= ORACLE_RTOL[dtype], f"{what}: relative error {error:.3g}"
    reference_error = _max_error(reference, oracle) / scale
    floor = 4 * torch.finfo(dtype).eps
    assert error <= 2 * reference_error + floor, (
        f"{what}: error {error:.3g}, the pure-tensor path's {reference_error:.3g}")


def _global_statistics(x, seed=1):
    """Float64 statistics as another rank would make them global: shifted and widened."""
    gen = torch.Generator().manual_seed(seed)
    x64 = x.double()
    channels = x.shape[1]
    mean = x64.mean(_dims(x)) + 0.3 * torch.randn(channels, generator=gen, dtype=torch.float64)
    var = x64.var(_dims(x), correction=0) * (1 + torch.rand(channels, generator=gen,
                                                            dtype=torch.float64))
    return mean, var


def _affine(x, seed=2):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    channels = x.shape[1]
    return (torch.rand(channels, generator=gen).to(dtype) + 0.5,
            torch.randn(channels, generator=gen).to(dtype))


def _check_statistics(compiled, x):
    count, sums, sq_devs = compiled.sync_statistics(x)
    reference = sync_module._rank_statistics(x)
    x64 = x.double()
    oracle_sq = (x64 - x64.mean(_dims(x), keepdim=True)).square().sum(_dims(x))
    assert count == reference.count == x.numel() // x.shape[1]
    assert sums.dtype == sq_devs.dtype == torch.float64
    _oracle_close(sums, reference.sums, x64.sum(_dims(x)), x.dtype, "sums")
    _oracle_close(sq_devs, reference.sq_devs, oracle_sq, x.dtype, "squared deviations")


def _check_normalise(compiled, x, weight, bias, eps=1e-5):
    mean64, var64 = _global_statistics(x)
    y, mean, residual, invstd = compiled.sync_normalise(x, mean64, var64, weight, bias, eps)
    acc = kernels.kernel_tensor.accumulate_dtype(x.dtype)
    expected = sync_module._global_factors(mean64, var64, x.shape[1], eps, acc)
    for got, exp, what in zip((mean, residual, invstd), expected,
                              ("mean", "mean residual", "invstd"), strict=True):
        assert got.dtype == acc, what
        torch.testing.assert_close(got, exp, rtol=2 * torch.finfo(acc).eps, atol=0, msg=what)
    reference = sync_module._normalise(x, sync_module._rank_statistics(x), mean64, expected[2],
                                       weight, bias)
    view = [1, -1] + [1] * (x.dim() - 2)
    oracle = (x.double() - mean64.view(view)) * (var64 + eps).rsqrt().view(view)
    if weight is not None:
        oracle = oracle * weight.double().view(view) + bias.double().view(view)
    assert y.dtype == x.dtype
    if x.is_contiguous() or x.dim() < 4 or x.is_contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d):
        assert y.stride() == x.stride()
    _oracle_close(y, reference, oracle, x.dtype, "y")
    return mean64, mean, residual, invstd


def _check_backward(compiled, x, weight, mean64, mean, residual, invstd, seed=3):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    sum_dy, sum_dy_xmu = compiled.sync_gradient_sums(grad, x, mean, residual)
    ref_dy, ref_dy_xmu, scratch, g = sync_module._gradient_sums(grad, x, mean, residual)
    view = [1, -1] + [1] * (x.dim() - 2)
    centred64 = x.double() - (mean.double() + residual.double()).view(view)
    g64 = grad.double()
    _oracle_close(sum_dy, ref_dy, g64.sum(_dims(x)), x.dtype, "sum(g)")
    _oracle_close(sum_dy_xmu, ref_dy_xmu, (g64 * centred64).sum(_dims(x)), x.dtype,
                  "sum(g * (x - mean))")
    # The global sums: this rank's plus another rank's, over twice the values.
    total = 2 * (x.numel() // x.shape[1])
    global_dy = sum_dy * 2 + 0.5
    global_dy_xmu = sum_dy_xmu * 2 - 0.25
    grad_x = compiled.sync_input_gradient(grad, x, weight, mean, residual, invstd, global_dy,
                                          global_dy_xmu, total)
    reference = sync_module._input_gradient(x, g, scratch, weight, mean, residual, invstd,
                                            global_dy, global_dy_xmu, total)
    a = invstd.double() * (1 if weight is None else weight.double())
    b = -a * invstd.double().square() * global_dy_xmu / total
    c = -a * global_dy / total
    oracle = a.view(view) * g64 + b.view(view) * centred64 + c.view(view)
    assert grad_x.dtype == x.dtype and grad_x.shape == x.shape
    _oracle_close(grad_x, reference, oracle, x.dtype, "grad_x")


@pytest.mark.parametrize("dtype", STEP_DTYPES.values(), ids=STEP_DTYPES.keys())
@pytest.mark.parametrize(("shape", "layout"), STEP_INPUTS.values(), ids=STEP_INPUTS.keys())
def test_compiled_local_steps_match_the_pure_tensor_ones(compiled, shape, layout, dtype):
    x = _step_input(shape, layout, dtype)
    _check_statistics(compiled, x)
    for weight, bias in (_affine(x), (None, None)):
        factors = _check_normalise(compiled, x, weight, bias)
        _check_backward(compiled, x, weight, *factors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("shape", "layout"), [((6, 3, 8, 8), "contiguous"),
                                               ((6, 3, 8, 8), "channels_last"),
                                               ((512, 3), "contiguous")],
                         ids=["rows", "channels_last", "2d"])
def test_compiled_local_steps_keep_digits_with_a_mean_far_above_the_spread(compiled, shape,
                                                                          layout, dtype):
    """A mean 1e4 times the spread: E[x^2] - E[x]^2 would lose every digit of the variance in
    float32; the corrected sums keep it, and the rounding of the mean is taken back out."""
    x = _step_input(shape, layout, dtype, offset=1e4, spread=1.0, seed=4)
    _check_statistics(compiled, x)
    weight, bias = _affine(x)
    _check_backward(compiled, x, weight, *_check_normalise(compiled, x, weight, bias))
    if dtype == torch.float32:  # the premise: in float32 the rounded mean is off
        mean = compiled.sync_normalise(x, *_global_statistics(x), None, None, 1e-5)[1]
        assert mean.double().ne(_global_statistics(x)[0]).all()


def test_local_steps_run_in_the_compiled_kernels(compiled, monkeypatch):
    """One synced training step with a world of one (the collectives made identities): the
    compiled steps run by default and the pure-tensor ones when forced, with the same result as
    a plain BatchNorm on the batch."""
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None: None)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, 5, generator=gen) * 2 + 1
    grad = torch.randn(4, 3, 5, 5, generator=gen)
    weight, bias = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    results = {}
    for kernel in ("auto", "reference", "plain"):
        monkeypatch.setenv(kernels.ENV_VAR, "reference" if kernel == "reference" else "auto")
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, weight, bias))
        running = [torch.zeros(3), torch.ones(3)]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            if kernel == "plain":
                y = batch_norm(xg, *running, wg, bg, True, 0.1, 1e-5)
            else:
                y = sync_module._SyncBatchNormFunction.apply(
                    xg, wg, bg, *running, 1e-5, 0.1, None, 1, 0, 3, "layer")
            y.backward(grad)
        ran = {event.name for event in prof.events()}
        sync_ops = set(kernel_cpp.SYNC_OPERATORS) & ran
        assert sync_ops == (set(kernel_cpp.SYNC_OPERATORS) if kernel == "auto" else set())
        results[kernel] = [y, xg.grad, wg.grad, bg.grad, *running]
    for kernel in ("auto", "reference"):
        for got, exp in zip(results[kernel], results["plain"], strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6, msg=kernel)


# --------------------------------------------------------------------------------------------
# Two processes (gloo on CPU).
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCase:
    """One layer trained for a few steps on a batch split unevenly over two ranks."""

    sizes: tuple[int, int]
    shape: tuple[int, ...]  # per sample: (C, *spatial)
    dtype: torch.dtype = torch.float32
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    offset: float = 1.0  # added to the inputs; large offsets test the merge's exactness


LAYER_CASES = {
    "uneven_3_5-4d-float32": LayerCase((3, 5), (4, 5, 6)),
    "uneven_3_5-4d-float64": LayerCase((3, 5), (4, 5, 6), torch.float64),
    "empty_rank_0_6-4d-float32": LayerCase((0, 6), (4, 5, 6)),
    "empty_rank_6_0-4d-float64": LayerCase((6, 0), (4, 5, 6), torch.float64),
    "uneven_3_5-2d-float64": LayerCase((3, 5), (4,), torch.float64),
    "uneven_2_4-5d-float64": LayerCase((2, 4), (3, 2, 3, 2), torch.float64),
    "one_each-3d-momentum_none-float64": LayerCase((1, 1), (4, 7), torch.float64, None),
    "uneven_3_5-no_affine_no_stats-float64": LayerCase((3, 5), (4, 3, 3), torch.float64,
                                                       affine=False, track_running_stats=False),
    "uneven_3_5-large_offset-float32": LayerCase((3, 5), (4, 5, 6), offset=1e3),
}
LAYER_STEPS = 2


def _layer_payload(case: LayerCase, seed: int) -> dict:
    """Initial state and every step's global input and output gradient, made once, shared."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(case.sizes)
    shape = (total, *case.shape)
    channels = case.shape[0]

    def draw():
        # Per-sample shifts make the two ranks' means differ: the merge's between-rank term.
        shift = torch.randn(total, *([1] * len(case.shape)), generator=gen, dtype=torch.float64)
        return (case.offset + shift + torch.randn(shape, generator=gen, dtype=torch.float64)
                ).to(case.dtype)

    template = _torch_bn_for(torch.empty(shape))(
        channels, momentum=case.momentum, affine=case.affine,
        track_running_stats=case.track_running_stats)
    template = calibrate_batchnorm(nn.Sequential(template), torch.randn(shape), seed=seed)[0]
    steps = [{"input": draw(), "grad": torch.randn(shape, generator=gen, dtype=torch.float64
                                                   ).to(case.dtype)}
             for _ in range(LAYER_STEPS)]
    return {"state": template.to(case.dtype).state_dict(), "steps": steps, "eval_input": draw()}


def _rank_slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _run_layer_case(rank, case: LayerCase, payload: dict, device: str = "cpu") -> dict:
    layer = SyncBatchNorm(case.shape[0], momentum=case.momentum, affine=case.affine,
                          track_running_stats=case.track_running_stats).to(device, case.dtype)
    layer.load_state_dict(payload["state"])
    part = _rank_slice(case.sizes, rank)
    steps = []
    for step in payload["steps"]:
        output, grad_input, grads, buffers = _step(layer, step["input"][part].to(device),
                                                   step["grad"][part].to(device))
        steps.append({"output": output, "grad_input": grad_input, "grads": grads,
                      "buffers": buffers})
    with torch.no_grad():
        eval_output = layer.eval()(payload["eval_input"][part].to(device))
    return _to_cpu({"steps": steps, "eval_output": eval_output})


def _reference_layer_run(case: LayerCase, payload: dict, dtype: torch.dtype,
                         implementation: str = "torch") -> dict:
    """ONE process, ONE torch (or bnsurgery) BatchNorm, the concatenated batch."""
    shape = (sum(case.sizes), *case.shape)
    classes = _torch_bn_for if implementation == "torch" else _bnsurgery_bn_for
    layer = classes(torch.empty(shape))(
        case.shape[0], momentum=case.momentum, affine=case.affine,
        track_running_stats=case.track_running_stats).to(dtype)
    layer.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                           for k, v in payload["state"].items()})
    steps = []
    for step in payload["steps"]:
        output, grad_input, grads, buffers = _step(layer, step["input"].to(dtype),
                                                   step["grad"].to(dtype))
        steps.append({"output": output, "grad_input": grad_input, "grads": grads,
                      "buffers": buffers})
    eval_input = payload["eval_input"].to(dtype)
    with torch.no_grad():
        layer.eval()
        if case.track_running_stats:
            eval_output = layer(eval_input)
        else:  # batch statistics in eval, but evaluation never synchronises: one per rank
            eval_output = torch.cat([layer(eval_input[_rank_slice(case.sizes, rank)])
                                     for rank in range(WORLD) if case.sizes[rank]])
    return {"steps": steps, "eval_output": eval_output}


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU blocks and a linear head: BN before and after a stride."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


DDP_SPLITS = [(3, 5), (0, 8), (6, 2)]  # per-step batch sizes of rank 0 and rank 1
DDP_LR, DDP_MOMENTUM = 0.1, 0.9


def _ddp_payload() -> dict:
    torch.manual_seed(0)
    model = calibrate_batchnorm(SmallCNN(), torch.randn(8, 3, 8, 8))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(sum(s), 3, 8, 8, generator=gen),
                torch.randint(0, 5, (sum(s),), generator=gen)) for s in DDP_SPLITS]
    return {"state": model.state_dict(), "batches": batches}


def _global_loss(logits, target, global_count):
    """Each rank's share of the mean loss over the global batch, times the world size: DDP
    averages gradients over ranks, so the step equals one on the mean over the whole batch."""
    return F.cross_entropy(logits, target, reduction="sum") / global_count * WORLD


def _run_ddp(rank, payload: dict, device: str = "cpu") -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from bnsurgery.replace import replace_batchnorm

    model = SmallCNN()
    model.load_state_dict(payload["state"])
    model = replace_batchnorm(model, sync=True).to(device)
    types = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
    device_ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=DDP_LR, momentum=DDP_MOMENTUM)
    for (x, target), sizes in zip(payload["batches"], DDP_SPLITS, strict=True):
        part = _rank_slice(sizes, rank)
        optimizer.zero_grad()
        _global_loss(ddp(x[part].to(device)), target[part].to(device), sum(sizes)).backward()
        optimizer.step()
    return {"state": _to_cpu(model.state_dict()), "types": types}


def _reference_training(payload: dict, dtype: torch.dtype) -> dict:
    model = SmallCNN().to(dtype)
    model.load_state_dict(payload["state"])
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR, momentum=DDP_MOMENTUM)
    for x, target in payload["batches"]:
        optimizer.zero_grad()
        F.cross_entropy(model(x.to(dtype)), target).backward()
        optimizer.step()
    return model.state_dict()


def _run_error_cases(rank) -> dict:
    """Bad inputs on one rank: every rank must raise the same error, and the group survive."""
    results = {}

    def attempt(name, fn):
        try:
            results[name] = {"result": fn()}
        except Exception as exc:  # recorded and checked by the tests
            results[name] = {"error": type(exc).__name__, "message": str(exc)}

    attempt("mismatched_channels",
            lambda: SyncBatchNorm(4)(torch.randn(3, 4 if rank == 0 else 3, 2, 2)).shape)
    attempt("one_rank_1d_input",
            lambda: SyncBatchNorm(4)(torch.randn(4) if rank == 0 else torch.randn(3, 4)).shape)
    attempt("one_rank_integer_input",
            lambda: SyncBatchNorm(4)(torch.ones(3, 4, dtype=torch.long) if rank == 1
                                     else torch.randn(3, 4)).shape)
    attempt("one_value_per_channel_globally",
            lambda: SyncBatchNorm(4)(torch.randn(1 - rank, 4)).shape)

    def all_empty():
        layer = SyncBatchNorm(4)
        before = [layer.running_mean.clone(), layer.running_var.clone()]
        x = torch.randn(0, 4, 3, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        return {"shape": tuple(y.shape), "grad_shape": tuple(x.grad.shape),
                "unchanged": all(torch.equal(a, b) for a, b in
                                 zip(before, [layer.running_mean, layer.running_var],
                                     strict=True))}

    attempt("all_ranks_empty", all_empty)
    only_rank0 = dist.new_group([0])  # every rank must call new_group, member or not

    def outside_group():
        layer = SyncBatchNorm(4, process_group=only_rank0)
        return tuple(layer(torch.randn(3, 4)).shape)  # rank 0: a world of one, no sync

    attempt("rank_outside_group", outside_group)

    def double_backward():
        x = torch.randn(3 + rank, 4, requires_grad=True)
        (grad,) = torch.autograd.grad(SyncBatchNorm(4)(x).square().sum(), x, create_graph=True)
        grad.sum().backward()

    attempt("double_backward", double_backward)
    return results


def _count_all_reduce(rank) -> dict:
    """all_reduce calls of one synced layer per forward and per backward."""
    original = dist.all_reduce
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer = SyncBatchNorm(4)
    x = torch.randn(2 + rank, 4, 3, 3, requires_grad=True)
    counts = {}
    dist.all_reduce = counting
    try:
        y = layer(x)
        counts["forward"] = len(calls)
        y.square().sum().backward()
        counts["backward"] = len(calls) - counts["forward"]
        calls.clear()
        with torch.no_grad():
            layer(x)
        counts["forward_no_grad"] = len(calls)
        calls.clear()
        layer.eval()(x)
        counts["eval"] = len(calls)
    finally:
        dist.all_reduce = original
    with AtenOpRecorder() as recorder:
        layer.train()(x).sum().backward()
    counts["batch_norm_ops"] = recorder.batch_norm_ops()
    return counts


def _destroyed_group(rank) -> dict:
    group = dist.new_group([0, 1])
    dist.destroy_process_group()
    try:
        SyncBatchNorm(4, process_group=group)(torch.randn(3, 4))
    except InvalidInputError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"result": "no error"}


def _local_kernel_ops(rank) -> dict:
    """The backend chosen for a CPU input, and every operator one synced training step ran
    (the profiler sees operators called from C++ too)."""
    layer = SyncBatchNorm(4)
    x = torch.randn(3 + rank, 4, 5, 5, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        layer(x).square().sum().backward()
    return {"backend": kernels.select_backend(x.detach()).__name__,
            "ops": sorted({event.name for event in profile.events()})}


def _worker(rank: int, directory: str, layer_cases: list[str], kernel: str) -> None:
    """One rank: every scenario in order, each result saved for the parent to check."""
    torch.set_num_threads(1)
    if kernel == "reference":
        os.environ[kernels.ENV_VAR] = "reference"
    else:  # as bnsurgery runs by default: the compiled kernel, built by the parent
        os.environ.pop(kernels.ENV_VAR, None)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank,
                            world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}

    def run(name, fn, *args):
        try:
            results[name] = fn(*args)
        except Exception:  # recorded: a failing scenario must not hide the others
            results[name] = {"crash": traceback.format_exc()}

    run("errors", _run_error_cases, rank)  # first: the layer cases then prove the group survived
    payloads = torch.load(os.path.join(directory, "payloads.pt"), weights_only=False)
    for name in layer_cases:
        run(name, _run_layer_case, rank, LAYER_CASES[name], payloads[name])
    run("ddp", _run_ddp, rank, payloads["ddp"])
    run("all_reduce_counts", _count_all_reduce, rank)
    run("local_kernels", _local_kernel_ops, rank)
    run("destroyed_group", _destroyed_group, rank)  # last: it tears the process group down
    torch.save(results, os.path.join(directory, f"results_{rank}.pt"))


def _payloads(directory: str) -> dict:
    payloads = {name: _layer_payload(case, seed) for seed, (name, case)
                in enumerate(LAYER_CASES.items())}
    payloads["ddp"] = _ddp_payload()
    torch.save(payloads, os.path.join(directory, "payloads.pt"))
    return payloads


def _spawn(target, directory: str, *args, world: int = WORLD) -> list[dict]:
    """Run ``target(rank, directory, *args)`` in ``world`` fresh processes; their saved results.

    Bounded by PROCESS_TIMEOUT_S: a hang fails the test instead of blocking the suite.
    """
    context = mp.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, directory, *args))
                 for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(PROCESS_TIMEOUT_S)
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
        process.join()
    if hung:
        pytest.fail(f"the {world}-process run did not finish within {PROCESS_TIMEOUT_S} s")
    codes = [p.exitcode for p in processes]
    if codes != [0] * world:
        pytest.fail(f"worker processes exited with codes {codes}")
    return [torch.load(os.path.join(directory, f"results_{rank}.pt"), weights_only=False)
            for rank in range(world)]


@pytest.fixture(scope="module", params=["cpp", "reference"])
def distributed(request, tmp_path_factory):
    """Start two gloo processes once per kernel; return ``(payloads, [results of rank 0,
    rank 1], kernel)``."""
    kernel = request.param
    if kernel == "cpp":
        try:  # here, once: two processes building it at once would wait on each other
            kernel_cpp.build()
        except KernelUnavailableError as exc:
            pytest.skip(f"the C++ kernel cannot be built here: {exc}")
    directory = str(tmp_path_factory.mktemp(f"sync_batchnorm_{kernel}"))
    payloads = _payloads(directory)
    return payloads, _spawn(_worker, directory, list(LAYER_CASES), kernel), kernel


def _result(distributed, name):
    results = distributed[1]
    for rank, result in enumerate(results):
        if isinstance(result[name], dict) and "crash" in result[name]:
            pytest.fail(f"rank {rank} crashed in '{name}':\n{result[name]['crash']}")
    return [result[name] for result in results]


def _max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def _assert_matches(actual, expected, reference64, dtype, what):
    """float64: rounding-level agreement. float32: no further from float64 than one process."""
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, **TOL[dtype], msg=what)
        return
    ours = _max_error(actual, reference64)
    single = _max_error(expected, reference64)
    floor = 1e-6 * max(1.0, reference64.abs().max().item() if reference64.numel() else 1.0)
    assert ours <= 2 * single + floor, (
        f"{what}: error {ours:.3g} vs one float32 process {single:.3g}")


@pytest.mark.parametrize("name", LAYER_CASES, ids=LAYER_CASES)
def test_two_ranks_match_one_process_on_the_concatenated_batch(distributed, name):
    _check_layer_case(name, distributed[0], _result(distributed, name))


def _check_layer_case(name: str, payloads: dict, ranks: list[dict]) -> None:
    case = LAYER_CASES[name]
    # float64: torch's BatchNorm to rounding. float32: no worse than bnsurgery's own BatchNorm in
    # one process, whose per-element maths the synced layer shares.
    expected = _reference_layer_run(case, payloads[name], case.dtype,
                                    "torch" if case.dtype == torch.float64 else "bnsurgery")
    reference64 = _reference_layer_run(case, payloads[name], torch.float64)
    for index, (exp, ref) in enumerate(zip(expected["steps"], reference64["steps"],
                                           strict=True)):
        got = [rank["steps"][index] for rank in ranks]
        for key in ("output", "grad_input"):
            _assert_matches(torch.cat([g[key] for g in got]), exp[key], ref[key], case.dtype,
                            f"step {index} {key}")
        for p, (exp_grad, ref_grad) in enumerate(zip(exp["grads"], ref["grads"], strict=True)):
            summed = sum(g["grads"][p] for g in got)  # DDP would average these over ranks
            _assert_matches(summed, exp_grad, ref_grad, case.dtype, f"step {index} grad {p}")
        for b, (exp_buf, ref_buf) in enumerate(zip(exp["buffers"], ref["buffers"], strict=True)):
            for rank, g in enumerate(got):  # identical on every rank, and equal to one process
                if exp_buf.is_floating_point():
                    _assert_matches(g["buffers"][b], exp_buf, ref_buf, case.dtype,
                                    f"step {index} rank {rank} buffer {b}")
                else:
                    assert torch.equal(g["buffers"][b], exp_buf)
    _assert_matches(torch.cat([r["eval_output"] for r in ranks]), expected["eval_output"],
                    reference64["eval_output"], case.dtype, "eval output")


def test_large_offset_keeps_float32_accuracy(distributed):
    """Values of 1000 +- 1: the corrected per-rank means, the exact merge and the mean's rounding
    residual in the backward keep every result within a few float32 roundings of float64, where
    one float32 process loses up to three more digits in the weight gradient."""
    name = "uneven_3_5-large_offset-float32"
    case, payloads = LAYER_CASES[name], distributed[0]
    ranks = _result(distributed, name)
    reference64 = _reference_layer_run(case, payloads[name], torch.float64)
    for index, ref in enumerate(reference64["steps"]):
        got = [rank["steps"][index] for rank in ranks]
        pairs = {"output": (torch.cat([g["output"] for g in got]), ref["output"]),
                 "grad_input": (torch.cat([g["grad_input"] for g in got]), ref["grad_input"]),
                 "grad_weight": (sum(g["grads"][0] for g in got), ref["grads"][0]),
                 "grad_bias": (sum(g["grads"][1] for g in got), ref["grads"][1])}
        for what, (actual, expected) in pairs.items():
            relative = _max_error(actual, expected) / expected.abs().max().item()
            assert relative < 2e-6, f"step {index} {what}: relative error {relative:.3g}"


def test_ddp_training_with_synced_bn_matches_one_process(distributed):
    _check_ddp(distributed[0], _result(distributed, "ddp"))


def _check_ddp(payloads: dict, ranks: list[dict]) -> None:
    assert ranks[0]["types"] == ["SyncBatchNorm"]
    expected = _reference_training(payloads["ddp"], torch.float32)
    reference64 = _reference_training(payloads["ddp"], torch.float64)
    assert list(ranks[0]["state"]) == list(expected)
    for key, exp in expected.items():
        for rank in ranks:
            if exp.is_floating_point():
                _assert_matches(rank["state"][key], exp, reference64[key], torch.float32, key)
            else:
                assert torch.equal(rank["state"][key], exp), key


def test_one_all_reduce_per_forward_and_per_backward(distributed):
    for counts in _result(distributed, "all_reduce_counts"):
        assert counts["forward"] == 1
        assert counts["backward"] == 1
        assert counts["forward_no_grad"] == 1
        assert counts["eval"] == 0
        assert counts["batch_norm_ops"] == []


def test_local_steps_run_on_the_selected_kernel(distributed):
    kernel = distributed[2]
    for rank in _result(distributed, "local_kernels"):
        assert rank["backend"] == kernels.BACKENDS[kernel]
        ran = set(rank["ops"])
        if kernel == "cpp":
            assert set(kernel_cpp.SYNC_OPERATORS) <= ran
        else:
            assert not {op for op in ran if op.startswith("bnsurgery::cpp_")}
        assert not {op for op in ran if "batch_norm" in op and not op.startswith("bnsurgery::")}


ERROR_CASES = {
    "mismatched_channels": "rank 1: 3 channels instead of 4",
    "one_rank_1d_input": "rank 0: a 1-D input",
    "one_rank_integer_input": "rank 1: not a floating-point tensor",
    "one_value_per_channel_globally": "more than one value per channel across all ranks",
}


@pytest.mark.parametrize("name", ERROR_CASES, ids=ERROR_CASES)
def test_bad_input_on_one_rank_raises_on_every_rank(distributed, name):
    errors = [rank[name] for rank in _result(distributed, "errors")]
    for rank, error in enumerate(errors):
        assert error.get("error") == "InvalidInputError", f"rank {rank}: {error}"
        assert ERROR_CASES[name] in error["message"], error["message"]
        assert "Hint:" in error["message"]
    assert errors[0]["message"] == errors[1]["message"]


def test_all_ranks_empty_gives_empty_output_and_keeps_statistics(distributed):
    for rank in _result(distributed, "errors"):
        assert rank["all_ranks_empty"]["result"] == {"shape": (0, 4, 3), "grad_shape": (0, 4, 3),
                                                     "unchanged": True}


def test_double_backward_raises(distributed):
    for rank in _result(distributed, "errors"):
        assert rank["double_backward"]["error"] == "RuntimeError"
        assert "differentiate twice" in rank["double_backward"]["message"]


def test_process_outside_the_group_raises(distributed):
    rank0, rank1 = (rank["rank_outside_group"] for rank in _result(distributed, "errors"))
    assert rank0 == {"result": (3, 4)}
    assert rank1["error"] == "InvalidInputError"
    assert "outside its process group" in rank1["message"]


def test_process_group_after_destroy_raises(distributed):
    for rank in _result(distributed, "destroyed_group"):
        assert rank["error"] == "InvalidInputError"
        assert "torch.distributed is not initialised" in rank["message"]


# --------------------------------------------------------------------------------------------
# CUDA: two processes (NCCL with a GPU each, or gloo sharing one GPU), and NCCL's collective.
# --------------------------------------------------------------------------------------------

CUDA_LAYER_CASES = ["uneven_3_5-4d-float32", "uneven_3_5-4d-float64",
                    "empty_rank_0_6-4d-float32", "uneven_3_5-large_offset-float32"]


def _cuda_backend() -> str:
    # NCCL refuses two ranks on one GPU; gloo reduces CUDA tensors too.
    return "nccl" if torch.cuda.device_count() >= WORLD else "gloo"


def _cuda_worker(rank: int, directory: str, backend: str) -> None:
    device = f"cuda:{rank % torch.cuda.device_count()}"
    torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{directory}/rendezvous", rank=rank,
                            world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    payloads = torch.load(os.path.join(directory, "payloads.pt"), weights_only=False)
    results = {}
    for name in CUDA_LAYER_CASES:
        try:
            results[name] = _run_layer_case(rank, LAYER_CASES[name], payloads[name], device)
        except Exception:  # recorded: a failing scenario must not hide the others
            results[name] = {"crash": traceback.format_exc()}
    try:
        results["ddp"] = _run_ddp(rank, payloads["ddp"], device)
    except Exception:
        results["ddp"] = {"crash": traceback.format_exc()}
    dist.destroy_process_group()
    torch.save(results, os.path.join(directory, f"results_{rank}.pt"))


@pytest.fixture(scope="module")
def distributed_cuda(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    directory = str(tmp_path_factory.mktemp("sync_batchnorm_cuda"))
    payloads = _payloads(directory)
    return payloads, _spawn(_cuda_worker, directory, _cuda_backend())


@pytest.mark.gpu
@pytest.mark.parametrize("name", CUDA_LAYER_CASES, ids=CUDA_LAYER_CASES)
def test_cuda_two_ranks_match_one_process(distributed_cuda, name):
    _check_layer_case(name, distributed_cuda[0], _result(distributed_cuda, name))


@pytest.mark.gpu
def test_cuda_ddp_training_with_synced_bn_matches_one_process(distributed_cuda):
    _check_ddp(distributed_cuda[0], _result(distributed_cuda, "ddp"))


def _nccl_worker(rank: int, directory: str) -> None:
    """A world of one NCCL process driving the synchronised path directly (a world of one would
    otherwise skip it): NCCL must take the float64 payloads, for every input dtype."""
    dist.init_process_group("nccl", init_method=f"file://{directory}/rendezvous", rank=0,
                            world_size=1)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(6, 5, 4, 4, generator=gen) * 2 + 3).to("cuda", dtype)
        grad = torch.randn(6, 5, 4, 4, generator=gen).to("cuda", dtype)
        weight = (torch.rand(5, generator=gen) + 0.5).cuda().requires_grad_()
        bias = torch.randn(5, generator=gen).cuda().requires_grad_()
        outputs = {}
        for name in ("sync", "plain"):
            xg = x.clone().requires_grad_()
            running = [torch.zeros(5, device="cuda"), torch.ones(5, device="cuda")]
            if name == "sync":
                y = sync_module._SyncBatchNormFunction.apply(
                    xg, weight, bias, *running, 1e-5, 0.1, dist.group.WORLD, 1, 0, 5, "layer")
            else:
                y = batch_norm(xg, *running, weight, bias, True, 0.1, 1e-5)
            weight.grad = bias.grad = None
            y.backward(grad)
            outputs[name] = _to_cpu([y, xg.grad, weight.grad, bias.grad, *running])
        results[str(dtype)] = outputs
    dist.destroy_process_group()
    torch.save(results, os.path.join(directory, "results_0.pt"))


@pytest.mark.gpu
def test_nccl_carries_the_collectives_for_every_dtype(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    results = _spawn(_nccl_worker, str(tmp_path), world=1)[0]
    tolerances = {"torch.float32": {"rtol": 1e-5, "atol": 1e-5},
                  "torch.float16": {"rtol": 1e-2, "atol": 1e-2},
                  "torch.bfloat16": {"rtol": 4e-2, "atol": 4e-2}}
    for dtype, outputs in results.items():
        for sync, plain in zip(outputs["sync"], outputs["plain"], strict=True):
            torch.testing.assert_close(sync, plain, **tolerances[dtype], msg=dtype)
