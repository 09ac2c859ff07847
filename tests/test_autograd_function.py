"""The autograd node under every differentiation mode, each against torch's own batch_norm.

Batched gradients, ``gradcheck``'s batched and forward-mode checks, ``torch.func`` (vmap, grad,
jacrev, jacfwd, hessian), forward-mode AD and forward-over-reverse: each test runs torch's
``F.batch_norm`` the same way in the same test, and bnsurgery must agree with it (and fail
where it fails).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import bnsurgery
from bnsurgery.autograd_function import forward_tangent
from bnsurgery.errors import BatchNormRuntimeError
from bnsurgery.functional import batch_norm, literal_batch_norm

D = torch.float64
TOL = dict(rtol=1e-9, atol=1e-9)
IMPLS = {"torch": F.batch_norm, "bnsurgery": batch_norm}
MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def _inputs(shape=(4, 3, 2, 2), dtype=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = torch.randn(shape, dtype=dtype, generator=gen) * 1.5 + 0.7
    weight = torch.rand(channels, dtype=dtype, generator=gen) + 0.5
    bias = torch.randn(channels, dtype=dtype, generator=gen)
    running_mean = torch.randn(channels, dtype=dtype, generator=gen)
    running_var = torch.rand(channels, dtype=dtype, generator=gen) + 0.5
    return x, weight, bias, running_mean, running_var


def _closure(impl, running_mean, running_var, training):
    """``f(x, weight, bias)``, with fresh copies of the running statistics on every call."""
    def f(x, weight, bias):
        return impl(x, running_mean.clone(), running_var.clone(), weight, bias, training,
                    0.1, 1e-5)
    return f


def _both(fn):
    """``fn(impl)`` for torch and bnsurgery."""
    return fn(F.batch_norm), fn(batch_norm)


@MODES
def test_grads_batched_match_torch(training):
    x, weight, bias, rm, rv = _inputs()
    cotangents = torch.randn(5, *x.shape, dtype=D)

    def run(impl):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = _closure(impl, rm, rv, training)(*leaves)
        return torch.autograd.grad(out, leaves, cotangents, is_grads_batched=True)

    ref, ours = _both(run)
    for r, o in zip(ref, ours, strict=True):
        assert o.shape == (5, *r.shape[1:])
        torch.testing.assert_close(o, r, **TOL)


@MODES
def test_gradcheck_batched_and_forward_modes(training):
    """gradcheck with every check torch's own op passes: batched, forward AD, fw-over-rev."""
    x, weight, bias, rm, rv = _inputs(shape=(3, 2, 3))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    for impl in IMPLS.values():
        fn = _closure(impl, rm, rv, training)
        assert torch.autograd.gradcheck(fn, leaves, check_batched_grad=True,
                                        check_forward_ad=True, check_backward_ad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(fn, leaves, check_batched_grad=True,
                                            check_fwd_over_rev=True)


@MODES
@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_jacobians_match_torch(training, transform):
    x, weight, bias, rm, rv = _inputs()
    jac = {"jacrev": jacrev, "jacfwd": jacfwd}[transform]
    ref, ours = _both(lambda impl: jac(_closure(impl, rm, rv, training), argnums=(0, 1, 2))(
        x, weight, bias))
    for r, o in zip(ref, ours, strict=True):
        torch.testing.assert_close(o, r, **TOL)


@MODES
def test_hessian_matches_torch_and_the_literal_formulas(training):
    """hessian (jacfwd over jacrev) against torch and against autograd through the literal maths.

    In training torch's own (weight, input) block is wrong under torch.func: it is not the
    transpose of its (input, weight) block, as a Hessian must be, and differs from the literal
    formulas' one. That block is asserted to be torch's failure, and bnsurgery's is held to
    the literal formulas (and to symmetry) instead.
    """
    x, weight, bias, rm, rv = _inputs(shape=(3, 2, 2))

    def loss(impl):
        f = _closure(impl, rm, rv, training)
        return lambda x, weight: f(x, weight, bias).sin().sum()

    ref, ours, literal = (hessian(loss(impl), argnums=(0, 1))(x, weight)
                          for impl in (F.batch_norm, batch_norm, literal_batch_norm))
    for row in range(2):
        for col in range(2):
            torch.testing.assert_close(ours[row][col], literal[row][col], **TOL)
            if training and (row, col) == (1, 0):
                assert not torch.allclose(ref[1][0], literal[1][0]), "torch got it right now"
                assert not torch.allclose(ref[1][0], ref[0][1].permute(3, 0, 1, 2))
            else:
                torch.testing.assert_close(ours[row][col], ref[row][col], **TOL)
    torch.testing.assert_close(ours[1][0], ours[0][1].permute(3, 0, 1, 2), **TOL)


def test_per_sample_gradients_match_torch():
    """vmap(grad(...)) in evaluation mode, and in training without running statistics."""
    x, weight, bias, rm, rv = _inputs()
    samples = torch.randn(6, *x.shape, dtype=D)
    for training, stats in ((False, (rm, rv)), (True, (None, None))):
        def loss(impl, training=training, stats=stats):
            return lambda x, weight: impl(x, *stats, weight, bias, training).sin().sum()

        ref, ours = _both(lambda impl: vmap(grad(loss(impl), argnums=(0, 1)),
                                            in_dims=(0, None))(samples, weight))
        for r, o in zip(ref, ours, strict=True):
            torch.testing.assert_close(o, r, **TOL)


@pytest.mark.parametrize("in_dim", [0, 2], ids=["dim0", "dim2"])
@MODES
def test_vmap_with_batched_running_stats_matches_torch(training, in_dim):
    """Each sample normalised on its own and each sample's buffers updated, as torch does."""
    x, weight, bias, _, _ = _inputs()
    batch = torch.randn(3, *x.shape, dtype=D).movedim(0, in_dim)
    means, variances = torch.randn(3, 3, dtype=D), torch.rand(3, 3, dtype=D) + 0.5

    def run(impl):
        rm, rv = means.clone(), variances.clone()
        out = vmap(lambda x, rm, rv: impl(x, rm, rv, weight, bias, training),
                   in_dims=(in_dim, 0, 0))(batch, rm, rv)
        return out, rm, rv

    ref, ours = _both(run)
    for r, o in zip(ref, ours, strict=True):
        torch.testing.assert_close(o, r, **TOL)
    if training:  # the buffers did change
        assert not torch.equal(ours[1], means)


def test_vmap_over_weights_matches_torch():
    """An unbatched input with batched affine parameters (an ensemble sharing one batch)."""
    x, _, _, rm, rv = _inputs()
    weights, biases = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    for training, stats in ((False, (rm, rv)), (True, (None, None))):
        ref, ours = _both(lambda impl, t=training, s=stats: vmap(
            lambda w, b: impl(x, *s, w, b, t))(weights, biases))
        torch.testing.assert_close(ours, ref, **TOL)


def test_vmap_training_with_unbatched_running_stats_is_refused_as_torch_does():
    x, weight, bias, rm, rv = _inputs()
    batch = torch.randn(2, *x.shape, dtype=D)
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        vmap(lambda x: F.batch_norm(x, rm, rv, weight, bias, True))(batch)
    before = rm.clone()
    with pytest.raises(BatchNormRuntimeError, match="unbatched running_mean once per sample"):
        vmap(lambda x: batch_norm(x, rm, rv, weight, bias, True))(batch)
    torch.testing.assert_close(rm, before, rtol=0, atol=0)


@MODES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16],
                         ids=["f64", "f32", "f16"])
def test_forward_ad_matches_torch(training, dtype):
    x, weight, bias, rm, rv = _inputs(shape=(5, 3, 4), dtype=dtype)
    tangents = [torch.randn_like(t) for t in (x, weight, bias)]

    def run(impl):
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip((x, weight, bias), tangents,
                                                               strict=True)]
            out = impl(duals[0], rm.clone(), rv.clone(), duals[1], duals[2], training)
            primal, tangent = forward_ad.unpack_dual(out)
            return primal.clone(), tangent.clone()

    ref, ours = _both(run)
    tol = TOL if dtype == D else dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 \
        else dict(rtol=2e-3, atol=4e-3)
    for r, o in zip(ref, ours, strict=True):
        assert o.dtype == dtype
        torch.testing.assert_close(o, r, **tol)


@MODES
def test_forward_tangent_against_the_literal_formulas(training):
    """The hand-written jvp equals forward AD through the literal, line-by-line forward."""
    x, weight, bias, rm, rv = _inputs(shape=(6, 2, 3))
    tangents = [torch.randn_like(t) for t in (x, weight, bias)]
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in zip((x, weight, bias), tangents,
                                                           strict=True)]
        expected = forward_ad.unpack_dual(literal_batch_norm(
            duals[0], rm.clone(), rv.clone(), duals[1], duals[2], training)).tangent
    if training:
        mean = x.mean((0, 2))
        invstd = torch.rsqrt(x.var((0, 2), unbiased=False) + 1e-5)
    else:
        mean, invstd = rm, torch.rsqrt(rv + 1e-5)
    got = forward_tangent(x, weight, mean, invstd, training, *tangents)
    torch.testing.assert_close(got, expected, **TOL)


def test_tangents_of_running_stats_are_ignored_as_torch_does():
    x, weight, bias, rm, rv = _inputs()
    for training in (True, False):
        def run(impl, training=training):
            with forward_ad.dual_level():
                mean = forward_ad.make_dual(rm.clone(), torch.ones_like(rm))
                out = impl(x, mean, rv.clone(), weight, bias, training)
                return forward_ad.unpack_dual(out).tangent
        ref, ours = _both(run)
        assert ref is None and ours is None


@MODES
def test_forward_over_reverse_matches_torch(training):
    """torch's fn_fwgrad_bwgrad pattern: forward AD through a backward with create_graph."""
    x, weight, bias, rm, rv = _inputs(shape=(4, 2, 3))
    primals = (x, weight, bias)
    tangents = [torch.randn_like(t) for t in primals]
    cotangent, cotangent_tangent = torch.randn_like(x), torch.randn_like(x)

    def run(impl):
        with forward_ad.dual_level():
            leaves = [forward_ad.make_dual(p.clone().requires_grad_(), t)
                      for p, t in zip(primals, tangents, strict=True)]
            out = _closure(impl, rm, rv, training)(*leaves)
            v = forward_ad.make_dual(cotangent, cotangent_tangent)
            grads = torch.autograd.grad(out, leaves, v, create_graph=True)
            return [forward_ad.unpack_dual(g) for g in grads]

    ref, ours = _both(run)
    for r, o in zip(ref, ours, strict=True):
        torch.testing.assert_close(o.primal, r.primal, **TOL)
        torch.testing.assert_close(o.tangent, r.tangent, **TOL)


def test_plain_backward_still_matches_torch():
    """Outside any transform the backend's own backward runs; it agrees with torch too."""
    x, weight, bias, rm, rv = _inputs(shape=(8, 3, 5))
    g = torch.randn_like(x)

    def run(impl):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        _closure(impl, rm, rv, True)(*leaves).backward(g)
        return [t.grad for t in leaves]

    ref, ours = _both(run)
    for r, o in zip(ref, ours, strict=True):
        torch.testing.assert_close(o, r, **TOL)


def test_module_under_functional_call_and_vmap():
    """torch.func.functional_call + vmap over parameters of a bnsurgery layer in eval mode."""
    ours, ref = bnsurgery.BatchNorm2d(3).double().eval(), torch.nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        ours.running_mean.normal_()
        ours.running_var.uniform_(0.5, 2.0)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 4, 4, dtype=D)
    params = {"weight": torch.randn(5, 3, dtype=D), "bias": torch.randn(5, 3, dtype=D)}

    def run(module):
        return vmap(lambda p: torch.func.functional_call(module, p, (x,)))(params)

    torch.testing.assert_close(run(ours), run(ref), **TOL)


def test_compiled_training_step_matches_torch():
    """torch.compile(fullgraph=True) traces the node (without its forward-mode rule)."""
    torch._dynamo.reset()
    ours, ref = bnsurgery.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 5, 5)

    def step(module):
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        leaf = x.clone().requires_grad_()
        out = compiled(leaf)
        out.square().sum().backward()
        return out.detach(), leaf.grad, module.weight.grad, module.running_var.clone()

    for r, o in zip(step(ref), step(ours), strict=True):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
