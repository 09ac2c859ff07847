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

Forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp``). Given tangents ``dx``, ``dw``
and ``db`` of input, weight and bias, the output's tangent ``dy`` is the derivative of each
forward line in turn, in training mode::

    dmean    = mean(dx)
    dvar     = 2 * mean((x - mean) * (dx - dmean))
    dinvstd  = -0.5 * invstd^3 * dvar
    dx_hat   = (dx - dmean) * invstd + (x - mean) * dinvstd
    dy       = dw * x_hat + weight * dx_hat + db

A tangent that only shifts ``x`` (``dx`` constant per channel) is absorbed by ``dmean``, and
one that only scales ``x - mean`` by ``dinvstd``: the normalised output does not move. In evaluation
mode mean and var are constants again, so ``dy = dw * x_hat + weight * invstd * dx + db``.
Tangents of the running statistics are ignored, as torch ignores them: they are buffers, not
inputs one differentiates with respect to.

Half-precision inputs (float16, bfloat16) are normalised with float32 statistics and float32
arithmetic and rounded once to the input's dtype, as torch does; weight, bias and running
statistics may then be float32 (mixed precision) or of the input's dtype.

Reading order: these formulas; :func:`literal_batch_norm`, which writes them out line by line
(slow, and the oracle the tests hold every fast path to); then :func:`batch_norm`, which checks
its arguments as torch does and hands the work to a kernel. The kernels compute the same
formulas with the memory-layout engineering that makes them fast: :mod:`bnsurgery.kernel_tensor`
in torch operations, and the compiled backends that :mod:`bnsurgery.kernels` chooses between.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor
from torch.autograd import forward_ad

from bnsurgery.autograd_function import (
    BatchNormFunction,
    CapturedBatchNormFunction,
    has_tangent,
    transforms_active,
)
from bnsurgery.errors import (
    BatchNormDtypeError,
    BatchNormRuntimeError,
    BatchNormTypeError,
    ExportError,
    InvalidInputError,
    format_message,
)
from bnsurgery.kernel_tensor import accumulate_dtype, batch_norm_stats
from bnsurgery.kernels import fast_path, select_backend

__all__ = ["batch_norm", "batch_norm_stats", "literal_batch_norm"]


# --- The formulas, literally -----------------------------------------------------------------


def literal_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """The formulas of this module's docstring, one line each; the oracle for the fast paths.

    Differentiable by autograd as written (so it is a gradient oracle too), and slow: every step
    makes a tensor. It does no argument checking; :func:`batch_norm` is the function to call.

    Args:
        input: Tensor of shape ``(N, C, *spatial)``, non-empty.
        running_mean: ``(C,)``; read in evaluation, updated in place in training.
        running_var: ``(C,)``; read in evaluation, updated in place in training.
        weight: ``(C,)`` or ``None`` for 1.
        bias: ``(C,)`` or ``None`` for 0.
        training: Use (and record) the batch statistics rather than the running ones.
        momentum: Weight of this batch in the running-statistics update.
        eps: Added to the variance before the square root.

    Returns:
        The normalised tensor, in ``input``'s dtype.
    """
    x = input.to(accumulate_dtype(input.dtype))
    dims = [0, *range(2, x.dim())]               # every dimension but the channels
    shape = [1, -1] + [1] * (x.dim() - 2)        # a (C,) vector, broadcast against x
    count = x.numel() // x.shape[1]              # M, the values per channel
    if training:
        mean = x.mean(dims)                                    # mean   = sum(x) / M
        var = ((x - mean.view(shape)) ** 2).mean(dims)        # var    = sum((x - mean)^2) / M
        with torch.no_grad():
            unbiased = var * count / max(count - 1, 1)        # Bessel's correction M / (M - 1)
            if running_mean is not None:
                running_mean.copy_((1 - momentum) * running_mean + momentum * mean)
            if running_var is not None:
                running_var.copy_((1 - momentum) * running_var + momentum * unbiased)
    else:
        # Evaluation reads the running statistics; _check_arguments refused them missing.
        mean = cast(Tensor, running_mean).to(x.dtype)          # mean = running_mean
        var = cast(Tensor, running_var).to(x.dtype)            # var  = running_var
    invstd = 1 / torch.sqrt(var + eps)                         # invstd = 1 / sqrt(var + eps)
    x_hat = (x - mean.view(shape)) * invstd.view(shape)        # x_hat  = (x - mean) * invstd
    y = x_hat
    if weight is not None:
        y = weight.to(x.dtype).view(shape) * y                 # y = weight * x_hat ...
    if bias is not None:
        y = y + bias.to(x.dtype).view(shape)                   # ... + bias
    return y.to(input.dtype)


# --- Checks and dispatch ---------------------------------------------------------------------


def _raise_channel_mismatch(x: Tensor, *per_channel: Tensor | None) -> None:
    channels = x.shape[1]
    for name, t in zip(("running_mean", "running_var", "weight", "bias"), per_channel, strict=True):
        if t is not None and t.numel() != channels:
            raise BatchNormRuntimeError(format_message(
                f"{name} does not match the input's channel count", where=name,
                got=f"{t.numel()} elements for an input of shape {tuple(x.shape)}",
                expected=f"{channels} elements (dim 1 of the input)",
                hint="the layer was built for another number of channels; check num_features"))


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
    # Each check is one cheap test on the common path (this runs on every call, and a small
    # BatchNorm takes a few microseconds); the loops that name the culprit run only on failure.
    if ((running_mean is not None and running_mean.numel() != channels)
            or (running_var is not None and running_var.numel() != channels)
            or (weight is not None and weight.numel() != channels)
            or (bias is not None and bias.numel() != channels)):
        _raise_channel_mismatch(x, running_mean, running_var, weight, bias)
    if training and not eps > 0 or not eps >= 0:
        raise InvalidInputError(format_message(
            "batch_norm eps must be positive in training and non-negative in evaluation",
            where="eps", got=eps, expected="eps > 0" if training else "eps >= 0",
            hint="the usual value is eps=1e-5"))
    if torch.is_grad_enabled() and (
            (running_mean is not None and running_mean.requires_grad)
            or (running_var is not None and running_var.requires_grad)):
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


def _buffers_without_tangents(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                              running_mean: Tensor | None, running_var: Tensor | None
                              ) -> tuple[Tensor | None, Tensor | None]:
    """The running statistics with forward-mode tangents dropped, as torch drops them.

    When a forward-mode derivative is being computed the buffers are not inputs one can
    differentiate by, so a tangent on them is refused in torch's own words; otherwise the
    tangents are unused and ignored.
    """
    if not has_tangent(running_mean, running_var):
        return running_mean, running_var
    if has_tangent(input, weight, bias):
        raise BatchNormRuntimeError(format_message(
            "batch_norm is not differentiable wrt running_mean and running_var, they "
            "cannot have forward grad defined", where="running_mean/running_var",
            got="a dual tensor (forward_ad.make_dual) with a tangent",
            expected="plain buffers", hint="pass the buffers without a tangent"))
    # torch leaves unpack_dual unannotated.
    mean, var = (None if t is None else forward_ad.unpack_dual(t).primal  # type: ignore[no-untyped-call]
                 for t in (running_mean, running_var))
    return mean, var


def _refuse_training_trace() -> None:
    raise ExportError(format_message(
        "torch.jit.trace cannot record training-mode batch_norm faithfully",
        where="input", got="training=True",
        expected="an evaluation-mode trace",
        hint=("the batch statistics divide by the number of values per channel, which a "
              "trace would freeze as a constant; call .eval() before torch.jit.trace, or "
              "use torch.export.export, which keeps the shapes symbolic")))


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
        ExportError: Training mode under ``torch.jit.trace``, which would freeze the batch size
            into the statistics (evaluation-mode traces are exact).
    """
    fast = fast_path()
    if fast is not None:
        # The compiled CPU kernel makes the checks below in C++ and runs; it returns None when
        # any fails, or an argument is not a plain CPU tensor, and the Python path says why.
        out = fast(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if out is not None:
            return out
    _check_arguments(input, running_mean, running_var, weight, bias, training, eps)
    if input.dim() < 2:  # only an empty one passes the checks
        return input.clone()
    # Each condition below is evaluated once: a small BatchNorm costs a few microseconds, and
    # the checks would otherwise cost as much as the kernel.
    tracing = torch.jit.is_tracing()  # type: ignore[attr-defined, no-untyped-call]  # not in __all__
    if tracing and training:
        _refuse_training_trace()
    # Forward-mode AD (a dual level is open) and torch.func transforms need the Python Function.
    special = forward_ad._current_level >= 0 or transforms_active()
    if special:
        running_mean, running_var = _buffers_without_tangents(input, weight, bias, running_mean,
                                                              running_var)
        special = transforms_active() or has_tangent(input, weight, bias)
    backend = select_backend(input)
    grad_wanted = torch.is_grad_enabled() and (
        input.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad))
    if tracing or not (grad_wanted or special):
        # Inference (or no_grad): the same maths without building an autograd node. A
        # TorchScript trace takes this path too, gradients or not: it must record torch
        # operators (a Python Function cannot be saved), and autograd differentiates those.
        return backend.forward(input, weight, bias, running_mean, running_var, training,
                               momentum, eps)[0]
    if not special and getattr(backend, "AUTOGRAD_IN_KERNEL", False):
        # Reverse mode on a backend whose operators carry their own derivative (a C++ autograd
        # node): one operator call, no Python Function. Transforms and forward mode below.
        return backend.forward(input, weight, bias, running_mean, running_var, training,
                               momentum, eps)[0]
    # Dynamo cannot trace a Function with its own forward-mode rule; compiled graphs get the
    # same node without it.
    function = CapturedBatchNormFunction if torch.compiler.is_compiling() else BatchNormFunction
    # Function.apply is untyped in torch; it returns what BatchNormFunction.forward returns.
    outputs: tuple[Tensor, Tensor, Tensor] = function.apply(
        input, weight, bias, running_mean, running_var, training, momentum, eps)
    return outputs[0]
