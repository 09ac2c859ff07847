"""torch's OpInfo tests for ``nn.functional.batch_norm``, run on bnsurgery beside torch's op.

The samples are torch's own: the ``nn.functional.batch_norm`` entries of
``torch.testing._internal.common_methods_invocations.op_db`` (every variant with CPU dtypes), in
float64, float32, float16 and bfloat16. Each check is ported from torch's ``test/test_ops.py``
(``test_noncontiguous_samples``, ``test_fn_grad``, ``test_fn_gradgrad``,
``test_forward_mode_AD``, ``test_fn_fwgrad_bwgrad``) or compares with torch directly (forward,
running statistics, gradients, batched gradients); every case runs torch's op first, under the
same check, so the check is one torch's implementation passes. A case torch's implementation
fails is listed in :data:`TORCH_FAILS`, asserted to fail for torch, and not counted.

Reproduce the counts in the README with::

    pytest tests/test_peer_opinfo.py -q

Every check is one test case; each passes only when torch's op and bnsurgery's both pass it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnsurgery.functional import batch_norm

pytest.importorskip("expecttest", reason="torch.testing._internal imports expecttest")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_utils import gradcheck, gradgradcheck  # noqa: E402

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
OPS = [op for op in op_db if op.name == "nn.functional.batch_norm"]

#: Cases torch's own implementation fails (case id -> why); asserted to fail for torch, so a
#: torch that fixes one shows up here. None with torch 2.14.1 on CPU.
TORCH_FAILS: dict[str, str] = {}


def _samples(dtype: torch.dtype, requires_grad: bool):
    """``(id, sample)`` for every OpInfo variant that runs ``dtype`` on CPU."""
    for op in OPS:
        if dtype not in op.supported_dtypes("cpu"):
            continue
        variant = op.variant_test_name or "default"
        for index, sample in enumerate(op.sample_inputs("cpu", dtype,
                                                        requires_grad=requires_grad)):
            yield f"{variant}-{index}-{str(dtype).removeprefix('torch.')}", sample


def _cases(dtypes, requires_grad=False):
    return [pytest.param(sample, dtype, id=case_id) for dtype in dtypes
            for case_id, sample in _samples(dtype, requires_grad)]


def _args(sample):
    """The positional arguments of the call: input, running_mean, running_var, weight, bias."""
    return (sample.input, *sample.args)


def _call(impl, args, kwargs):
    """``impl`` on ``args``, with fresh copies of the running statistics (updated in place)."""
    x, running_mean, running_var, weight, bias = args
    stats = [None if t is None else t.detach().clone() for t in (running_mean, running_var)]
    return impl(x, *stats, weight, bias, **kwargs), stats


def _as_leaves(args):
    return tuple(t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                 else t for t in args)


def _grad_fn(impl, kwargs):
    """The function of the differentiable tensors that test_ops.py hands to gradcheck."""
    def fn(*args):
        return _call(impl, args, kwargs)[0]
    return fn


def _run_both(check, case_id):
    """``check(impl)`` for torch, then bnsurgery; torch's known failures asserted, not counted."""
    if case_id in TORCH_FAILS:
        with pytest.raises(Exception):  # noqa: B017 - any failure of torch's own op
            check(F.batch_norm)
    else:
        check(F.batch_norm)
    check(batch_norm)


def _assert_within_ulps(got, exact, dtype, ulps=2):
    """``got`` within ``ulps`` units in the last place of the largest float64 ``exact`` value.

    The scale is the tensor's largest magnitude, not each element's: an output near zero is
    the difference of terms as large as the largest ones, and carries their rounding.
    """
    if not exact.numel():
        return
    top = exact.abs().max().to(dtype)
    spacing = (torch.nextafter(top, torch.full_like(top, float("inf"))) - top).double()
    worst = ((got.double() - exact).abs().max() / spacing).item()
    assert worst <= ulps, f"{worst:.2f} ulps from the float64 result (at most {ulps} allowed)"


@pytest.mark.parametrize(("sample", "dtype"), _cases(DTYPES))
def test_forward_and_running_stats(sample, dtype):
    """Output and updated running statistics equal torch's, within torch's dtype tolerances.

    In float16 and bfloat16 the output is rounded from float32 arithmetic, and torch's and
    bnsurgery's differ by a rounding step wherever a value lies near a boundary, which
    torch.testing's half tolerances (relative 1e-3, absolute 1e-5) do not allow near zero. There
    both torch's result and bnsurgery's are held to torch's op run in float64 on the same
    values: each within two units in the last place of its largest value.
    """
    args = _args(sample)
    got, got_stats = _call(batch_norm, args, sample.kwargs)
    expected, expected_stats = _call(F.batch_norm, args, sample.kwargs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if dtype in (torch.float16, torch.bfloat16):
        wide = tuple(None if t is None else t.detach().double() for t in args)
        exact, exact_stats = _call(F.batch_norm, wide, sample.kwargs)
        for out, stats in ((expected, expected_stats), (got, got_stats)):
            _assert_within_ulps(out, exact, dtype)
            for ours, ref in zip(stats, exact_stats, strict=True):
                if ref is not None:
                    _assert_within_ulps(ours, ref, dtype)
        return
    torch.testing.assert_close(got, expected)
    for ours, ref in zip(got_stats, expected_stats, strict=True):
        if ref is not None:
            torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize(("sample", "dtype"), _cases((torch.float64, torch.float32),
                                                     requires_grad=True))
def test_gradients(sample, dtype):
    """Gradients of input, weight and bias equal torch's for the same output gradient."""
    args = _args(sample)
    grads = {}
    for name, impl in (("torch", F.batch_norm), ("bnsurgery", batch_norm)):
        leaves = _as_leaves(args)
        out, _ = _call(impl, leaves, sample.kwargs)
        wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        cotangent = torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)
        grads[name] = torch.autograd.grad(out, wanted, cotangent, allow_unused=True)
    for ours, ref in zip(grads["bnsurgery"], grads["torch"], strict=True):
        if ref is None:
            assert ours is None or not ours.any()
        else:
            torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize(("sample", "dtype"), _cases((torch.float64, torch.float32),
                                                     requires_grad=True))
def test_noncontiguous_samples(sample, dtype):
    """test_ops.py's test_noncontiguous_samples: a strided copy of every tensor computes the
    same output and gradients as the contiguous sample (and as torch on the strided one)."""
    strided = sample.noncontiguous()
    results = {}
    for key, impl, case in (("torch", F.batch_norm, strided), ("ours", batch_norm, strided),
                            ("ours-contiguous", batch_norm, sample)):
        leaves = _as_leaves(_args(case))
        out, stats = _call(impl, leaves, case.kwargs)
        wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(out.sum(), wanted, allow_unused=True) if out.requires_grad \
            else ()
        results[key] = (out, *stats, *grads)
    for key in ("ours-contiguous", "torch"):
        for ours, ref in zip(results["ours"], results[key], strict=True):
            if ref is not None:
                torch.testing.assert_close(ours, ref, msg=lambda m, k=key: f"vs {k}: {m}")


# The gradient checks of test_ops.py run in float64 only, as there.
GRAD_CASES = _cases((torch.float64,), requires_grad=True)


@pytest.mark.parametrize(("sample", "dtype"), GRAD_CASES)
def test_fn_grad(sample, dtype, request):
    """test_ops.py's test_fn_grad: gradcheck with the OpInfo's batched-gradient setting."""
    op = OPS[0]

    def check(impl):
        assert gradcheck(
            _grad_fn(impl, sample.kwargs), _as_leaves(_args(sample)),
            check_batched_grad=op.check_batched_grad, check_grad_dtypes=True,
            nondet_tol=op.gradcheck_nondet_tol, fast_mode=op.gradcheck_fast_mode,
            check_undefined_grad=True)

    _run_both(check, request.node.callspec.id)


@pytest.mark.parametrize(("sample", "dtype"), GRAD_CASES)
def test_fn_gradgrad(sample, dtype, request):
    """test_ops.py's test_fn_gradgrad: gradgradcheck, with and without strided grad outputs."""
    op = OPS[0]

    def check(impl):
        for non_contiguous in (False, True):
            assert gradgradcheck(
                _grad_fn(impl, sample.kwargs), _as_leaves(_args(sample)),
                gen_non_contig_grad_outputs=non_contiguous,
                check_batched_grad=op.check_batched_gradgrad, check_grad_dtypes=True,
                nondet_tol=op.gradcheck_nondet_tol, fast_mode=op.gradcheck_fast_mode)

    _run_both(check, request.node.callspec.id)


@pytest.mark.parametrize(("sample", "dtype"), GRAD_CASES)
def test_forward_mode_ad(sample, dtype, request):
    """test_ops.py's test_forward_mode_AD: gradcheck of the forward-mode derivative alone."""
    op = OPS[0]

    def check(impl):
        assert gradcheck(
            _grad_fn(impl, sample.kwargs), _as_leaves(_args(sample)),
            check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False,
            check_batched_grad=False, check_batched_forward_grad=op.check_batched_forward_grad,
            check_grad_dtypes=True, nondet_tol=op.gradcheck_nondet_tol,
            fast_mode=op.gradcheck_fast_mode)

    _run_both(check, request.node.callspec.id)


@pytest.mark.parametrize(("sample", "dtype"), GRAD_CASES)
def test_fn_fwgrad_bwgrad(sample, dtype, request):
    """test_ops.py's test_fn_fwgrad_bwgrad: forward-mode AD through the backward."""
    op = OPS[0]

    def check(impl):
        assert gradgradcheck(
            _grad_fn(impl, sample.kwargs), _as_leaves(_args(sample)),
            check_fwd_over_rev=True, check_rev_over_rev=False, check_batched_grad=False,
            check_undefined_grad=False, check_grad_dtypes=True, nondet_tol=op.gradcheck_nondet_tol,
            fast_mode=op.gradcheck_fast_mode)

    _run_both(check, request.node.callspec.id)


@pytest.mark.parametrize(("sample", "dtype"), GRAD_CASES)
def test_batched_grads(sample, dtype):
    """``autograd.grad(..., is_grads_batched=True)`` equals torch's, one cotangent per row."""
    results = {}
    for name, impl in (("torch", F.batch_norm), ("bnsurgery", batch_norm)):
        leaves = _as_leaves(_args(sample))
        out, _ = _call(impl, leaves, sample.kwargs)
        wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        cotangents = torch.linspace(-1, 1, 3 * out.numel(), dtype=dtype).view(3, *out.shape)
        results[name] = torch.autograd.grad(out, wanted, cotangents, is_grads_batched=True,
                                            allow_unused=True, materialize_grads=True)
    for ours, ref in zip(results["bnsurgery"], results["torch"], strict=True):
        torch.testing.assert_close(ours, ref)
