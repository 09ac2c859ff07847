"""BatchNorm written out by hand: the forward pass, the backward pass and the running statistics.

This module is the maths of bnsurgery's BatchNorm and is also meant to be read. Nothing here calls
torch's batch-norm family (``F.batch_norm``, ``torch.batch_norm``, ``native_batch_norm`` ...):
only reductions and element-wise arithmetic.

Notation, for an input ``x`` of shape ``(N, C, *spatial)``. Every statistic is per channel ``c``
and is taken over the ``M = N * prod(spatial)`` values of that channel.

Forward, training mode::

    mean     = sum(x) / M                      the batch mean
    var      = sum((x - mean)^2) / M           the *biased* batch variance, used to normalise
    invstd   = 1 / sqrt(var + eps)
    x_hat    = (x - mean) * invstd             zero mean, unit variance per channel
    y        = weight * x_hat + bias

Forward, evaluation mode: the same with ``mean = running_mean`` and ``var = running_var``.

Both are computed as one multiply-add per element, ``y = x * scale + shift`` with
``scale = weight * invstd`` and ``shift = bias - mean * scale``: the per-channel constants are
tiny, and one pass over ``x`` is what makes this as fast as torch's own kernel.

Running statistics, training mode only, with ``m`` the momentum::

    running_mean = (1 - m) * running_mean + m * mean
    running_var  = (1 - m) * running_var  + m * var * M / (M - 1)

The update uses the *unbiased* variance (Bessel's correction ``M / (M - 1)``), because the running
variance estimates the population variance; normalisation uses the biased one, because that is the
variance of the values actually being normalised. ``momentum=None`` (handled by the module) gives
a cumulative average, ``m = 1 / number_of_batches_seen``. The update runs without autograd, so no
graph is kept alive by the buffers.

Backward, training mode. With ``g = dL/dy`` and ``mean(.)`` the per-channel average over the M
values::

    dL/dbias   = sum(g)
    dL/dweight = sum(g * x_hat)
    dL/dx      = weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat))

The last line is the chain rule through ``mean`` and ``var``, which both depend on every ``x``:
subtracting ``mean(g)`` removes the part of the gradient that would only shift the batch mean, and
subtracting ``x_hat * mean(g * x_hat)`` the part that would only change its spread. In evaluation
mode mean and var are constants, so ``dL/dx = weight * invstd * g``.

Half-precision inputs (float16, bfloat16) are normalised with float32 statistics and float32
arithmetic and rounded once to the input's dtype, as torch does; weight, bias and running
statistics may then be float32 (mixed precision) or of the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnsurgery.errors import InvalidInputError, format_message

__all__ = ["batch_norm", "batch_norm_stats"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for half types, else the input's own."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel one (dim 1)."""
    return [0, *range(2, x.dim())]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector ``(C,)`` so that it broadcasts against ``x`` ``(N, C, ...)``."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and *biased* variance of ``x``, in the accumulation dtype.

    Two passes (mean first, then the mean squared deviation from it) rather than
    ``E[x^2] - E[x]^2``, which loses every significant digit when the mean is large compared to
    the spread. Two plain reductions are also faster on CPU than ``torch.var_mean`` over
    non-adjacent dimensions.

    Args:
        x: Input of shape ``(N, C, *spatial)`` with at least one value per channel.

    Returns:
        ``(mean, var)``, each of shape ``(C,)``.
    """
    dims = _reduce_dims(x)
    acc = _accumulate_dtype(x.dtype)
    mean = x.mean(dims, dtype=acc)
    var = (x - _per_channel(mean, x)).square().mean(dims)
    return mean, var.to(acc)


def _normalize(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
               bias: Tensor | None) -> Tensor:
    """``y = (x - mean) * invstd * weight + bias``, as one multiply-add ``x * scale + shift``."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    # Computing in float32 and rounding once keeps half-precision outputs within one rounding of
    # the exact value, like torch's kernels; addcmul promotes a half x to float32 on the fly.
    y = torch.addcmul(_per_channel(shift, x), x, _per_channel(scale, x))
    return y.to(x.dtype)


def _update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                          var: Tensor, count: int, momentum: float) -> None:
    """Exponential moving average of the batch statistics, with the unbiased variance."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * (count / (count - 1)) if count > 1 else var
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def _input_gradient(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                    invstd: Tensor, training: bool, sum_dy: Tensor | None,
                    sum_dy_xmu: Tensor | None) -> Tensor:
    """``dL/dx``; see the module docstring for the formula.

    In training mode ``dL/dx = a * g + b * x + c`` per channel, with ``a = weight * invstd``,
    ``b = -a * invstd^2 * mean(g * (x - mean))`` and ``c = -a * mean(g) - b * mean``: two fused
    multiply-adds over the input instead of materialising ``x_hat``.
    """
    acc = invstd.dtype
    a = invstd if weight is None else invstd * weight.to(acc)
    if not training:
        return (grad_out * _per_channel(a, grad_out)).to(x.dtype)
    count = x.numel() // x.shape[1]
    b = -a * invstd.square() * (sum_dy_xmu / count)
    c = -a * (sum_dy / count) - b * mean
    grad_in = torch.addcmul(_per_channel(c, x), x, _per_channel(b, x))
    if torch.is_grad_enabled():  # double backward: stay out of place so autograd can follow
        grad_in = torch.addcmul(grad_in, grad_out, _per_channel(a, x))
    else:
        grad_in.addcmul_(grad_out, _per_channel(a, x))
    return grad_in.to(x.dtype)


class _BatchNormFunction(torch.autograd.Function):
    """The autograd node of :func:`batch_norm`: forward and backward written out by hand."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                momentum: float, eps: float) -> Tensor:
        y, mean, invstd = _forward(x, weight, bias, running_mean, running_var, training,
                                   momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training = training
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        if x.numel() == 0:
            zeros = None if weight is None else torch.zeros_like(weight)
            return (torch.zeros_like(x) if needs_x else None, zeros if needs_w else None,
                    zeros if needs_b else None, None, None, None, None, None)
        if ctx.training and torch.is_grad_enabled():
            # create_graph=True: the statistics must be functions of x for the second derivative
            # to be right, so recompute them inside the graph instead of using the saved copies.
            mean, var = batch_norm_stats(x)
            invstd = torch.rsqrt(var + ctx.eps)
        acc = invstd.dtype
        dims = _reduce_dims(x)
        g = grad_out.to(acc) if grad_out.dtype != acc else grad_out
        sum_dy = sum_dy_xmu = None
        if ctx.training or needs_w or needs_b:
            sum_dy = g.sum(dims)
            sum_dy_xmu = (g * (x - _per_channel(mean, x))).sum(dims)
        grad_x = grad_w = grad_b = None
        if needs_x:
            grad_x = _input_gradient(g, x, weight, mean, invstd, ctx.training, sum_dy,
                                     sum_dy_xmu)
        if needs_w:
            grad_w = (sum_dy_xmu * invstd).to(weight.dtype)
        if needs_b:
            grad_b = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
             running_var: Tensor | None, training: bool, momentum: float,
             eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Output, the mean used and ``invstd``; updates the running statistics in training."""
    acc = _accumulate_dtype(x.dtype)
    channels = x.shape[1]
    if x.numel() == 0:
        # An empty batch has no statistics: return an empty output and leave the buffers alone.
        empty = torch.zeros(channels, dtype=acc, device=x.device)
        return x.clone(), empty, empty
    if training:
        mean, var = batch_norm_stats(x)
        _update_running_stats(running_mean, running_var, mean, var, x.numel() // channels,
                              momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    invstd = torch.rsqrt(var + eps)
    return _normalize(x, mean, invstd, weight, bias), mean, invstd


def _check_arguments(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None, bias: Tensor | None, training: bool) -> None:
    """The input checks of torch's batch_norm, with messages naming expected and actual values."""
    if not isinstance(x, Tensor):
        raise InvalidInputError(format_message(
            "batch_norm needs a tensor input", where="input", got=type(x).__name__,
            expected="a torch.Tensor of shape (N, C, ...)"))
    if not x.is_floating_point():
        raise InvalidInputError(format_message(
            "batch_norm needs a floating-point input", where="input", got=f"dtype {x.dtype}",
            expected="float16, bfloat16, float32 or float64",
            hint="convert the input first, e.g. x.float()"))
    if x.dim() < 2:
        raise InvalidInputError(format_message(
            "batch_norm needs an input with a channel dimension", where="input",
            got=f"a {x.dim()}-D input of shape {tuple(x.shape)}",
            expected="at least 2-D (N, C, ...)"))
    channels = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise InvalidInputError(format_message(
                f"{name} does not match the input's channel count", where=name,
                got=f"{t.numel()} elements for an input of shape {tuple(x.shape)}",
                expected=f"{channels} elements (dim 1 of the input)",
                hint="the layer was built for another number of channels; check num_features"))
    if not training and (running_mean is None or running_var is None):
        raise InvalidInputError(format_message(
            "evaluation-mode batch_norm needs running statistics",
            where="running_mean/running_var", got="None",
            expected="both tensors, or training=True to use batch statistics"))
    if training:
        values = x.numel() // channels
        if values == 1:
            raise InvalidInputError(format_message(
                "training-mode batch_norm needs more than one value per channel",
                where="input", got=f"input of shape {tuple(x.shape)}",
                expected="N * prod(spatial) > 1",
                hint="use a batch of at least 2, or call .eval() to use running statistics"))


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalisation, with the signature and semantics of ``torch.nn.functional.batch_norm``.

    Args:
        input: Tensor of shape ``(N, C, *spatial)``.
        running_mean: Per-channel running mean ``(C,)``; updated in place when ``training``.
        running_var: Per-channel running variance ``(C,)``; updated in place when ``training``.
        weight: Per-channel scale ``(C,)``, or ``None`` for 1.
        bias: Per-channel shift ``(C,)``, or ``None`` for 0.
        training: Normalise with batch statistics (and update the running ones) rather than
            with the running statistics.
        momentum: Weight of the current batch in the running-statistics update.
        eps: Added to the variance before the square root, for numerical stability.

    Returns:
        The normalised tensor, of ``input``'s shape and dtype.

    Raises:
        InvalidInputError: Wrong rank, dtype or channel count, missing running statistics in
            evaluation mode, or a single value per channel in training mode.
    """
    _check_arguments(input, running_mean, running_var, weight, bias, training)
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    if not grad_wanted:
        # Inference (or no_grad): the same maths without building an autograd node.
        return _forward(input, weight, bias, running_mean, running_var, training, momentum,
                        eps)[0]
    return _BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training,
                                    momentum, eps)
