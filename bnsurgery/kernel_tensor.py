"""The pure-tensor BatchNorm kernel: the formulas of :mod:`bnsurgery.functional` made fast.

This is the ``reference`` backend of :mod:`bnsurgery.kernels`: torch reductions and element-wise
arithmetic only, so it runs on every device and dtype, under ``torch.compile``, ``torch.fx``,
``torch.export`` and ONNX export, and is the fallback of last resort when no compiled kernel is
available. Its speed comes from memory-layout engineering (below), not from different maths.

Every backend has the same two entry points, :func:`forward` and :func:`backward`, with the
signatures defined here; :mod:`bnsurgery.sync_batchnorm` reuses the building blocks.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

__all__ = [
    "accumulate_dtype",
    "affine",
    "backward",
    "batch_norm_stats",
    "centre",
    "channel_block",
    "channel_dot",
    "channel_sum",
    "forward",
    "like",
    "per_channel",
    "reduce_dims",
    "update_running_stats",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for half types, else the input's own."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channel one (dim 1)."""
    return [0, *range(2, x.dim())]


def per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector ``(C,)`` so that it broadcasts against ``x`` ``(N, C, ...)``."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


# --- Memory layout -------------------------------------------------------------------------
# Per-channel reductions over (N, *spatial) are slow in torch when they span non-adjacent
# dimensions. Viewing the memory as a contiguous (A, C, L) block turns them into fast ones:
# a contiguous NCHW tensor is (N, C, H*W), a channels-last one or a 2-D (N, C) one is
# (N*H*W, C, 1). Everything below reads that block, never the strided original.


def channel_block(x: Tensor) -> Tensor:
    """``x`` as a contiguous ``(A, C, L)`` view of its memory (copying only odd layouts)."""
    channels = x.shape[1]
    if x.is_contiguous():
        return x.view(x.shape[0], channels, -1)
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return x.permute(0, *range(2, x.dim()), 1).reshape(-1, channels, 1)
    return x.contiguous().view(x.shape[0], channels, -1)


def channel_sum(block: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-channel sum of an ``(A, C, L)`` block."""
    if block.shape[2] == 1:
        return block.sum((0, 2), dtype=dtype)
    return block.sum(2, dtype=dtype).sum(0)


def channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel ``sum(a * b)`` of two ``(A, C, L)`` blocks.

    A sum of squares (``a is b``) with ``L > 1`` is taken as row norms, which needs no
    ``a * a`` temporary: on large tensors, allocating fresh memory costs more than the arithmetic.
    """
    if a is b and a.shape[2] > 1:
        norms: Tensor = torch.linalg.vector_norm(a, dim=2)  # torch.linalg is untyped
        return norms.square().sum(0)
    return (a * b).sum((0, 2))


def like(t: Tensor, reference: Tensor) -> Tensor:
    """``t`` with ``reference``'s dtype and memory layout, so their blocks line up."""
    if t.dtype == reference.dtype and t.stride() == reference.stride():
        return t
    return torch.empty_like(reference).copy_(t)


def affine(x: Tensor, scale: Tensor, shift: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``x * scale + shift`` per channel in one pass, rounded once to ``out_dtype``.

    torch vectorises a fused multiply-add only when at most one operand is broadcast along the
    innermost dimension. With channels innermost (2-D or channels-last) scale and shift already
    vary along it; otherwise shift is spread over one sample's spatial extent first (a tensor the
    size of one sample, small next to the batch).
    """
    scale_b, shift_b = per_channel(scale, x), per_channel(shift, x)
    if x.dim() > 2 and not channel_block(x).shape[2] == 1:
        shift_b = shift_b.expand(1, x.shape[1], *x.shape[2:]).contiguous()
    return torch.addcmul(shift_b, x, scale_b).to(out_dtype)


# --- The kernel ----------------------------------------------------------------------------


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
    mean, centred = centre(x)
    block = channel_block(centred)
    return mean, channel_dot(block, block) / (x.numel() // x.shape[1])


def centre(x: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(mean, x - mean)`` in the accumulation dtype; the batch mean unless ``mean`` is given."""
    acc = accumulate_dtype(x.dtype)
    if mean is None:
        mean = channel_sum(channel_block(x), acc) / (x.numel() // x.shape[1])
    return mean, x - per_channel(mean, x)


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
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


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
            running_var: Tensor | None, training: bool, momentum: float,
            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The forward pass: output, the mean used and ``invstd``; updates the running statistics.

    The contract every backend's ``forward`` keeps (arguments already checked by
    :func:`bnsurgery.functional.batch_norm`): ``y`` has ``x``'s shape, dtype and memory layout;
    ``mean`` and ``invstd`` are ``(C,)`` in the accumulation dtype (float32 for half inputs) and
    are what :func:`backward` needs; in training the running statistics are updated in place
    (each rounded once into its buffer) and left alone for an empty batch.
    """
    acc = accumulate_dtype(x.dtype)
    channels = x.shape[1]
    if x.numel() == 0:
        # An empty batch has no statistics: return an empty output and leave the buffers alone.
        empty = torch.zeros(channels, dtype=acc, device=x.device)
        return x.clone(), empty, empty
    weight = None if weight is None else weight.to(acc)
    bias = None if bias is None else bias.to(acc)
    if training:
        count = x.numel() // channels
        mean, centred = centre(x)
        block = channel_block(centred)
        var = channel_dot(block, block) / count
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
        invstd = torch.rsqrt(var + eps)
        # y = (x - mean) * invstd * weight + bias, from the centred values already at hand.
        scale = invstd if weight is None else invstd * weight
        shift = torch.zeros_like(scale) if bias is None else bias
        if centred.dtype != x.dtype:  # half input: float32 arithmetic, rounded once
            return affine(centred, scale, shift, x.dtype), mean, invstd
        # In place on the temporary: one allocation fewer, which on large tensors matters more
        # than one extra pass.
        y = centred.mul_(per_channel(scale, x))
        if bias is not None:
            y.add_(per_channel(bias, x))
        return y, mean, invstd
    # Evaluation with running statistics (the dispatcher refuses evaluation without them).
    stored_mean, stored_var = cast(Tensor, running_mean), cast(Tensor, running_var)
    mean, invstd = stored_mean.to(acc), torch.rsqrt(stored_var.to(acc) + eps)
    # y = x * scale + shift with scale = weight * invstd and shift = bias - mean * scale.
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return affine(x, scale, shift, x.dtype), mean, invstd


def backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
             training: bool, needs: tuple[bool, bool, bool]
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for input, weight and bias; see :mod:`bnsurgery.functional` for the formulas.

    The contract every backend's ``backward`` keeps: ``needs`` says which of the three are
    wanted (the others may be returned as ``None``); ``grad_x`` has ``x``'s dtype, ``grad_w`` and
    ``grad_b`` the accumulation dtype. It is never differentiated itself (double backward goes
    through :func:`bnsurgery.autograd_function.backward_differentiable`).

    In training mode ``dL/dx = a * g + b * (x - mean) + c`` per channel, with
    ``a = weight * invstd``, ``b = -a * invstd^2 * mean(g * (x - mean))`` and
    ``c = -a * mean(g)``: the formula of :mod:`bnsurgery.functional` with its per-channel factors
    gathered.
    """
    acc = invstd.dtype
    count = x.numel() // x.shape[1]
    # One input-sized scratch buffer serves every step: x - mean, then g * (x - mean) for its
    # per-channel sum, then dL/dx itself.
    _, scratch = centre(x, mean)
    g = like(grad_out, scratch)
    sum_dy = channel_sum(channel_block(g), acc)
    # The saved mean is rounded, so x - mean is off by a per-channel constant: the mean of the
    # centred values, ideally 0. Measuring it and taking sum(g) times it back out keeps
    # sum(g * (x - mean)) accurate when the mean is large next to the spread.
    residual = channel_sum(channel_block(scratch), acc) / count if training else None
    sum_dy_xmu = channel_sum(channel_block(scratch.mul_(g)), acc)
    if residual is not None:  # training
        sum_dy_xmu = sum_dy_xmu - residual * sum_dy
    a = invstd if weight is None else invstd * weight.to(acc)
    grad_x = None
    if needs[0]:
        if residual is not None:  # training
            b = -a * invstd.square() * (sum_dy_xmu / count)
            c = -a * (sum_dy / count) - b * residual
            grad_x = torch.sub(x, per_channel(mean, x), out=scratch).mul_(per_channel(b, x))
            grad_x.addcmul_(g, per_channel(a, x)).add_(per_channel(c, x))
        else:
            grad_x = torch.mul(g, per_channel(a, x), out=scratch)
        grad_x = grad_x.to(x.dtype)
    grad_w = sum_dy_xmu * invstd if needs[1] else None
    grad_b = sum_dy if needs[2] else None
    return grad_x, grad_w, grad_b
