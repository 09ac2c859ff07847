"""Synchronised BatchNorm for distributed training, on CPU (gloo) as well as CUDA (NCCL).

With DistributedDataParallel every process sees only its share of the batch. BatchNorm must then
normalise with the statistics of the *global* batch, or each process normalises differently and
small per-process batches give noisy statistics. ``torch.nn.SyncBatchNorm`` does this on GPUs
only; :class:`SyncBatchNorm` here does it on any device a process-group backend supports, with
the forward and backward written out below.

Forward, training mode, over ``R`` ranks. Rank ``r`` holds ``n_r`` values per channel (``N``
samples times the spatial size) and computes, in two passes over its own data (the second also
corrects the first's rounding, see :func:`_rank_statistics`)::

    S_r  = sum(x)                      the sum of its values
    M2_r = sum((x - S_r / n_r)^2)      the sum of squared deviations from its *own* mean

One ``all_reduce`` gives every rank every ``(n_r, S_r, M2_r)``: each rank writes its triple into
its own row of an ``R``-row tensor of zeros, and summing the tensors over ranks fills every row
(adding zeros is exact, so this is an all-gather done with one all_reduce). Each rank then merges
the rows exactly, with the parallel form of Welford's update (Chan, Golub and LeVeque)::

    n    = sum_r n_r
    mean = sum_r S_r / n
    M2   = sum_r M2_r + sum_r n_r * (S_r / n_r - mean)^2
    var  = M2 / n                      biased: used to normalise
    running_var gets M2 / (n - 1)      unbiased: estimates the population variance

The second sum adds the spread *between* the ranks' means, measured from the global mean, so no
step subtracts two large nearly-equal numbers; ``E[x^2] - E[x]^2`` would, and loses every digit
when the mean is large compared to the spread. A rank with an empty batch sends ``n_r = 0`` and
contributes nothing. Each row also carries a status, the input's rank and channel count, so an
input that one rank cannot normalise (wrong channel count, rank or dtype) makes *every* rank raise
the same error after the collective instead of leaving the others waiting in it.

Backward, training mode, with ``g = dL/dy`` and ``x_hat = (x - mean) * invstd``. The statistics
depend on every rank's inputs, so the input gradient needs the gradient sums of the whole batch::

    sum_dy     = sum over all ranks of g
    sum_dy_xmu = sum over all ranks of g * (x - mean)
    dL/dx      = weight * invstd * (g - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n)

which costs one more ``all_reduce``, of ``2 * C + 1`` numbers (the extra one counts the ranks
that failed to compute their sums, so that a local error such as running out of memory is raised
on every rank rather than leaving the others waiting). The parameter gradients stay local,
``dL/dweight = invstd * sum(g * (x - mean))`` and ``dL/dbias = sum(g)`` over this rank's values,
as in ``torch.nn.SyncBatchNorm``: DistributedDataParallel reduces them with every other gradient.

Without an initialised process group, with a world of one process, or in evaluation mode, no
communication happens and the layer computes exactly what :class:`bnsurgery.BatchNorm2d` does.
The backward is not differentiable twice: differentiating it again raises.

What each rank computes between the collectives runs, on CPU, in the compiled kernels of
:mod:`bnsurgery.kernel_cpp` (``bnsurgery/csrc/sync_cpu.cpp``: one pass over the input for its
statistics, one to normalise; one for the gradient sums, one for ``dL/dx``) whenever
:func:`bnsurgery.kernels.select_backend` picks that backend for the input. Elsewhere (CUDA, graph
capture, ``BNSURGERY_KERNEL=reference``, no compiler) the pure-tensor building blocks of
:mod:`bnsurgery.kernel_tensor` compute the same formulas, written out below as the readable
reference. The collectives and the failure handling are the same for both.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules.batchnorm import _BatchNorm

from bnsurgery.errors import DistributedRunError, InvalidInputError, format_message
from bnsurgery.functional import batch_norm

# The building blocks of the pure-tensor kernel: the same memory-layout tricks and arithmetic,
# so the synced layer differs from the plain one only by its collectives.
from bnsurgery.kernel_tensor import (
    accumulate_dtype,
    affine,
    centre,
    channel_block,
    channel_dot,
    channel_sum,
    like,
    per_channel,
    update_running_stats,
)
from bnsurgery.kernels import BACKENDS, select_backend

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["SyncBatchNorm", "SyncBatchNormAct"]

#: Whether the installed torch's BatchNorm constructor has the keyword-only ``bias`` option.
_BASE_TAKES_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters

# Calls to batch_norm become single call_function nodes under torch.fx symbolic tracing.
torch.fx.wrap("batch_norm")

# Layout of one rank's row in the forward's all_reduce payload: a header, then per-channel sums
# and sums of squared deviations. float64 throughout, so counts stay exact far beyond float32's
# 2^24 and ranks with inputs of different dtypes still send rows of the same size.
_STATUS, _DIM, _CHANNELS, _COUNT = range(4)
_HEADER = 4
_PAYLOAD_DTYPE = torch.float64

# Status codes: why a rank could not contribute statistics.
_OK, _BAD_RANK, _BAD_DTYPE, _BAD_CHANNELS, _FAILED = range(5)


def _input_problem(x: object, num_features: int) -> int:
    """The status code of ``x`` for a layer of ``num_features`` channels (``_OK`` if fine)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return _BAD_DTYPE
    if x.dim() < 2:
        return _BAD_RANK
    if x.shape[1] != num_features or x.shape[1] == 0:
        return _BAD_CHANNELS
    return _OK


@dataclass(frozen=True)
class _RankStatistics:
    """One rank's share of the forward: ``n_r``, ``S_r``, ``M2_r`` and what normalising reuses
    (the pure-tensor path only: the compiled one normalises from ``x`` itself)."""

    count: int
    sums: Tensor  # (C,) float64
    sq_devs: Tensor  # (C,) float64
    mean: Tensor | None = None  # (C,) this rank's mean, rounded to the accumulation dtype
    centred: Tensor | None = None  # x - mean, accumulation dtype; normalised in place afterwards


def _local_kernels(x: Tensor) -> ModuleType | None:
    """The compiled CPU backend's module when it computes this rank's share of ``x``, else
    ``None``: the pure-tensor building blocks do (the backend choice of a plain BatchNorm)."""
    if not x.is_cpu:
        return None
    backend = select_backend(x)  # a module, as every backend is
    return (backend if isinstance(backend, ModuleType) and backend.__name__ == BACKENDS["cpp"]
            else None)


def _rank_statistics(x: Tensor, kernels: ModuleType | None = None) -> _RankStatistics:
    """``(n_r, S_r, M2_r)`` of one rank, with the corrected two-pass algorithm.

    The first pass gives the mean ``m`` rounded to the accumulation precision, the second the
    deviations ``d = x - m``, small numbers that are exact to form when the values cluster::

        S_r  = n_r * m + sum(d)            sum(d) recovers what rounding m lost
        M2_r = sum(d^2) - sum(d)^2 / n_r   and removes its effect on the squared deviations

    The rank means enter the merge's between-rank term to first order, so without the
    correction a float32 mean rounded near a large offset (values of 1000 +- 1, say) would cost
    digits of the variance that one process on the whole batch keeps.

    With ``kernels`` (see :func:`_local_kernels`) the compiled kernel computes the same triple,
    from per-chunk corrected two-pass sums merged in float64.
    """
    if kernels is not None:
        return _RankStatistics(*kernels.sync_statistics(x))
    count = x.numel() // x.shape[1]
    mean, centred = centre(x)
    block = channel_block(centred)
    dev_sum = channel_sum(block, centred.dtype).to(_PAYLOAD_DTYPE)
    dev_sq_sum = channel_dot(block, block).to(_PAYLOAD_DTYPE)
    sums = mean.to(_PAYLOAD_DTYPE) * count + dev_sum
    sq_devs = (dev_sq_sum - dev_sum.square() / count).clamp(min=0)
    return _RankStatistics(count, sums, sq_devs, mean, centred)


def _local_row(x: object, problem: int, stats: _RankStatistics | None, num_features: int,
               device: torch.device) -> Tensor:
    """This rank's row of the payload: header, ``S_r`` and ``M2_r`` (zeros when it has none)."""
    row = torch.zeros(_HEADER + 2 * num_features, dtype=_PAYLOAD_DTYPE, device=device)
    row[_STATUS] = problem
    if isinstance(x, Tensor):
        row[_DIM] = x.dim()
        row[_CHANNELS] = x.shape[1] if x.dim() >= 2 else -1
    if stats is not None:
        row[_COUNT] = stats.count
        row[_HEADER:_HEADER + num_features] = stats.sums
        row[_HEADER + num_features:] = stats.sq_devs
    return row


def _all_gather_rows(row: Tensor, group: ProcessGroup | None, world_size: int, rank: int) -> Tensor:
    """Every rank's row, ``(world_size, len(row))``, with exactly one ``all_reduce``."""
    payload = torch.zeros(world_size, row.numel(), dtype=row.dtype, device=row.device)
    payload[rank] = row
    # Looked up on the module at call time, so the benchmark can count the calls.
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    return payload


def _merge_statistics(counts: Tensor, sums: Tensor, sq_devs: Tensor, total: int | None = None
                      ) -> tuple[int, Tensor, Tensor]:
    """Global count, mean and biased variance from per-rank ``(n_r, S_r, M2_r)``; exact merge.

    Args:
        counts: ``(R,)`` values per channel on each rank; ranks with 0 contribute nothing.
        sums: ``(R, C)`` per-rank sums ``S_r``.
        sq_devs: ``(R, C)`` per-rank sums of squared deviations from the rank's own mean.
        total: ``counts.sum()`` if the caller already has it (saves a device synchronisation).

    Returns:
        ``(n, mean, var)`` with ``var = M2 / n`` (biased); ``mean`` and ``var`` keep the input
        dtype. With ``n = 0`` both are zeros.
    """
    if total is None:
        total = int(counts.sum().item())
    if total == 0:
        zeros = torch.zeros(sums.shape[1], dtype=sums.dtype, device=sums.device)
        return 0, zeros, zeros
    mean = sums.sum(0) / total
    rank_means = sums / counts.clamp(min=1).unsqueeze(1)
    # Chan et al.: the spread within each rank plus the spread of the ranks' means around the
    # global mean, each weighted by its count. An empty rank has weight 0.
    between = (counts.unsqueeze(1) * (rank_means - mean).square()).sum(0)
    var = (sq_devs.sum(0) + between) / total
    return total, mean, var


def _describe_problem(rank: int, row: list[float], num_features: int) -> str:
    status, dim, channels = int(row[_STATUS]), int(row[_DIM]), int(row[_CHANNELS])
    if status == _FAILED:
        return f"rank {rank}: failed computing its statistics (see that process's log)"
    if status == _BAD_DTYPE:
        return f"rank {rank}: not a floating-point tensor"
    if status == _BAD_RANK:
        return f"rank {rank}: a {dim}-D input, not (N, C, ...)"
    return f"rank {rank}: {channels} channels instead of {num_features}"


def _check_rows(header: list[list[float]], num_features: int, layer: str) -> int:
    """Raise the same error on every rank if any rank's input was bad; else the global count."""
    problems = [_describe_problem(rank, row, num_features)
                for rank, row in enumerate(header) if int(row[_STATUS]) != _OK]
    if problems:
        raise InvalidInputError(format_message(
            f"{layer} got inputs that cannot be normalised together", where=layer,
            got="; ".join(problems),
            expected=f"a floating-point (N, {num_features}, ...) input on every rank",
            hint="every process must feed this layer the same number of channels; the layer "
                 "before it differs between processes, or a process is given another model"))
    total = int(sum(row[_COUNT] for row in header))
    if total == 1:
        raise InvalidInputError(format_message(
            f"{layer} in training needs more than one value per channel across all ranks",
            where=layer, got="1 value per channel in the global batch",
            expected="N * prod(spatial) > 1 summed over the ranks",
            hint="use a larger batch, or call .eval() to use the running statistics"))
    return total


def _exchange_statistics(x: object, problem: int, stats: _RankStatistics | None,
                         num_features: int, group: ProcessGroup | None, world_size: int, rank: int,
                         device: torch.device, layer: str, failure: RuntimeError | None = None
                         ) -> tuple[int, Tensor, Tensor]:
    """The one forward collective: global ``(n, mean, var)`` in float64, or an error on every
    rank. Every rank calls it, valid input or not, so no rank is left waiting in it."""
    row = _local_row(x, problem, stats, num_features, device)
    rows = _all_gather_rows(row, group, world_size, rank)
    if failure is not None:
        raise failure
    total = _check_rows(rows[:, :_HEADER].tolist(), num_features, layer)
    _, mean, var = _merge_statistics(rows[:, _COUNT], rows[:, _HEADER:_HEADER + num_features],
                                     rows[:, _HEADER + num_features:], total)
    return total, mean, var


def _global_factors(mean64: Tensor, var64: Tensor, total: int, eps: float, acc: torch.dtype
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, mean_residual, invstd)`` in the accumulation dtype from the global float64
    statistics (zeros for an empty global batch)."""
    if total == 0:
        zeros = torch.zeros(mean64.numel(), dtype=acc, device=mean64.device)
        return zeros, zeros, zeros
    mean = mean64.to(acc)
    # What rounding the mean to the accumulation precision lost; the backward adds it back
    # (for float32 inputs far from zero it would otherwise bias the gradients).
    mean_residual = (mean64 - mean.to(_PAYLOAD_DTYPE)).to(acc)
    return mean, mean_residual, torch.rsqrt(var64 + eps).to(acc)


def _normalise(x: Tensor, stats: _RankStatistics, mean64: Tensor, invstd: Tensor,
               weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y = (x - mean) * invstd * weight + bias, from this rank's centred values: x - mean =
    (x - rank mean) - (mean - rank mean), the last term per channel."""
    acc = invstd.dtype
    centred, rank_mean = cast(Tensor, stats.centred), cast(Tensor, stats.mean)
    scale = invstd if weight is None else invstd * weight.to(acc)
    offset = (mean64 - rank_mean.to(_PAYLOAD_DTYPE)).to(acc)
    shift = -offset * scale if bias is None else bias.to(acc) - offset * scale
    if centred.dtype != x.dtype:  # half input: float32 arithmetic, rounded once
        return affine(centred, scale, shift, x.dtype)
    # In place on the temporary: no fresh input-sized allocation.
    return centred.mul_(per_channel(scale, x)).add_(per_channel(shift, x))


def _gradient_sums(grad_out: Tensor, x: Tensor, mean: Tensor, mean_residual: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This rank's ``(sum(g), sum(g * (x - mean)), scratch, g)`` in the accumulation dtype.

    One input-sized scratch buffer: x - mean, then g * (x - mean) for its sum, then dL/dx (see
    :func:`_input_gradient`). sum(g * (x - mean)) = sum(g * (x - rounded mean)) - residual *
    sum(g).
    """
    acc = mean.dtype
    _, scratch = centre(x, mean)
    g = like(grad_out, scratch)
    sum_dy = channel_sum(channel_block(g), acc)
    sum_dy_xmu = channel_sum(channel_block(scratch.mul_(g)), acc) - mean_residual * sum_dy
    return sum_dy, sum_dy_xmu, scratch, g


def _input_gradient(x: Tensor, g: Tensor, scratch: Tensor, weight: Tensor | None, mean: Tensor,
                    mean_residual: Tensor, invstd: Tensor, sum_dy: Tensor, sum_dy_xmu: Tensor,
                    total: int) -> Tensor:
    """dL/dx = a * g + b * (x - mean) + c per channel, with a = weight * invstd,
    b = -a * invstd^2 * mean(g * (x - mean)) and c = -a * mean(g), the means taken over the
    global batch (``sum_dy``, ``sum_dy_xmu`` over ``total`` values); x - mean = (x - rounded
    mean) - residual, whose last term folds into c. Written into ``scratch``."""
    acc = invstd.dtype
    a = invstd if weight is None else invstd * weight.to(acc)
    b = -a * invstd.square() * (sum_dy_xmu / total).to(acc)
    c = -a * (sum_dy / total).to(acc) - b * mean_residual
    grad_x = torch.sub(x, per_channel(mean, x), out=scratch)
    grad_x.mul_(per_channel(b, x)).addcmul_(g, per_channel(a, x))
    return grad_x.add_(per_channel(c, x)).to(x.dtype)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward with one all_reduce of statistics, backward with one all_reduce of gradient sums."""

    # ctx is autograd's context object, typed Any in torch too: attributes are set on it freely.
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, eps: float,
                momentum: float, group: ProcessGroup | None, world_size: int, rank: int,
                num_features: int,
                layer: str) -> Tensor:
        # ``x`` is validated inside the collective (it may not even be a tensor here), so the
        # payload is sized by num_features, which every rank agrees on, and not by the input.
        problem = _input_problem(x, num_features)
        stats = failure = kernels = None
        if problem == _OK and x.numel() > 0:
            try:
                kernels = _local_kernels(x)
                stats = _rank_statistics(x, kernels)
            except RuntimeError as exc:  # e.g. out of memory: re-raised after the collective
                problem, failure = _FAILED, exc
        device = x.device if isinstance(x, Tensor) else next(
            (t.device for t in (weight, running_mean) if t is not None), torch.device("cpu"))
        total, mean64, var64 = _exchange_statistics(x, problem, stats, num_features, group,
                                                    world_size, rank, device, layer, failure)
        if total > 0:
            update_running_stats(running_mean, running_var, mean64, var64, total, momentum)
        y: Tensor  # kernels is a module: mypy sees sync_normalise's results as Any
        if stats is not None and kernels is not None:
            y, mean, mean_residual, invstd = kernels.sync_normalise(x, mean64, var64, weight,
                                                                    bias, eps)
        else:
            mean, mean_residual, invstd = _global_factors(mean64, var64, total, eps,
                                                          accumulate_dtype(x.dtype))
            # An empty batch has nothing to normalise.
            y = x.clone() if stats is None else _normalise(x, stats, mean64, invstd, weight, bias)
        ctx.save_for_backward(x, weight, mean, mean_residual, invstd)
        ctx.kernels = kernels
        ctx.total = total
        ctx.group = group
        ctx.layer = layer
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, mean_residual, invstd = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        kernels, channels = ctx.kernels, mean.numel()
        sum_dy = sum_dy_xmu = torch.zeros(channels, dtype=invstd.dtype, device=x.device)
        scratch = g = None
        failure = None
        if x.numel() > 0:  # an empty batch contributes zeros, but still joins the collective
            try:
                if kernels is not None:
                    sum_dy, sum_dy_xmu = kernels.sync_gradient_sums(grad_out, x, mean,
                                                                    mean_residual)
                else:
                    sum_dy, sum_dy_xmu, scratch, g = _gradient_sums(grad_out, x, mean,
                                                                    mean_residual)
            except RuntimeError as exc:  # e.g. out of memory: re-raised after the collective
                failure = exc
        grad_x = grad_w = grad_b = None
        if needs_x:
            # One all_reduce: [number of ranks that failed, sum(g), sum(g * (x - mean))].
            sums = torch.cat([torch.full((1,), float(failure is not None), dtype=sum_dy.dtype,
                                         device=x.device), sum_dy, sum_dy_xmu])
            sums = sums.to(_PAYLOAD_DTYPE)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            _raise_for_failed_ranks(int(sums[0].item()), failure, ctx.layer)
            total = max(ctx.total, 1)
            global_dy, global_dy_xmu = sums[1:1 + channels], sums[1 + channels:]
            if x.numel() == 0:
                grad_x = torch.zeros_like(x)
            elif kernels is not None:
                grad_x = kernels.sync_input_gradient(grad_out, x, weight, mean, mean_residual,
                                                     invstd, global_dy, global_dy_xmu, total)
            else:
                grad_x = _input_gradient(x, cast(Tensor, g), cast(Tensor, scratch), weight, mean,
                                         mean_residual, invstd, global_dy, global_dy_xmu, total)
        elif failure is not None:
            raise failure
        if needs_w:
            grad_w = (sum_dy_xmu * invstd).to(weight.dtype)
        if needs_b:
            grad_b = sum_dy.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _raise_for_failed_ranks(failed: int, failure: RuntimeError | None, layer: str) -> None:
    """After a collective: re-raise this rank's own error, or report the other ranks'."""
    if failure is not None:
        raise failure
    if failed:
        raise DistributedRunError(format_message(
            f"{layer}: {failed} other rank(s) failed to compute their share of the batch",
            where=layer, hint="the error is in the other processes' logs"))


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all processes, for inputs ``(N, C, ...)``.

    The constructor, parameters, buffers and ``state_dict`` of ``torch.nn.SyncBatchNorm``, so
    checkpoints move freely between the two. Unlike torch's layer it also runs on CPU tensors
    (gloo), handles ranks with different batch sizes or an empty batch, merges the per-rank
    statistics exactly, and reports an input that some rank cannot normalise on every rank
    instead of leaving the others waiting in a collective.

    It derives from torch's ``_BatchNorm`` base, as ``torch.nn.SyncBatchNorm`` does, and not from
    ``torch.nn.SyncBatchNorm`` itself: DistributedDataParallel refuses every instance of that
    class in a CPU model ("SyncBatchNorm layers only work with GPU modules"), which would rule
    out the CPU training this layer exists for. ``isinstance(m, nn.SyncBatchNorm)`` is therefore
    False; bnsurgery recognises its layers by exact type.

    Training with an initialised process group of two or more processes synchronises: one
    ``all_reduce`` per forward and one per backward (see the module docstring for the maths).
    Otherwise (no process group, a world of one, evaluation mode) it computes exactly what
    :class:`bnsurgery.BatchNorm2d` computes, which equals ``torch.nn.BatchNorm2d``.

    The layer keeps no state beyond torch's attributes (``process_group`` included), so
    ``bnsurgery.replace_batchnorm(model, sync=True)`` (or ``bnsurgery.convert_sync_batchnorm``,
    the counterpart of torch's classmethod) can turn an existing BatchNorm into one without
    calling ``__init__``.

    Args:
        num_features: Number of channels ``C``.
        eps: Added to the variance for numerical stability.
        momentum: Weight of each batch in the running statistics; ``None`` for a cumulative
            average.
        affine: Learn a per-channel weight and bias.
        track_running_stats: Keep running statistics for evaluation.
        process_group: The group whose processes share statistics; ``None`` for the whole world.
        device: Device of the parameters and buffers.
        dtype: Dtype of the parameters and buffers.
        bias: Learn a bias (only with ``affine=True``).

    Limits:
        Layers built with different ``num_features`` on different ranks send payloads of
        different lengths, which one collective cannot detect: gloo aborts one process with
        "Received data size doesn't match expected size" and NCCL may wait until the process
        group's timeout. DistributedDataParallel refuses such models when it is built (it
        compares parameter shapes), unless the layer has neither affine parameters nor running
        statistics. The backward is not differentiable twice.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 bias: bool = True) -> None:
        if _BASE_TAKES_BIAS:
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             device=device, dtype=dtype, bias=bias)
        else:  # torch releases before the keyword-only ``bias``: same result, built by hand
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             device=device, dtype=dtype)
            if affine and not bias:
                self.register_parameter("bias", None)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        """Any rank of at least 2 (``(N, C, ...)``) with ``num_features`` channels."""
        problem = _input_problem(input, self.num_features)
        if problem == _BAD_RANK:
            raise InvalidInputError(format_message(
                f"{self._layer_name()} needs an input with a channel dimension",
                got=f"a {input.dim()}-D input of shape {tuple(input.shape)}",
                expected="at least 2-D (N, C, ...)"))
        if problem == _BAD_CHANNELS:
            raise InvalidInputError(format_message(
                f"{self._layer_name()} got the wrong number of channels",
                got=f"{input.shape[1]} channels (dim 1 of shape {tuple(input.shape)})",
                expected=f"{self.num_features} channels",
                hint="the layer before it produces a different number of channels"))
        # A wrong dtype is reported by bnsurgery.functional.batch_norm, with its own message.

    def _layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def _sync_setup(self) -> tuple[object, int, int] | None:
        """``(group, world_size, rank)`` when this training step must synchronise, else None."""
        group = getattr(self, "process_group", None)
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise InvalidInputError(format_message(
                    f"{self._layer_name()} was given a process group but torch.distributed is "
                    "not initialised", where="process_group", got=repr(group),
                    expected="torch.distributed.init_process_group() called first",
                    hint="call torch.distributed.init_process_group(...) before training, or set "
                         "process_group=None to train without synchronisation"))
            return None
        if group is None:
            group = dist.group.WORLD
        # torch.distributed.new_group() gives processes outside the new group a sentinel int.
        outside = isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER
        if not outside and not isinstance(group, dist.ProcessGroup):
            raise InvalidInputError(format_message(
                f"{self._layer_name()} needs a torch.distributed process group",
                where="process_group", got=type(group).__name__,
                expected="None or a group from torch.distributed.new_group()"))
        if outside or dist.get_rank(group) < 0:
            raise InvalidInputError(format_message(
                f"{self._layer_name()} is run by a process outside its process group",
                where="process_group", got=f"global rank {dist.get_rank()}, not a member",
                expected="a group this process belongs to",
                hint="give each process the group it is a member of (new_group() returns a "
                     "placeholder to the processes it leaves out)"))
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        return (group, world_size, rank) if world_size > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` with global batch statistics in training, running ones in eval.

        The running statistics follow torch's schedule (``num_batches_tracked`` counts training
        batches; ``momentum=None`` averages cumulatively) and are updated with the *global*
        statistics, so they stay identical on every rank. A batch that raises leaves every
        buffer as it was.
        """
        tracing = is_fx_symbolic_tracing()
        # A traced graph has no process group to talk to: it is traced for export or inference.
        sync = self._sync_setup() if self.training and not tracing else None
        counting = (self.training and self.track_running_stats
                    and self.num_batches_tracked is not None)
        factor = 0.0 if self.momentum is None else self.momentum
        if counting and self.momentum is None:
            factor = 1.0 / (float(cast(Tensor, self.num_batches_tracked)) + 1.0)
        # Batch statistics in training, and in evaluation when there are no running ones.
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        # Buffers are passed only when they are to be read or updated.
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        if sync is None:
            if not tracing:
                self._check_input_dim(input)
            output = batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                use_batch_stats, factor, self.eps)
        else:
            # Every rank enters the collective even with an input it cannot normalise, so that
            # all of them raise the same error instead of some waiting for the others.
            group, world_size, rank = sync
            output = _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean,
                                                  running_var, self.eps, factor, group,
                                                  world_size, rank, self.num_features,
                                                  self._layer_name())
        if counting:
            cast(Tensor, self.num_batches_tracked).add_(1)  # counting: it exists
        return output


class SyncBatchNormAct(SyncBatchNorm):
    """:class:`SyncBatchNorm` followed by dropout and an activation, in one module.

    The synchronised counterpart of :class:`bnsurgery.BatchNormAct2d` and of timm's
    ``SyncBatchNormAct``: the normalisation parameters live on the module itself, so checkpoints
    keep the keys of a plain BatchNorm, and the ``drop`` and ``act`` children are applied after
    normalising, in that order. A layer converted from timm's ``SyncBatchNormAct`` that lacks
    either child skips it, as timm's does.

    Args:
        num_features: Number of channels ``C``.
        eps: Added to the variance for numerical stability.
        momentum: Weight of each batch in the running statistics; ``None`` for a cumulative
            average.
        affine: Learn a per-channel weight and bias.
        track_running_stats: Keep running statistics for evaluation.
        process_group: The group whose processes share statistics; ``None`` for the whole world.
        device: Device of the parameters and buffers.
        dtype: Dtype of the parameters and buffers.
        bias: Learn a bias (only with ``affine=True``).
        act: Activation applied last; ``None`` for identity.
        drop: Dropout applied before the activation; ``None`` for identity.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 bias: bool = True,
                 act: nn.Module | None = None, drop: nn.Module | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, device, dtype, bias=bias)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        """Normalise (synchronised in training), then apply ``drop`` and ``act``."""
        output = super().forward(input)
        for name in ("drop", "act"):
            child = self._modules.get(name)
            if child is not None:
                output = child(output)
        return output
