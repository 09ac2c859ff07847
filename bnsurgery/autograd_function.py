"""The autograd node of bnsurgery's BatchNorm: forward and backward written out by hand.

:func:`bnsurgery.functional.batch_norm` hands every call that needs gradients to
:class:`BatchNormFunction`. Its forward and first backward run on the backend that
:func:`bnsurgery.kernels.select_backend` picks; double backward (``create_graph=True``) runs
:func:`backward_differentiable`, the backward formula written literally in differentiable torch
operations, so autograd can take its derivative in turn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnsurgery.kernel_tensor import per_channel, reduce_dims
from bnsurgery.kernels import select_backend

__all__ = ["BatchNormFunction", "backward_differentiable"]


def backward_differentiable(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                            invstd: Tensor, training: bool, eps: float
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """The same gradients, written literally and out of place so autograd can differentiate them.

    Used for double backward (``create_graph=True``). In training the statistics are recomputed
    from ``x`` inside the graph, because they depend on ``x`` and the second derivative must see
    that dependence.
    """
    acc = invstd.dtype
    dims = reduce_dims(x)
    xf, g = x.to(acc), grad_out.to(acc)
    if training:
        mean = xf.mean(dims)
        var = (xf - per_channel(mean, x)).square().mean(dims)
        invstd = torch.rsqrt(var + eps)
    x_hat = (xf - per_channel(mean, x)) * per_channel(invstd, x)
    w = torch.ones_like(invstd) if weight is None else weight.to(acc)
    grad_b = g.sum(dims)
    grad_w = (g * x_hat).sum(dims)
    if training:
        inner = g - per_channel(g.mean(dims), x) - x_hat * per_channel((g * x_hat).mean(dims), x)
    else:
        inner = g
    grad_x = per_channel(w * invstd, x) * inner
    return grad_x.to(x.dtype), grad_w, grad_b


class BatchNormFunction(torch.autograd.Function):
    """The autograd node of :func:`bnsurgery.functional.batch_norm`.

    Like torch's kernel it saves the input, the mean and ``1/std`` for backward (nothing
    input-sized besides the input itself) and recomputes ``x - mean`` when it is needed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                momentum: float, eps: float) -> Tensor:
        y, mean, invstd = select_backend(x).forward(x, weight, bias, running_mean, running_var,
                                                    training, momentum, eps)
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
            grads = backward_differentiable(grad_out, x, weight, mean, invstd, ctx.training,
                                            ctx.eps)
        else:
            grads = select_backend(x).backward(grad_out, x, weight, mean, invstd, ctx.training,
                                               needs)
        grad_x, grad_w, grad_b = (g if need else None for g, need in zip(grads, needs, strict=True))
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and ctx.bias_dtype is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None
