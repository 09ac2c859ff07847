"""Tests of the fold arithmetic (bnsurgery.fold) against an independent float64 reference.

The reference runs the original layer and ``F.batch_norm`` in float64; the folded weights must
reproduce it to float64 round-off. Property tests draw random shapes and options (conv rank,
stride, dilation, groups, padding mode, bias, transposed layers, BatchNorm affine options).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnsurgery.errors import InvalidInputError
from bnsurgery.fold import (
    FoldedWeights,
    PrecisionReport,
    batchnorm_scale_shift,
    fold_batchnorm_after,
    fold_batchnorm_before,
    fold_layer_weights,
    precision_report,
    split_scale_shift,
)

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}  # float64 reference vs float64 fold

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _bn_state(channels: int, gen: torch.Generator, *, affine: bool = True, bias: bool = True):
    mean = torch.randn(channels, generator=gen, dtype=F64)
    var = torch.rand(channels, generator=gen, dtype=F64) * 2 + 0.1
    weight = torch.rand(channels, generator=gen, dtype=F64) + 0.5 if affine else None
    beta = torch.randn(channels, generator=gen, dtype=F64) if affine and bias else None
    return mean, var, weight, beta


def _reference_bn(x, state, eps):
    mean, var, weight, beta = state
    return F.batch_norm(x, mean, var, weight, beta, training=False, eps=eps)


def _layer(x, weight, bias, *, transposed, stride=1, padding=0, dilation=1, groups=1,
           output_padding=0):
    dims = weight.dim() - 2
    if transposed:
        return _CONV_T[dims](x, weight, bias, stride, padding, output_padding, groups, dilation)
    return _CONV[dims](x, weight, bias, stride, padding, dilation, groups)


# --- scale and shift ------------------------------------------------------------------------------

@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)],
                         ids=["affine", "no_bias", "not_affine"])
def test_scale_shift_matches_batch_norm(affine, bias):
    gen = torch.Generator().manual_seed(0)
    state = _bn_state(6, gen, affine=affine, bias=bias)
    x = torch.randn(4, 6, 5, generator=gen, dtype=F64)
    scale, shift = batchnorm_scale_shift(state[0], state[1], eps=1e-3, weight=state[2],
                                         bias=state[3])
    assert scale.dtype == F64 and shift.dtype == F64
    torch.testing.assert_close(x * scale[:, None] + shift[:, None],
                               _reference_bn(x, state, 1e-3), **TIGHT)


def test_scale_shift_is_float64_for_float16_statistics():
    mean = torch.tensor([0.1, -0.2], dtype=torch.float16)
    var = torch.tensor([1e-4, 4.0], dtype=torch.float16)
    scale, _ = batchnorm_scale_shift(mean, var, eps=1e-5)
    expected = 1 / torch.sqrt(var.to(F64) + 1e-5)
    torch.testing.assert_close(scale, expected, **TIGHT)


@pytest.mark.parametrize("bad", ["var_negative", "mean_2d", "weight_length"])
def test_scale_shift_rejects_bad_statistics(bad):
    mean, var, weight = torch.zeros(3), torch.ones(3), torch.ones(3)
    if bad == "var_negative":
        var = torch.tensor([1.0, -2.0, 1.0])
        match = "running_var \\+ eps must be positive"
    elif bad == "mean_2d":
        mean = torch.zeros(3, 1)
        match = "1-D running_mean"
    else:
        weight = torch.ones(4)
        match = "'weight' must be a 1-D tensor with one entry per channel"
    with pytest.raises(InvalidInputError, match=match):
        batchnorm_scale_shift(mean, var, eps=1e-5, weight=weight)


def test_split_scale_shift_cuts_consecutive_slices():
    scale, shift = torch.arange(8, dtype=F64), -torch.arange(8, dtype=F64)
    parts = split_scale_shift(scale, shift, [3, 5])
    assert [p[0].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert parts[1][1].tolist() == [-3, -4, -5, -6, -7]
    with pytest.raises(InvalidInputError, match="must cover the BatchNorm's channels exactly"):
        split_scale_shift(scale, shift, [3, 4])


# --- fixed cases ----------------------------------------------------------------------------------

def test_transposed_square_weight_uses_output_axis():
    """in == out hides a dim-0/dim-1 mix-up from shape checks; the numbers must catch it."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 4, 3, 3, generator=gen, dtype=F64)  # (in, out, kh, kw)
    state = _bn_state(4, gen)
    scale, shift = batchnorm_scale_shift(state[0], state[1], eps=1e-5, weight=state[2],
                                         bias=state[3])
    new_w, new_b = fold_batchnorm_after(weight, None, scale, shift, transposed=True)
    x = torch.randn(2, 4, 5, 5, generator=gen, dtype=F64)
    expected = _reference_bn(_layer(x, weight, None, transposed=True, stride=2), state, 1e-5)
    torch.testing.assert_close(_layer(x, new_w, new_b, transposed=True, stride=2), expected,
                               **TIGHT)
    wrong = weight * scale.reshape(-1, 1, 1, 1)  # scaling dim 0, what a naive fold does
    assert not torch.allclose(_layer(x, wrong, shift, transposed=True, stride=2), expected)


def test_grouped_transposed_weight_scales_per_group_columns():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 2, 3, generator=gen, dtype=F64)  # in 6, groups 3, out 6
    bias = torch.randn(6, generator=gen, dtype=F64)
    state = _bn_state(6, gen)
    scale, shift = batchnorm_scale_shift(state[0], state[1], eps=1e-5, weight=state[2],
                                         bias=state[3])
    new_w, new_b = fold_batchnorm_after(weight, bias, scale, shift, transposed=True, groups=3)
    x = torch.randn(2, 6, 7, generator=gen, dtype=F64)
    expected = _reference_bn(_layer(x, weight, bias, transposed=True, groups=3), state, 1e-5)
    torch.testing.assert_close(_layer(x, new_w, new_b, transposed=True, groups=3), expected,
                               **TIGHT)


def test_linear_folds_both_sides():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 7, generator=gen, dtype=F64)
    bias = torch.randn(5, generator=gen, dtype=F64)
    before_state, after_state = _bn_state(7, gen), _bn_state(5, gen)
    before = batchnorm_scale_shift(before_state[0], before_state[1], eps=1e-5,
                                   weight=before_state[2], bias=before_state[3])
    after = batchnorm_scale_shift(after_state[0], after_state[1], eps=1e-5,
                                  weight=after_state[2], bias=after_state[3])
    folded = fold_layer_weights(weight, bias, before=before, after=after, keep_float64=True)
    x = torch.randn(3, 7, generator=gen, dtype=F64)
    expected = _reference_bn(F.linear(_reference_bn(x, before_state, 1e-5), weight, bias),
                             after_state, 1e-5)
    torch.testing.assert_close(F.linear(x, folded.weight, folded.bias), expected, **TIGHT)


def test_before_fold_with_zero_padding_is_wrong_only_at_borders():
    """Why BN -> zero-padded conv is refused: the shift is missing where taps see padding."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(4, 3, 3, 3, generator=gen, dtype=F64)
    state = _bn_state(3, gen)
    scale, shift = batchnorm_scale_shift(state[0], state[1], eps=1e-5, weight=state[2],
                                         bias=state[3])
    new_w, new_b = fold_batchnorm_before(weight, None, scale, shift)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=F64)
    expected = F.conv2d(_reference_bn(x, state, 1e-5), weight, None, padding=1)
    got = F.conv2d(x, new_w, new_b, padding=1)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], **TIGHT)
    assert not torch.allclose(got[..., 0, :], expected[..., 0, :])


def test_fold_layer_weights_rounds_once_and_keeps_channels_last():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 4, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(8, generator=gen)
    state = _bn_state(8, gen)
    after = batchnorm_scale_shift(state[0], state[1], eps=1e-5, weight=state[2], bias=state[3])
    folded = fold_layer_weights(weight, bias, after=after)
    assert isinstance(folded, FoldedWeights) and folded.weight64 is None
    assert folded.weight.is_contiguous(memory_format=torch.channels_last)
    exact = weight.to(F64) * after[0].reshape(-1, 1, 1, 1)
    assert torch.equal(folded.weight, exact.to(torch.float32))  # one rounding of the exact value
    assert torch.equal(folded.bias, (bias.to(F64) * after[0] + after[1]).to(torch.float32))
    kept = fold_layer_weights(weight, bias, after=after, keep_float64=True)
    assert torch.equal(kept.weight, folded.weight)  # blockwise and one-shot paths agree bitwise
    torch.testing.assert_close(kept.weight64, exact, rtol=0, atol=0)


def test_fold_layer_weights_blockwise_path_covers_large_weights():
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(300, 64, 5, 5, generator=gen)  # several blocks of rows
    scale = torch.rand(300, generator=gen, dtype=F64) + 0.5
    shift = torch.randn(300, generator=gen, dtype=F64)
    fast = fold_layer_weights(weight, None, after=(scale, shift))
    slow = fold_layer_weights(weight, None, after=(scale, shift), keep_float64=True)
    assert torch.equal(fast.weight, slow.weight) and torch.equal(fast.bias, slow.bias)


@pytest.mark.parametrize("bad", ["nothing", "groups", "scale_length"])
def test_fold_layer_weights_rejects_bad_arguments(bad):
    weight = torch.randn(4, 2, 3, 3)
    scale, shift = torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64)
    if bad == "nothing":
        with pytest.raises(InvalidInputError, match="needs a BatchNorm to fold"):
            fold_layer_weights(weight, None)
    elif bad == "groups":
        with pytest.raises(InvalidInputError, match="groups must be a positive divisor"):
            fold_layer_weights(weight, None, after=(scale, shift), groups=3)
    else:
        with pytest.raises(InvalidInputError, match="'scale' must be a 1-D tensor"):
            fold_layer_weights(weight, None, after=(torch.ones(5, dtype=F64), shift))


# --- precision --------------------------------------------------------------------------------

def test_precision_report_counts_overflow_and_new_subnormals():
    folded = torch.tensor([7e4, -1e5, 1.0, 3e-6, 0.0, 2e-6], dtype=F64)
    original = torch.tensor([1.0, -1.0, 1.0, 1e-3, 0.0, 1e-6])  # last one already subnormal
    report = precision_report([folded], [original], torch.float16)
    assert isinstance(report, PrecisionReport)
    assert (report.overflow, report.subnormal) == (2, 1)
    assert not report.ok
    assert report.max_abs == 1e5 and math.isclose(report.min_abs_nonzero, 2e-6)
    assert report.to_dict()["dtype"] == "torch.float16"


def test_precision_report_bfloat16_keeps_float32_range():
    folded = torch.tensor([7e4, 1e-30], dtype=F64)
    report = precision_report([folded], [None], torch.bfloat16)
    assert report.ok and report.overflow == 0 and report.subnormal == 0


# --- property tests -----------------------------------------------------------------------------

@st.composite
def _conv_case(draw):
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    bn_bias = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    seed = draw(st.integers(0, 2**16))
    return dict(dims=dims, transposed=transposed, groups=groups, in_channels=in_channels,
                out_channels=out_channels, kernel=kernel, stride=stride, dilation=dilation,
                padding=padding, bias=bias, affine=affine, bn_bias=bn_bias, eps=eps, seed=seed)


def _weight_shape(case):
    per_group_in = case["in_channels"] // case["groups"]
    per_group_out = case["out_channels"] // case["groups"]
    kernel = (case["kernel"],) * case["dims"]
    if case["transposed"]:
        return (case["in_channels"], per_group_out, *kernel)
    return (case["out_channels"], per_group_in, *kernel)


_PROPERTY = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(_conv_case())
def test_property_fold_after_conv_matches_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    weight = torch.randn(_weight_shape(case), generator=gen, dtype=F64)
    bias = torch.randn(case["out_channels"], generator=gen, dtype=F64) if case["bias"] else None
    state = _bn_state(case["out_channels"], gen, affine=case["affine"], bias=case["bn_bias"])
    scale, shift = batchnorm_scale_shift(state[0], state[1], eps=case["eps"], weight=state[2],
                                         bias=state[3])
    new_w, new_b = fold_batchnorm_after(weight, bias, scale, shift,
                                        transposed=case["transposed"], groups=case["groups"])
    x = torch.randn(2, case["in_channels"], *([7] * case["dims"]), generator=gen, dtype=F64)
    options = dict(transposed=case["transposed"], stride=case["stride"],
                   padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    expected = _reference_bn(_layer(x, weight, bias, **options), state, case["eps"])
    torch.testing.assert_close(_layer(x, new_w, new_b, **options), expected, **TIGHT)


@_PROPERTY
@given(_conv_case(), st.sampled_from(["reflect", "replicate", "circular", "none"]))
def test_property_fold_before_conv_matches_reference(case, padding_mode):
    """BN -> conv is exact when the conv pads by copying input values (or does not pad)."""
    gen = torch.Generator().manual_seed(case["seed"])
    case = {**case, "transposed": False}
    weight = torch.randn(_weight_shape(case), generator=gen, dtype=F64)
    bias = torch.randn(case["out_channels"], generator=gen, dtype=F64) if case["bias"] else None
    state = _bn_state(case["in_channels"], gen, affine=case["affine"], bias=case["bn_bias"])
    scale, shift = batchnorm_scale_shift(state[0], state[1], eps=case["eps"], weight=state[2],
                                         bias=state[3])
    new_w, new_b = fold_batchnorm_before(weight, bias, scale, shift, groups=case["groups"])
    x = torch.randn(2, case["in_channels"], *([7] * case["dims"]), generator=gen, dtype=F64)

    def run(inp, w, b):
        if padding_mode != "none":
            inp = F.pad(inp, (case["padding"] + 1,) * (2 * case["dims"]), mode=padding_mode)
        return _layer(inp, w, b, transposed=False, stride=case["stride"],
                      dilation=case["dilation"], groups=case["groups"])

    expected = run(_reference_bn(x, state, case["eps"]), weight, bias)
    torch.testing.assert_close(run(x, new_w, new_b), expected, **TIGHT)


@_PROPERTY
@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 2**16),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_property_linear_rounded_fold_is_one_rounding(in_f, out_f, bias, before, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen).to(dtype)
    layer_bias = torch.randn(out_f, generator=gen).to(dtype) if bias else None
    channels = in_f if before else out_f
    state = _bn_state(channels, gen)
    pair = batchnorm_scale_shift(state[0], state[1], eps=1e-5, weight=state[2], bias=state[3])
    sides = {"before": pair} if before else {"after": pair}
    folded = fold_layer_weights(weight, layer_bias, keep_float64=True, **sides)
    assert folded.weight.dtype == dtype and folded.bias.dtype == dtype
    assert torch.equal(folded.weight, folded.weight64.to(dtype))
    assert torch.equal(folded.bias, folded.bias64.to(dtype))
    x = torch.randn(3, in_f, generator=gen, dtype=F64)
    original = (weight.to(F64), None if layer_bias is None else layer_bias.to(F64))
    if before:
        expected = F.linear(_reference_bn(x, state, 1e-5), *original)
    else:
        expected = _reference_bn(F.linear(x, *original), state, 1e-5)
    torch.testing.assert_close(F.linear(x, folded.weight64, folded.bias64), expected, **TIGHT)
