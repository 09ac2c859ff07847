"""The autograd node of bnsurgery's BatchNorm: backward, forward mode and vmap written by hand.

:func:`bnsurgery.functional.batch_norm` hands every call that needs derivatives to
:class:`BatchNormFunction`. Its forward and first backward run on the backend that
:func:`bnsurgery.kernels.select_backend` picks. Everything a derivative of a derivative can see
runs out of place in differentiable torch operations instead:

- double backward (``create_graph=True``), forward mode through the backward, and every
  ``torch.func`` transform run :func:`backward_differentiable`, the backward formula written
  literally, so autograd and the transforms can take its derivative in turn (a compiled kernel's
  in-place scratch buffer would be invisible to them, or refused);
- forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``) runs
  :func:`forward_tangent`, the "Forward mode" formulas of :mod:`bnsurgery.functional`;
- ``torch.func.vmap`` runs :meth:`BatchNormFunction.vmap`, which turns a batch of ``B``
  independent BatchNorm problems over ``C`` channels into one problem over ``B * C`` channels
  (each sample's statistics are its own, so its channels are simply more channels).

The Function is written in the ``setup_context`` style that ``torch.func`` requires: ``forward``
takes no context and returns the mean and ``1/std`` it used next to the output, so that
``setup_context`` can save them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from bnsurgery.errors import BatchNormRuntimeError, format_message
from bnsurgery.kernel_tensor import per_channel, reduce_dims
from bnsurgery.kernels import select_backend

__all__ = [
    "BatchNormFunction",
    "CapturedBatchNormFunction",
    "backward_differentiable",
    "forward_tangent",
    "has_tangent",
    "is_batched",
    "transforms_active",
]


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is running around this call.

    Their wrapped tensors must only meet out-of-place, differentiable torch operations.
    """
    return torch._C._are_functorch_transforms_active()


def is_batched(t: Tensor) -> bool:
    """Whether ``t`` is a batched tensor of ``vmap``, including the older vmap that
    ``torch.autograd.grad(..., is_grads_batched=True)`` and ``gradcheck`` run backward under."""
    return (torch._C._functorch.is_functorch_wrapped_tensor(t)
            or torch._C._functorch.is_legacy_batchedtensor(t))


def has_tangent(*tensors: Tensor | None) -> bool:
    """Whether any of ``tensors`` carries a forward-mode tangent (``forward_ad.make_dual``)."""
    # torch keeps the innermost active dual level in this module global and offers no public
    # accessor; reading it first keeps the common case (no forward AD at all) free of cost.
    if forward_ad._current_level < 0:
        return False
    # torch leaves unpack_dual unannotated.
    return any(t is not None
               and forward_ad.unpack_dual(t).tangent is not None  # type: ignore[no-untyped-call]
               for t in tensors)


def backward_differentiable(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                            invstd: Tensor, training: bool, eps: float
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """The same gradients, written literally and out of place so autograd can differentiate them.

    Used for double backward (``create_graph=True``), for forward mode through the backward and
    under ``torch.func`` transforms. In training the statistics are recomputed from ``x`` inside
    the graph, because they depend on ``x`` and the second derivative must see that dependence.
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


def forward_tangent(x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
                    training: bool, dx: Tensor | None, dw: Tensor | None,
                    db: Tensor | None) -> Tensor | None:
    """The tangent of the output for tangents ``dx``, ``dw``, ``db`` of input, weight and bias.

    The "Forward mode" formulas of :mod:`bnsurgery.functional`, out of place (the tangents may be
    batched by ``torch.func.jacfwd``). ``mean`` and ``invstd`` are the ones the forward used.
    Tangents of the running statistics are not an argument: like torch, the output is treated
    as independent of them (they are buffers, not inputs one differentiates with respect to).

    Returns:
        The output tangent in ``x``'s dtype, or ``None`` when no tangent was given.
    """
    if dx is None and dw is None and db is None:
        return None
    acc = invstd.dtype
    dims = reduce_dims(x)
    centred = x.to(acc) - per_channel(mean, x)                 # x - mean
    x_hat = centred * per_channel(invstd, x)
    dy = torch.zeros_like(x_hat)
    if dx is not None:
        dxf = dx.to(acc)
        w = invstd.new_ones(()) if weight is None else per_channel(weight.to(acc), x)
        if training:
            d_centred = dxf - per_channel(dxf.mean(dims), x)          # dx - dmean
            dvar = 2 * (centred * d_centred).mean(dims)                # dvar
            dinvstd = -0.5 * invstd.pow(3) * dvar                      # dinvstd
            dx_hat = d_centred * per_channel(invstd, x) + centred * per_channel(dinvstd, x)
        else:
            dx_hat = dxf * per_channel(invstd, x)                      # mean, var constant
        dy = dy + w * dx_hat                                           # weight * dx_hat
    if dw is not None:
        dy = dy + per_channel(dw.to(acc), x) * x_hat                   # + dweight * x_hat
    if db is not None:
        dy = dy + per_channel(db.to(acc), x)                           # + dbias
    return dy.to(x.dtype)


def _needs_differentiable_backward(grad_out: Tensor, x: Tensor, weight: Tensor | None) -> bool:
    """Whether backward must run out of place: something will differentiate it or batch it."""
    if torch.is_grad_enabled():  # create_graph=True
        return True
    if torch.compiler.is_compiling():  # no transform inside a compiled graph; Dynamo cannot
        return False                   # trace the checks below
    return transforms_active() or is_batched(grad_out) or has_tangent(grad_out, x, weight)


def _flatten_per_channel(t: Tensor | None, bdim: int | None, batch: int) -> Tensor | None:
    """A per-sample ``(C,)`` tensor as one ``(B * C,)`` vector, sample-major."""
    if t is None:
        return None
    if bdim is None:
        return t.expand(batch, *t.shape).reshape(-1)
    return t.movedim(bdim, 0).reshape(-1)


def _refuse_unbatched_stats(name: str, shape: tuple[int, ...]) -> BatchNormRuntimeError:
    return BatchNormRuntimeError(format_message(
        f"training-mode batch_norm under vmap would update the unbatched {name} once per sample",
        where=name, got=f"an unbatched {name} of shape {shape} for a batched call",
        expected=f"a {name} batched like the input, or none",
        hint=("pass running statistics with the vmapped dimension too, call .eval() to read "
              "them, or build the layer with track_running_stats=False")))


class BatchNormFunction(torch.autograd.Function):
    """The autograd node of :func:`bnsurgery.functional.batch_norm`.

    Like torch's kernel it saves the input, the mean and ``1/std`` for backward (nothing
    input-sized besides the input itself) and recomputes ``x - mean`` when it is needed.
    ``apply`` returns ``(y, mean, invstd)``; only ``y`` is differentiable.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, invstd = select_backend(x).forward(x, weight, bias, running_mean, running_var,
                                                    training, momentum, eps)
        if running_mean is not None and mean is running_mean:  # evaluation in the accumulation
            # dtype: do not hand out a buffer
            mean = mean.clone()
        return y, mean, invstd

    # ctx is autograd's context object, typed Any in torch too: attributes are set on it freely.
    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]
                      ) -> None:
        x, weight, bias, _, _, training, _, eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)
        ctx.training = training
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_mean: Tensor | None,
                 _grad_invstd: Tensor | None) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        grads: tuple[Tensor | None, Tensor | None, Tensor | None]
        if x.numel() == 0:
            zeros = None if weight is None else torch.zeros_like(weight)
            grads = (torch.zeros_like(x), zeros, zeros)
        elif _needs_differentiable_backward(grad_out, x, weight):
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

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dw: Tensor | None, db: Tensor | None,
            *_ignored: Tensor | None) -> tuple[Tensor | None, None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        if x.numel() == 0:
            dy = None if dx is None and dw is None and db is None else torch.zeros_like(x)
        else:
            dy = forward_tangent(x, weight, mean, invstd, ctx.training, dx, dw, db)
        return dy, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], x: Tensor, weight: Tensor | None,
             bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
             training: bool, momentum: float, eps: float
             ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
        """``B`` BatchNorm problems over ``C`` channels as one over ``B * C`` channels.

        The vmapped dimension is moved next to the channels and merged with them, so each
        sample's channels get statistics of their own, which is what running the samples one
        by one computes. Running statistics updated in training must be batched too (one
        buffer per sample), as torch requires; they are updated in place through the merged
        view.
        """
        batch = info.batch_size
        x_dim, w_dim, b_dim, mean_dim, var_dim = in_dims[:5]
        if x_dim is None:
            x = x.expand(batch, *x.shape)
            x_dim = 0
        x = x.movedim(x_dim, 1)                                  # (N, B, C, *spatial)
        shape = x.shape
        merged_x = x.reshape(shape[0], shape[1] * shape[2], *shape[3:])
        stats = []
        for name, t, dim in (("running_mean", running_mean, mean_dim),
                             ("running_var", running_var, var_dim)):
            if training and t is not None and dim is None:
                raise _refuse_unbatched_stats(name, tuple(t.shape))
            # A copy when training, so the update can be written back whatever the layout.
            flat = _flatten_per_channel(t, dim, batch)
            stats.append(flat.clone() if training and flat is not None else flat)
        y, mean, invstd = BatchNormFunction.apply(
            merged_x, _flatten_per_channel(weight, w_dim, batch),
            _flatten_per_channel(bias, b_dim, batch), stats[0], stats[1], training, momentum, eps)
        if training:
            for t, dim, flat in ((running_mean, mean_dim, stats[0]),
                                 (running_var, var_dim, stats[1])):
                # An unbatched t was refused above, and flat is None only when t is.
                if t is not None and dim is not None and flat is not None:
                    t.movedim(dim, 0).copy_(flat.view(batch, -1))
        return ((y.view(shape), mean.view(batch, -1), invstd.view(batch, -1)), (1, 0, 0))


class CapturedBatchNormFunction(BatchNormFunction):
    """:class:`BatchNormFunction` as ``torch.compile`` sees it: without the forward-mode rule.

    Dynamo cannot trace an autograd Function that defines its own ``jvp`` (it breaks the graph
    there, and ``fullgraph=True`` fails); compiled graphs differentiate in reverse mode only.
    """

    jvp = torch.autograd.Function.jvp  # type: ignore[assignment]  # the base: no forward rule
