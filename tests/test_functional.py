"""bnsurgery.functional.batch_norm against torch.nn.functional.batch_norm, the reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import AtenOpRecorder, requires_cuda

from bnsurgery.errors import InvalidInputError
from bnsurgery.functional import batch_norm, batch_norm_stats

SHAPES = {"2d": (6, 3), "3d": (4, 3, 5), "4d": (3, 3, 4, 5), "5d": (2, 3, 3, 2, 4)}
# Tolerances per dtype for outputs and gradients compared with torch's own kernel.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=4e-2), torch.float16: dict(rtol=2e-3, atol=4e-3)}


def _case(shape, dtype, param_dtype=None, device="cpu"):
    param_dtype = param_dtype or dtype
    channels = shape[1]
    # An offset mean and a non-unit spread, so centring and scaling both matter.
    x = (torch.randn(shape, dtype=torch.float64) * 1.7 + 0.8).to(device, dtype)
    weight = (torch.rand(channels, dtype=torch.float64) + 0.5).to(device, param_dtype)
    bias = torch.randn(channels, dtype=torch.float64).to(device, param_dtype)
    running_mean = torch.randn(channels, dtype=torch.float64).to(device, param_dtype)
    running_var = (torch.rand(channels, dtype=torch.float64) + 0.5).to(device, param_dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    return x, weight, bias, running_mean, running_var, grad


def _run(fn, x, weight, bias, running_mean, running_var, grad, training, momentum, eps,
         use_weight=True, use_bias=True):
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_() if use_weight else None
    bias = bias.clone().requires_grad_() if use_bias else None
    rm = running_mean.clone() if running_mean is not None else None
    rv = running_var.clone() if running_var is not None else None
    out = fn(x, rm, rv, weight, bias, training, momentum, eps)
    out.backward(grad)
    return {"out": out.detach(), "grad_input": x.grad,
            "grad_weight": weight.grad if use_weight else None,
            "grad_bias": bias.grad if use_bias else None, "running_mean": rm, "running_var": rv}


def _assert_same(ours, ref, tol):
    for key in ref:
        if ref[key] is None:
            assert ours[key] is None, key
        else:
            torch.testing.assert_close(ours[key], ref[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_matches_torch(dtype, shape, training, affine, momentum):
    case = _case(shape, dtype)
    kwargs = dict(training=training, momentum=momentum, eps=1e-3,
                  use_weight="weight" in affine, use_bias="bias" in affine)
    ours = _run(batch_norm, *case, **kwargs)
    ref = _run(F.batch_norm, *case, **kwargs)
    _assert_same(ours, ref, TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_training_without_running_stats(shape):
    x, weight, bias, _, _, grad = _case(shape, torch.float64)
    ours = _run(batch_norm, x, weight, bias, None, None, grad, True, 0.1, 1e-5)
    ref = _run(F.batch_norm, x, weight, bias, None, None, grad, True, 0.1, 1e-5)
    _assert_same(ours, ref, TOL[torch.float64])


def test_running_variance_is_unbiased_and_normalisation_biased():
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)  # mean 2, biased var 1, unbiased 2
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    # eps must be positive in training (as in torch); 1e-300 leaves var + eps == 1 exactly.
    out = batch_norm(x, rm, rv, training=True, momentum=1.0, eps=1e-300)
    torch.testing.assert_close(out, torch.tensor([[-1.0], [1.0]], dtype=torch.float64))
    torch.testing.assert_close(rm, torch.tensor([2.0], dtype=torch.float64))
    torch.testing.assert_close(rv, torch.tensor([2.0], dtype=torch.float64))


def test_stats_are_accurate_with_a_large_mean():
    # E[x^2] - E[x]^2 would lose every digit here; the two-pass formula keeps them.
    x = torch.randn(64, 4, 32, dtype=torch.float64) * 1e-2 + 1e4
    mean, var = batch_norm_stats(x.float())
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-2, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 2, 3, 3)], ids=["2d", "3d", "4d"])
def test_gradcheck_and_double_backward(training, shape):
    x, weight, bias, rm, rv, _ = _case(shape, torch.float64)
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())

    def fn(x, w, b):
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_double_backward_matches_torch():
    x, weight, bias, _, _, _ = _case((4, 3, 5), torch.float64)
    grads = []
    for fn in (batch_norm, F.batch_norm):
        xi = x.clone().requires_grad_()
        out = fn(xi, None, None, weight, bias, True, 0.1, 1e-5)
        (gx,) = torch.autograd.grad((out ** 3).sum(), xi, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), xi)
        grads.append((gx.detach(), ggx))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)


def test_running_stats_keep_no_graph():
    x, weight, bias, rm, rv, _ = _case((8, 3, 4), torch.float32)
    x.requires_grad_()
    weight.requires_grad_()
    out = batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5)
    assert out.requires_grad
    assert not rm.requires_grad and rm.grad_fn is None
    assert not rv.requires_grad and rv.grad_fn is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_torch_batch_norm_kernel_runs(training):
    x, weight, bias, rm, rv, grad = _case((4, 3, 5, 5), torch.float32)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    with AtenOpRecorder() as rec:
        batch_norm(x, rm, rv, weight, bias, training, 0.1, 1e-5).backward(grad)
    assert rec.ops, "the recorder saw nothing: it would not catch a batch-norm kernel either"
    assert rec.batch_norm_ops() == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("param_dtype", ["float32", "same"], ids=["mixed", "pure"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_precision_matches_torch(dtype, param_dtype, training):
    param = torch.float32 if param_dtype == "float32" else dtype
    case = _case((8, 4, 6, 6), dtype, param)
    ours = _run(batch_norm, *case, training=training, momentum=0.1, eps=1e-5)
    ref = _run(F.batch_norm, *case, training=training, momentum=0.1, eps=1e-5)
    assert ours["out"].dtype == ref["out"].dtype == dtype
    assert ours["grad_weight"].dtype == ref["grad_weight"].dtype == param
    _assert_same(ours, ref, TOL[dtype])


def test_half_precision_is_as_accurate_as_torch():
    # Against a float64 oracle, not just against torch: our error must not be larger.
    case = _case((16, 8, 8, 8), torch.bfloat16, torch.float32)
    x, weight, bias, rm, rv, _ = case
    exact = F.batch_norm(x.double(), None, None, weight.double(), bias.double(), True)
    ours = batch_norm(x, None, None, weight, bias, True).double()
    ref = F.batch_norm(x, None, None, weight, bias, True).double()
    assert (ours - exact).abs().max() <= 1.5 * (ref - exact).abs().max() + 1e-6


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last(training):
    x, weight, bias, rm, rv, grad = _case((3, 5, 4, 6), torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    ours = _run(batch_norm, x, weight, bias, rm, rv, grad, training, 0.1, 1e-5)
    ref = _run(F.batch_norm, x, weight, bias, rm, rv, grad, training, 0.1, 1e-5)
    _assert_same(ours, ref, TOL[torch.float32])
    assert ours["out"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(training):
    x, weight, bias, rm, rv, _ = _case((0, 3, 4, 4), torch.float32)
    x.requires_grad_()
    weight.requires_grad_()
    rm_before, rv_before = rm.clone(), rv.clone()
    out = batch_norm(x, rm, rv, weight, bias, training, 0.1, 1e-5)
    ref = F.batch_norm(x.detach(), rm_before.clone(), rv_before.clone(), weight.detach(), bias,
                       training)
    assert out.shape == ref.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(weight.grad, torch.zeros(3))
    torch.testing.assert_close(rm, rm_before)
    torch.testing.assert_close(rv, rv_before)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(x=torch.ones(4, 3, dtype=torch.int64)), r"floating-point input.*int64"),
    (dict(x=torch.ones(3)), r"channel dimension.*1-D input of shape \(3,\)"),
    (dict(x=torch.ones(4, 5)), r"running_mean does not match.*3 elements.*expected 5 elements"),
    (dict(x=torch.ones(1, 3), training=True), r"more than one value per channel.*\(1, 3\)"),
    (dict(x=torch.ones(1, 3, 1, 1), training=True), r"more than one value per channel"),
    (dict(x=torch.ones(4, 3), stats=False), r"needs running statistics.*None"),
], ids=["integer", "rank-1", "channels", "one-value", "one-value-4d", "eval-no-stats"])
def test_bad_input(kwargs, match):
    x = kwargs["x"]
    stats = (torch.zeros(3), torch.ones(3)) if kwargs.get("stats", True) else (None, None)
    with pytest.raises(InvalidInputError, match=match):
        batch_norm(x, *stats, torch.ones(3), torch.zeros(3), kwargs.get("training", False))


def test_bad_input_is_also_a_value_error():
    with pytest.raises(ValueError):
        batch_norm(torch.ones(4, 5), torch.zeros(3), torch.ones(3))


def test_all_option_combinations_are_deterministic_and_agree():
    # A compact sweep over the remaining knobs (eps, momentum) at once.
    for eps, momentum in itertools.product([1e-5, 0.1], [0.0, 0.3, 1.0]):
        case = _case((5, 2, 3), torch.float64)
        ours = _run(batch_norm, *case, training=True, momentum=momentum, eps=eps)
        again = _run(batch_norm, *case, training=True, momentum=momentum, eps=eps)
        for key, value in ours.items():  # bit for bit, every output, gradient and buffer
            assert torch.equal(value, again[key]), (key, eps, momentum)
        ref = _run(F.batch_norm, *case, training=True, momentum=momentum, eps=eps)
        _assert_same(ours, ref, TOL[torch.float64])


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_is_as_accurate_as_cudnn(dtype, training):
    # Judged against a float64 run: cuDNN's half-precision reductions are not the truth either.
    case = _case((8, 16, 10, 10), dtype, torch.float32, device="cuda")
    ours = _run(batch_norm, *case, training=training, momentum=0.1, eps=1e-5)
    ref = _run(F.batch_norm, *case, training=training, momentum=0.1, eps=1e-5)
    exact = _run(F.batch_norm, *(t.double() for t in case), training=training, momentum=0.1,
                 eps=1e-5)
    for key, truth in exact.items():
        scale = truth.abs().max()
        ours_err = (ours[key].double() - truth).abs().max()
        ref_err = (ref[key].double() - truth).abs().max()
        floor = 1e-6 if dtype == torch.float32 else 1e-3
        assert ours_err <= 2 * ref_err + floor * scale, (key, float(ours_err), float(ref_err))


# --- Agreement with torch on what is refused, and how ----------------------------------------


def _raised(function):
    """The exception ``function()`` raises, or ``None``."""
    try:
        function()
    except Exception as exc:  # noqa: BLE001 - the test compares whatever each side raises
        return exc
    return None


@pytest.mark.parametrize("training,eps", [(True, 0.0), (True, -1.0), (False, -1.0),
                                          (False, 0.0), (True, 1e-5)],
                         ids=["train-0", "train-neg", "eval-neg", "eval-0", "train-ok"])
def test_eps_is_checked_as_torch_checks_it(training, eps):
    x = torch.randn(4, 3, 5)
    args = lambda: (x, torch.zeros(3), torch.ones(3), None, None, training, 0.1, eps)  # noqa: E731
    theirs, ours = _raised(lambda: F.batch_norm(*args())), _raised(lambda: batch_norm(*args()))
    if theirs is None:
        assert ours is None
        torch.testing.assert_close(batch_norm(*args()), F.batch_norm(*args()))
    else:
        assert isinstance(theirs, ValueError) and isinstance(ours, ValueError)
        assert "eps" in str(ours) and "Hint:" in str(ours)


@pytest.mark.parametrize("case", ["channels", "weight-channels", "eval-without-stats",
                                  "integer-input", "stats-require-grad"])
def test_refusals_are_catchable_as_what_torch_raises(case):
    x = torch.randn(4, 3, 5)
    calls = {
        "channels": lambda f: f(x, torch.zeros(4), torch.ones(4), None, None, False),
        "weight-channels": lambda f: f(x, torch.zeros(3), torch.ones(3), torch.ones(4), None,
                                       False),
        "eval-without-stats": lambda f: f(x, None, None, None, None, False),
        "integer-input": lambda f: f(torch.ones(4, 3, dtype=torch.long), None, None, None, None,
                                     True),
        "stats-require-grad": lambda f: f(x, torch.zeros(3, requires_grad=True), torch.ones(3),
                                          None, None, False),
    }
    theirs = _raised(lambda: calls[case](F.batch_norm))
    ours = _raised(lambda: calls[case](batch_norm))
    assert theirs is not None and ours is not None
    builtin = next(cls for cls in type(theirs).__mro__ if cls.__module__ == "builtins")
    assert isinstance(ours, builtin), (type(theirs), type(ours))
    assert isinstance(ours, InvalidInputError)  # bnsurgery's own hierarchy as well


def test_module_channel_mismatch_is_a_runtime_error_as_in_torch():
    from bnsurgery import BatchNorm2d

    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError):
        torch.nn.BatchNorm2d(3)(x)
    with pytest.raises(RuntimeError, match="wrong number of channels"):
        BatchNorm2d(3)(x)


def test_running_stats_that_require_grad_are_fine_under_no_grad():
    x, running_mean = torch.randn(4, 3), torch.zeros(3, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(batch_norm(x, running_mean, torch.ones(3)),
                                   F.batch_norm(x, running_mean, torch.ones(3)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_one_dimensional_input_is_returned_as_torch_does(training):
    stats = (torch.zeros(0), torch.ones(0)) if not training else (None, None)
    x = torch.empty(0)
    theirs = F.batch_norm(x, *stats, None, None, training)
    ours = batch_norm(x, *stats, None, None, training)
    assert ours.shape == theirs.shape == (0,) and ours.dtype == theirs.dtype


def test_half_running_statistics_are_rounded_once_as_torch_does():
    """Each half buffer is updated in float32 and rounded once: torch's result, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = (torch.randn(16, 8, 4, 4, generator=generator) * 3 + 2).half()
        mean = torch.randn(8, generator=generator).half()
        var = (torch.rand(8, generator=generator) + 0.5).half()
        ours_mean, ours_var = mean.clone(), var.clone()
        torch_mean, torch_var = mean.clone(), var.clone()
        batch_norm(x, ours_mean, ours_var, None, None, True, 0.1, 1e-5)
        F.batch_norm(x, torch_mean, torch_var, None, None, True, 0.1, 1e-5)
        torch.testing.assert_close(ours_mean, torch_mean, rtol=0, atol=0)
        torch.testing.assert_close(ours_var, torch_var, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (2, 3, 4, 5)], ids=str)
def test_literal_batch_norm_is_torch_batch_norm(training, shape):
    """The line-by-line transcription of the formulas matches torch, output and running stats."""
    from bnsurgery.functional import literal_batch_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2
    weight = torch.rand(3, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    ours = (torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)
    theirs = tuple(t.clone() for t in ours)
    got = literal_batch_norm(x, *ours, weight, bias, training, 0.3, 1e-5)
    want = torch.nn.functional.batch_norm(x, *theirs, weight, bias, training, 0.3, 1e-5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours, theirs)
