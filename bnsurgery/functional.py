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

from bnsurgery.errors import (
    BatchNormDtypeError,
    BatchNormRuntimeError,
    BatchNormTypeError,
    InvalidInputError,
    format_message,
)

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


# --- Memory layout -------------------------------------------------------------------------
# Per-channel reductions over (N, *spatial) are slow in torch when they span non-adjacent
# dimensions. Viewing the memory as a contiguous (A, C, L) block turns them into fast ones:
# a contiguous NCHW tensor is (N, C, H*W), a channels-last one or a 2-D (N, C) one is
# (N*H*W, C, 1). Everything below reads that block, never the strided original.


def _block(x: Tensor) -> Tensor:
    """``x`` as a contiguous ``(A, C, L)`` view of its memory (copying only odd layouts)."""
    channels = x.shape[1]
    if x.is_contiguous():
        return x.view(x.shape[0], channels, -1)
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return x.permute(0, *range(2, x.dim()), 1).reshape(-1, channels, 1)
    return x.contiguous().view(x.shape[0], channels, -1)


def _channel_sum(block: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-channel sum of an ``(A, C, L)`` block."""
    if block.shape[2] == 1:
        return block.sum((0, 2), dtype=dtype)
    return block.sum(2, dtype=dtype).sum(0)


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel ``sum(a * b)`` of two ``(A, C, L)`` blocks.

    A sum of squares (``a is b``) with ``L > 1`` is taken as row norms, which needs no
    ``a * a`` temporary: on large tensors, allocating fresh memory costs more than the arithmetic.
    """
    if a is b and a.shape[2] > 1:
        return torch.linalg.vector_norm(a, dim=2).square().sum(0)
    return (a * b).sum((0, 2))


def _like(t: Tensor, reference: Tensor) -> Tensor:
    """``t`` with ``reference``'s dtype and memory layout, so their blocks line up."""
    if t.dtype == reference.dtype and t.stride() == reference.stride():
        return t
    return torch.empty_like(reference).copy_(t)


def _affine(x: Tensor, scale: Tensor, shift: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``x * scale + shift`` per channel in one pass, rounded once to ``out_dtype``.

    torch vectorises a fused multiply-add only when at most one operand is broadcast along the
    innermost dimension. With channels innermost (2-D or channels-last) scale and shift already
    vary along it; otherwise shift is spread over one sample's spatial extent first (a tensor the
    size of one sample, small next to the batch).
    """
    scale_b, shift_b = _per_channel(scale, x), _per_channel(shift, x)
    if x.dim() > 2 and not _block(x).shape[2] == 1:
        shift_b = shift_b.expand(1, x.shape[1], *x.shape[2:]).contiguous()
    return torch.addcmul(shift_b, x, scale_b).to(out_dtype)


# --- The maths -----------------------------------------------------------------------------


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and *biased* variance of ``x``, in the accumulation dtype.

    Two passes (mean first, then the mean squared deviation from it) rather than
    ``E[x^2] - E[x]^2``, which loses every significant digit when the mean is large compared to
    the spread.

    Args:
        x: Input of shape ``(N, C, *spatial)`` with at least one value per channel.

    Returns:
        ``(mean, var)``, each of shape ``(C,)``.
    """
    mean, centred = _centre(x)
    block = _block(centred)
    return mean, _channel_dot(block, block) / (x.numel() // x.shape[1])


def _centre(x: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(mean, x - mean)`` in the accumulation dtype; the batch mean unless ``mean`` is given."""
    acc = _accumulate_dtype(x.dtype)
    if mean is None:
        mean = _channel_sum(_block(x), acc) / (x.numel() // x.shape[1])
    return mean, x - _per_channel(mean, x)


def _update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                          var: Tensor, count: int, momentum: float) -> None:
    """Exponential moving average of the batch statistics, with the unbiased variance."""
    # Each new value is computed in the statistics' dtype (float32 for half buffers) and rounded
    # once into the buffer, as torch does: updating a float16 buffer in place would round the
    # decay, the batch value and their sum separately.
    with torch.no_grad():
        if running_mean is not None:
            updated = running_mean.to(mean.dtype) * (1 - momentum) + mean * momentum
            running_mean.copy_(updated)
        if running_var is not None:
            unbiased = var * (count / (count - 1)) if count > 1 else var
            running_var.copy_(running_var.to(unbiased.dtype) * (1 - momentum)
                              + unbiased * momentum)


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
    weight = None if weight is None else weight.to(acc)
    bias = None if bias is None else bias.to(acc)
    if training:
        count = x.numel() // channels
        mean, centred = _centre(x)
        block = _block(centred)
        var = _channel_dot(block, block) / count
        _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        invstd = torch.rsqrt(var + eps)
        # y = (x - mean) * invstd * weight + bias, from the centred values already at hand.
        scale = invstd if weight is None else invstd * weight
        shift = torch.zeros_like(scale) if bias is None else bias
        if centred.dtype != x.dtype:  # half input: float32 arithmetic, rounded once
            return _affine(centred, scale, shift, x.dtype), mean, invstd
        # In place on the temporary: one allocation fewer, which on large tensors matters more
        # than one extra pass.
        y = centred.mul_(_per_channel(scale, x))
        if bias is not None:
            y.add_(_per_channel(bias, x))
        return y, mean, invstd
    mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
    # y = x * scale + shift with scale = weight * invstd and shift = bias - mean * scale.
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return _affine(x, scale, shift, x.dtype), mean, invstd


def _backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
              training: bool, needs: tuple[bool, bool, bool]
              ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for input, weight and bias; see the module docstring for the formulas.

    In training mode ``dL/dx = a * g + b * (x - mean) + c`` per channel, with
    ``a = weight * invstd``, ``b = -a * invstd^2 * mean(g * (x - mean))`` and
    ``c = -a * mean(g)``: the formula of the module docstring with its per-channel factors
    gathered.
    """
    acc = invstd.dtype
    count = x.numel() // x.shape[1]
    # One input-sized scratch buffer serves every step: x - mean, then g * (x - mean) for its
    # per-channel sum, then dL/dx itself.
    _, scratch = _centre(x, mean)
    g = _like(grad_out, scratch)
    sum_dy = _channel_sum(_block(g), acc)
    # The saved mean is rounded, so x - mean is off by a per-channel constant: the mean of the
    # centred values, ideally 0. Measuring it and taking sum(g) times it back out keeps
    # sum(g * (x - mean)) accurate when the mean is large next to the spread.
    residual = _channel_sum(_block(scratch), acc) / count if training else None
    sum_dy_xmu = _channel_sum(_block(scratch.mul_(g)), acc)
    if training:
        sum_dy_xmu = sum_dy_xmu - residual * sum_dy
    a = invstd if weight is None else invstd * weight.to(acc)
    grad_x = None
    if needs[0]:
        if training:
            b = -a * invstd.square() * (sum_dy_xmu / count)
            c = -a * (sum_dy / count) - b * residual
            grad_x = torch.sub(x, _per_channel(mean, x), out=scratch).mul_(_per_channel(b, x))
            grad_x.addcmul_(g, _per_channel(a, x)).add_(_per_channel(c, x))
        else:
            grad_x = torch.mul(g, _per_channel(a, x), out=scratch)
        grad_x = grad_x.to(x.dtype)
    grad_w = sum_dy_xmu * invstd if needs[1] else None
    grad_b = sum_dy if needs[2] else None
    return grad_x, grad_w, grad_b


def _backward_differentiable(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                             invstd: Tensor, training: bool, eps: float
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """The same gradients, written literally and out of place so autograd can differentiate them.

    Used for double backward (``create_graph=True``). In training the statistics are recomputed
    from ``x`` inside the graph, because they depend on ``x`` and the second derivative must see
    that dependence.
    """
    acc = invstd.dtype
    dims = _reduce_dims(x)
    xf, g = x.to(acc), grad_out.to(acc)
    if training:
        mean = xf.mean(dims)
        var = (xf - _per_channel(mean, x)).square().mean(dims)
        invstd = torch.rsqrt(var + eps)
    x_hat = (xf - _per_channel(mean, x)) * _per_channel(invstd, x)
    w = torch.ones_like(invstd) if weight is None else weight.to(acc)
    grad_b = g.sum(dims)
    grad_w = (g * x_hat).sum(dims)
    if training:
        inner = g - _per_channel(g.mean(dims), x) - x_hat * _per_channel((g * x_hat).mean(dims), x)
    else:
        inner = g
    grad_x = _per_channel(w * invstd, x) * inner
    return grad_x.to(x.dtype), grad_w, grad_b


class _BatchNormFunction(torch.autograd.Function):
    """The autograd node of :func:`batch_norm`: forward and backward written out by hand.

    Like torch's kernel it saves the input, the mean and ``1/std`` for backward (nothing
    input-sized besides the input itself) and recomputes ``x - mean`` when it is needed.
    """

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
        needs = tuple(ctx.needs_input_grad[:3])
        if x.numel() == 0:
            zeros = None if weight is None else torch.zeros_like(weight)
            grads = (torch.zeros_like(x), zeros, zeros)
        elif torch.is_grad_enabled():
            grads = _backward_differentiable(grad_out, x, weight, mean, invstd, ctx.training,
                                             ctx.eps)
        else:
            grads = _backward(grad_out, x, weight, mean, invstd, ctx.training, needs)
        grad_x, grad_w, grad_b = (g if need else None for g, need in zip(grads, needs, strict=True))
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and ctx.bias_dtype is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _check_arguments(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None, bias: Tensor | None, training: bool,
                     eps: float) -> None:
    """The input checks of torch's batch_norm, with messages naming expected and actual values."""
    if not isinstance(x, Tensor):
        raise BatchNormTypeError(format_message(
            "batch_norm needs a tensor input", where="input", got=type(x).__name__,
            expected="a torch.Tensor of shape (N, C, ...)"))
    if not x.is_floating_point():
        raise BatchNormDtypeError(format_message(
            "batch_norm needs a floating-point input", where="input", got=f"dtype {x.dtype}",
            expected="float16, bfloat16, float32 or float64",
            hint="convert the input first, e.g. x.float()"))
    if x.dim() < 2:
        if x.numel() == 0:
            return  # an empty 1-D input has nothing to normalise; torch returns it as it is
        raise InvalidInputError(format_message(
            "batch_norm needs an input with a channel dimension", where="input",
            got=f"a {x.dim()}-D input of shape {tuple(x.shape)}",
            expected="at least 2-D (N, C, ...)"))
    channels = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise BatchNormRuntimeError(format_message(
                f"{name} does not match the input's channel count", where=name,
                got=f"{t.numel()} elements for an input of shape {tuple(x.shape)}",
                expected=f"{channels} elements (dim 1 of the input)",
                hint="the layer was built for another number of channels; check num_features"))
    if training and not eps > 0 or not eps >= 0:
        raise InvalidInputError(format_message(
            "batch_norm eps must be positive in training and non-negative in evaluation",
            where="eps", got=eps, expected="eps > 0" if training else "eps >= 0",
            hint="the usual value is eps=1e-5"))
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise BatchNormRuntimeError(format_message(
                    f"batch_norm is not differentiable with respect to {name}", where=name,
                    got="a tensor with requires_grad=True",
                    expected="a buffer that does not require grad",
                    hint=f"pass {name}.detach(), or register it as a buffer, not a Parameter"))
    if not training and (running_mean is None or running_var is None):
        raise BatchNormRuntimeError(format_message(
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
        InvalidInputError: Wrong rank, a single value per channel in training mode, or an
            ``eps`` torch refuses too (``<= 0`` in training, ``< 0`` in evaluation). The
            subclasses that torch raises as other builtins derive from those too:
            ``BatchNormRuntimeError`` (a ``RuntimeError``: channel count, missing running
            statistics in evaluation, running statistics that require grad),
            ``BatchNormTypeError`` (not a tensor) and ``BatchNormDtypeError`` (not floating
            point, a ``NotImplementedError``).
    """
    _check_arguments(input, running_mean, running_var, weight, bias, training, eps)
    if input.dim() < 2:  # only an empty one passes the checks
        return input.clone()
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    if not grad_wanted:
        # Inference (or no_grad): the same maths without building an autograd node.
        return _forward(input, weight, bias, running_mean, running_var, training, momentum,
                        eps)[0]
    return _BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training,
                                    momentum, eps)
