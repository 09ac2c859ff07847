"""Re-estimate BatchNorm running statistics from data, exactly.

After pruning, quantisation, a change of input resolution, weight averaging or surgery, running
statistics no longer describe the activations. :func:`recalibrate_batchnorm` runs the data through
the model with *only* the BatchNorm layers in training mode (dropout and stochastic depth keep the
mode they had), measures each layer's input per channel, and sets

* ``running_mean`` to the mean over every value the layer saw, and
* ``running_var`` to their unbiased variance (BatchNorm's convention for running statistics),

computed to float64 accuracy by Chan's parallel merge of per-batch moments, so the result is the
statistic of the whole dataset, not a momentum average. Under ``torch.distributed`` the per-rank
moments are merged the same way, so every rank ends with identical buffers equal to a single
process seeing all the data. Layers that should not change (frozen classes, layers without running
statistics, layers the caller excludes) are left alone and listed in the report.

What a layer hands on during the pass is what training would: its input normalised with *this
batch's* mean and biased variance (not the running estimate). A plain ``nn.BatchNorm1d/2d/3d``
takes them from the float64 moments it is being measured with, rounded once to its dtype, and
normalises in one pass, instead of measuring the batch a second time in its own training-mode
forward; its output then differs from that forward's only by the rounding of the statistics
(torch's are float32). Any other BatchNorm class (a subclass that does more after normalising,
bnsurgery's own classes) runs its own training-mode forward, its input measured by a hook.

Where the compiled CPU kernel runs (:mod:`bnsurgery.kernels` chooses it for the input, as for
every bnsurgery BatchNorm), a plain BatchNorm is measured and normalised by one operator,
:func:`bnsurgery.kernel_cpp.measure`, with the input read from memory once rather than once for
the moments and once more to normalise: the same moments to float64 rounding, the same output to
the rounding of its dtype (closer to exact where the mean is far larger than the spread: it
centres before it scales, where torch's evaluation kernel folds the mean into a shift).
Elsewhere, and with ``BNSURGERY_KERNEL=reference``, :func:`batch_moments` and ``F.batch_norm``
do it in torch operations, the readable reference.

Two things keep the pass near the cost of a plain forward pass. A large output (4 MiB and up) is
written, in a later batch, into one handed on before, once nothing else can reach that one
(reference counts, views and storage are checked, see :func:`_unshared`): fresh memory of that
size page-faults its way in, which costs more than the normalisation. And a layer's per-batch
moments are merged a few dozen batches at a time rather than after every batch.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnsurgery import kernels
from bnsurgery._bn_registry import batchnorm_kind, looks_like_batchnorm
from bnsurgery.errors import InvalidInputError, format_message
from bnsurgery.kernel_tensor import channel_block, channel_dot, channel_sum

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "LayerRecalibration",
    "RecalibrationReport",
    "batch_moments",
    "merge_moments",
    "recalibrate_batchnorm",
]

_F64 = torch.float64


def merge_moments(counts: Tensor, means: Tensor, sq_devs: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's exact merge of per-part moments into the moments of the union.

    Args:
        counts: ``(R,)`` values per channel in each part (0 for an empty part).
        means: ``(R, C)`` per-part means.
        sq_devs: ``(R, C)`` per-part sums of squared deviations from the part's own mean.

    Returns:
        ``(count, mean, sq_dev)`` of the union, float64; with a zero count, zeros.
    """
    counts, means, sq_devs = counts.to(_F64), means.to(_F64), sq_devs.to(_F64)
    total = counts.sum()
    if float(total) == 0:
        return total, torch.zeros_like(means[0]), torch.zeros_like(means[0])
    weights = counts.unsqueeze(1)
    mean = (weights * means).sum(0) / total
    # The spread within each part plus the spread of the parts' means around the union's mean.
    sq_dev = sq_devs.sum(0) + (weights * (means - mean).square()).sum(0)
    return total, mean, sq_dev


@dataclass(frozen=True)
class LayerRecalibration:
    """What recalibration did to one BatchNorm.

    Attributes:
        name: Qualified name of the layer.
        samples: Values per channel it saw (batch size times spatial positions, summed).
        old_mean: Norm of the running mean before.
        new_mean: Norm of the running mean after.
        mean_change: ``|new_mean - old_mean| / max(|old_mean|, |sqrt(old_var)|)``, vector norms.
        var_change: ``|new_var - old_var| / |old_var|``, vector norms.
        near_zero_variance: Channels whose new variance is below the layer's ``eps``.
    """

    name: str
    samples: int
    old_mean: float
    new_mean: float
    mean_change: float
    var_change: float
    near_zero_variance: tuple[int, ...] = ()

    @property
    def change(self) -> float:
        """The larger of the two relative changes."""
        return max(self.mean_change, self.var_change)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"name": self.name, "samples": self.samples, "old_mean_norm": self.old_mean,
                "new_mean_norm": self.new_mean, "mean_change": self.mean_change,
                "var_change": self.var_change,
                "near_zero_variance_channels": list(self.near_zero_variance)}


@dataclass(frozen=True)
class RecalibrationReport:
    """The outcome of :func:`recalibrate_batchnorm`.

    Attributes:
        model: The recalibrated model (the caller's own when ``inplace=True``).
        layers: One record per BatchNorm whose statistics were re-estimated.
        skipped: Layer name -> why its statistics were left as they were.
        batches: Batches run on this process.
        world_size: Processes whose statistics were merged (1 without torch.distributed).
        seconds: Wall time of the data pass.
    """

    model: nn.Module = field(repr=False, compare=False)
    layers: tuple[LayerRecalibration, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    world_size: int = 1
    seconds: float = 0.0

    def most_changed(self, count: int = 5) -> tuple[LayerRecalibration, ...]:
        """The ``count`` layers whose statistics moved most."""
        return tuple(sorted(self.layers, key=lambda r: -r.change)[:count])

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (without the model)."""
        return {"layers": [r.to_dict() for r in self.layers], "skipped": dict(self.skipped),
                "most_changed": [r.name for r in self.most_changed()],
                "batches": self.batches, "world_size": self.world_size,
                "seconds": self.seconds}

    def __str__(self) -> str:
        lines = [f"BatchNorm recalibration: {len(self.layers)} layers re-estimated from "
                 f"{self.batches} batches x {self.world_size} process(es) in "
                 f"{self.seconds:.2f} s, {len(self.skipped)} left alone"]
        if self.layers:
            lines.append("moved most (relative change of mean / variance):")
            for record in self.most_changed():
                lines.append(f"  {record.name}: {record.mean_change:.3g} / "
                             f"{record.var_change:.3g}")
        flat = [r for r in self.layers if r.near_zero_variance]
        for record in flat:
            lines.append(f"note: {record.name} has {len(record.near_zero_variance)} channel(s) "
                         "with near-zero variance")
        for name, reason in self.skipped.items():
            lines.append(f"left alone: {name}: {reason}")
        return "\n".join(lines)


#: Values converted to float64 at a time: 1 MiB, so the float64 buffer stays in a core's L2
#: cache and is reused for every chunk (fresh large allocations cost more than the arithmetic),
#: yet few enough chunks that the per-chunk calls cost little.
_CHUNK_VALUES = 1 << 17


def batch_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """Per-channel count, mean and sum of squared deviations of ``x``, exact to float64.

    The float64 copy of a large activation costs more than the arithmetic, so the values are
    converted a cache-sized chunk at a time into one reused buffer (a mixed-dtype operation
    would allocate a converted copy of its input on the CPU) and reduced while they are hot. One
    pass gathers ``sum(d)`` and ``sum(d^2)`` of ``d = x - K``, shifted by ``K``, the float64 mean
    of the first chunk (the squares are summed as row norms, so no ``d * d`` is written).
    ``sum(d^2) - sum(d)^2 / n`` cancels by the factor ``sum(d^2) / sq_dev = 1 + n (mean - K)^2 /
    sq_dev``, and since the first chunk's own ``n0`` values contribute at least
    ``n0 (K - mean)^2`` to ``sq_dev``, that factor is at most ``1 + n / n0``, about the number of
    chunks: the variance keeps all but a few of float64's 16 digits, however large the mean is
    next to the spread (the naive ``E[x^2] - E[x]^2`` loses them all).

    Args:
        x: A BatchNorm input ``(N, C, ...)`` of any float dtype and layout.

    Returns:
        ``(count, mean, sq_dev)``: values per channel, and two float64 ``(C,)`` tensors.
    """
    block = channel_block(x.detach())
    rows, channels, length = block.shape
    count = rows * length
    step = min(rows, max(1, _CHUNK_VALUES // max(1, channels * length)))
    buffer = torch.empty((step, channels, length), dtype=_F64, device=x.device)
    buffer.copy_(block[:step])
    shift = (channel_sum(buffer, _F64) / (step * length)).view(1, -1, 1)
    total = torch.zeros(channels, dtype=_F64, device=x.device)
    squares = torch.zeros_like(total)
    for start in range(0, rows, step):
        chunk = block[start:start + step]
        deviation = buffer[:chunk.shape[0]]
        if start:  # the first chunk is in the buffer already
            deviation.copy_(chunk)
        deviation.sub_(shift)
        total += channel_sum(deviation, _F64)
        squares += channel_dot(deviation, deviation)
    mean = shift.flatten() + total / count
    sq_dev = squares - total.square() / count
    return count, mean, sq_dev.clamp(min=0)


class _Moments:
    """Float64 count, mean and sum of squared deviations of one layer's input, per channel.

    Batches' moments are kept and merged a few dozen at a time (:func:`merge_moments`, Chan's
    formula over all parts at once): a merge per batch is four small tensor operations per layer,
    which in a network of small layers costs as much as measuring one. Not all of them until the
    end: thousands of small tensors kept alive scatter the heap, and the large activations
    allocated between them then come from fresh, page-faulting memory.
    """

    #: Parts kept before they are merged into one.
    PARTS = 32

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.means: list[Tensor] = []
        self.sq_devs: list[Tensor] = []

    def add(self, x: Tensor) -> tuple[int, Tensor, Tensor] | None:
        """Measure one batch, merge it in, and return its own moments (``None`` when empty)."""
        if x.dim() < 2:
            raise InvalidInputError(format_message(
                "A BatchNorm input needs a batch and a channel axis", got=tuple(x.shape),
                expected="(N, C, ...)"))
        if x.numel() == 0:
            return None
        count, mean, sq_dev = batch_moments(x)
        self.merge(count, mean, sq_dev)
        return count, mean, sq_dev

    def merge(self, count: int, mean: Tensor, sq_dev: Tensor) -> None:
        """Merge in one batch's moments (``count`` values per channel, float64 ``(C,)``)."""
        self.counts.append(count)
        self.means.append(mean)
        self.sq_devs.append(sq_dev)
        if len(self.counts) >= self.PARTS:
            merged = self.total()
            if merged[1] is not None:  # always: there are parts
                self.counts, self.means, self.sq_devs = [merged[0]], [merged[1]], [merged[2]]

    def total(self) -> tuple[int, Tensor, Tensor] | tuple[int, None, None]:
        """``(count, mean, sq_dev)`` over every batch merged in; ``(0, None, None)`` for none."""
        if not self.counts:
            return 0, None, None
        if len(self.counts) == 1:
            return self.counts[0], self.means[0], self.sq_devs[0]
        counts = torch.tensor(self.counts, dtype=_F64, device=self.means[0].device)
        _, mean, sq_dev = merge_moments(counts, torch.stack(self.means),
                                        torch.stack(self.sq_devs))
        return sum(self.counts), mean, sq_dev


#: BatchNorm classes whose training-mode forward is exactly ``F.batch_norm`` with batch statistics
#: (exact types: a subclass such as timm's ``BatchNormAct2d`` does more after normalising).
_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: Input dtypes the compiled measure-and-normalise operator takes.
_MEASURED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _compiled_measure(x: Tensor) -> Callable[..., tuple[Tensor, Tensor, Tensor]] | None:
    """The backend's measure-and-normalise operator for ``x``, or ``None`` for the torch path.

    The backend is the one every bnsurgery BatchNorm would use for ``x`` (so
    ``BNSURGERY_KERNEL=reference`` selects the torch path, and so do graph capture and tensor
    subclasses); only a backend that offers ``measure`` (the compiled CPU kernel) has one. Other
    devices are not asked: choosing a backend there would load its compiler for nothing.
    """
    if not x.is_cpu or x.dtype not in _MEASURED_DTYPES:
        return None
    return getattr(kernels.select_backend(x), "measure", None)


# --- Reusing outputs ----------------------------------------------------------------------------
# A fresh multi-megabyte output is new memory to the process, and writing it page-faults its way
# in: inside resnet18 at batch 8 and 128 px, writing the stem's (8, 64, 64, 64) output (8 MiB)
# took 3.4 ms into a fresh tensor and 1.3 ms into one written before. So during the pass each
# output of at least _REUSE_BYTES is kept, and the next BatchNorm of that shape writes into it
# again, but only once nothing else can reach it (:func:`_unshared`). Smaller outputs are not
# kept: the allocator hands those back from memory that was just freed and is still in cache,
# which a kept buffer is not (the (8, 64, 32, 32) ones took 0.38 ms into a kept buffer, 0.30 ms
# into a fresh one; the pass as a whole ran 2-3% slower keeping outputs from 1 MiB than from
# 4 MiB).

#: Outputs at least this large are reused (see above).
_REUSE_BYTES = 1 << 22
#: ``torch._C._storage_Use_Count`` (private, so looked up): how many tensors and storage
#: objects share a storage. Without it no output is reused.
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)
#: Reference counts are read with ``sys.getrefcount``, exact on CPython with the GIL up to 3.13.
#: 3.14 leaves some references on the interpreter's stack uncounted, and a free-threaded build
#: counts lazily, so neither reuses outputs.
_COUNTS_EXACT = sys.version_info < (3, 14) and getattr(sys, "_is_gil_enabled", lambda: True)()


def _unshared(tensor: Tensor, holders: int) -> bool:
    """True when the caller's ``holders`` references are the only ones to ``tensor`` and
    nothing else reaches its memory: no other Python or C++ handle on it, no view, no storage
    object held."""
    # getrefcount sees the caller's references, this function's parameter and its own argument.
    if (not _COUNTS_EXACT or _STORAGE_USE_COUNT is None
            or sys.getrefcount(tensor) != holders + 2):
        return False
    use_count = getattr(tensor, "_use_count", None)
    if use_count is None or use_count() != 1:
        return False
    storage = tensor.untyped_storage()
    return (sys.getrefcount(storage), _STORAGE_USE_COUNT(storage._cdata)) == _lone_storage()


@functools.cache
def _lone_storage() -> tuple[int, int]:
    """What :func:`_unshared` sees of the storage of a tensor that nothing else reaches.

    Measured rather than written down: how a storage object counts its references (one of them
    may be its own tensor's, kept so the object survives) is torch's business, not this module's.
    """
    if _STORAGE_USE_COUNT is None:
        return (-1, -1)  # matches nothing
    probe = torch.empty(1)
    storage = probe.untyped_storage()
    return sys.getrefcount(storage), int(_STORAGE_USE_COUNT(storage._cdata))


#: Outputs kept per shape. Two are alive at once in a residual stage (a block's output is the
#: next block's shortcut while that block's last BatchNorm runs); one more for a branch.
_KEPT_PER_SHAPE = 3


class _Spares:
    """Outputs handed on earlier in the pass, a few per shape, written again once nothing else
    holds them (see above). Per shape, not per layer: a pass keeps no more memory than a few
    outputs of each large shape, not one per BatchNorm as a training step would."""

    def __init__(self) -> None:
        self.by_shape: dict[tuple[object, ...], list[Tensor]] = {}

    def take(self, x: Tensor) -> Tensor | None:
        """A kept output to write ``x``'s into, or ``None`` (the operator allocates one)."""
        if (torch.is_grad_enabled() or not x.is_contiguous()
                or x.numel() * x.element_size() < _REUSE_BYTES):
            return None
        kept = self.by_shape.get((x.shape, x.dtype, x.device))
        if not kept:
            return None
        for i in range(len(kept)):  # by index: enumerate's tuple would hold one more reference
            spare = kept[i]
            # References: the list's and this local name's.
            if _unshared(spare, 2):
                del kept[i]
                return spare
        return None

    def keep(self, output: Tensor) -> None:
        """Keep ``output`` for a later BatchNorm of its shape, if it is large enough to pay."""
        if output.is_contiguous() and output.numel() * output.element_size() >= _REUSE_BYTES:
            kept = self.by_shape.setdefault((output.shape, output.dtype, output.device), [])
            kept.append(output)
            del kept[:-_KEPT_PER_SHAPE]


class _BatchStatisticsForward:
    """A plain BatchNorm's training-mode output, normalised with the batch moments just measured.

    During recalibration a BatchNorm must still hand the next layers what training would: its
    input normalised with *this batch's* mean and biased variance. Its own training-mode forward
    would measure them a second time (and move its running buffers, which are overwritten
    afterwards anyway); here they come from the float64 moments the layer is being measured with.
    Where the compiled kernel runs, one operator measures the input and normalises it while it is
    still in cache; elsewhere :func:`batch_moments` measures it and the one-pass evaluation
    kernel normalises it with those batch statistics. Installed as the instance's ``forward`` for
    the pass only, so the module's hooks still run.
    """

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, moments: _Moments,
                 spares: _Spares) -> None:
        self.module, self.moments, self.spares = module, moments, spares

    def __call__(self, x: Tensor) -> Tensor:
        module = self.module
        module._check_input_dim(x)  # type: ignore[no-untyped-call]  # unannotated in torch
        dtype = x.dtype if module.running_mean is None else module.running_mean.dtype
        channels = x.shape[1]  # _check_input_dim has seen a batch and a channel axis
        if channels and x.numel() >= 2 * channels and (measure := _compiled_measure(x)):
            output, mean, sq_dev = measure(x, module.weight, module.bias, dtype, module.eps,
                                           self.spares.take(x))
            self.moments.merge(x.numel() // channels, mean, sq_dev)
            self.spares.keep(output)
            return output
        measured = self.moments.add(x)
        if measured is None or measured[0] < 2:  # torch's own forward says what is wrong
            return type(module).forward(module, x)
        count, mean, sq_dev = measured
        return F.batch_norm(x, mean.to(dtype), (sq_dev / count).to(dtype), module.weight,
                            module.bias, training=False, momentum=0.0, eps=module.eps)


def _measure_input(moments: _Moments, _module: nn.Module, args: tuple[object, ...]) -> None:
    """A forward pre-hook (bound with ``functools.partial``): measure a BatchNorm's input."""
    if args and isinstance(args[0], Tensor):
        moments.add(args[0])


def _skip_reason(module: nn.Module) -> str | None:
    kind = batchnorm_kind(module)
    if kind is not None and kind.frozen:
        return "a frozen BatchNorm class, whose statistics are fixed by design"
    if not isinstance(getattr(module, "running_mean", None), Tensor) or not isinstance(
            getattr(module, "running_var", None), Tensor):
        return "it has no running statistics (track_running_stats=False)"
    if kind is None and not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (f"its class {type(module).__qualname__} is not a BatchNorm bnsurgery knows; its "
                "training-mode forward is unknown")
    return None


def _run(model: nn.Module, batch: object, device: torch.device | None) -> None:
    def move(value: object) -> object:
        return value.to(device) if isinstance(value, Tensor) and device is not None else value

    if isinstance(batch, Tensor):
        model(move(batch))
    elif isinstance(batch, (tuple, list)) and batch:
        model(move(batch[0]))  # (inputs, targets, ...) as a DataLoader yields them
    elif isinstance(batch, Mapping):
        model(**{key: move(value) for key, value in batch.items()})
    else:
        raise InvalidInputError(format_message(
            "recalibrate_batchnorm got a batch it cannot feed to the model", where="data",
            got=type(batch).__name__, expected="a tensor, a (inputs, ...) tuple or a dict",
            hint="pass an iterable of input tensors, e.g. a DataLoader"))


class _Progress:
    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled, self.total, self.start = enabled, total, time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\rrecalibrating BatchNorm: {done}{of} batches ({rate:.1f}/s)")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _world(process_group: ProcessGroup | None) -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def _merge_across_ranks(moments: list[tuple[str, _Moments, int]],
                        process_group: ProcessGroup | None, world_size: int, rank: int,
                        device: torch.device
                        ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Every layer's moments merged over all ranks, with one ``all_reduce``."""
    import torch.distributed as dist

    width = sum(1 + 2 * channels for _, _, channels in moments)
    payload = torch.zeros(world_size, width, dtype=_F64, device=device)
    offset = 0
    for _, moment, channels in moments:
        count, mean, sq_dev = moment.total()
        if mean is not None and sq_dev is not None:
            payload[rank, offset] = count
            payload[rank, offset + 1:offset + 1 + channels] = mean
            payload[rank, offset + 1 + channels:offset + 1 + 2 * channels] = sq_dev
        offset += 1 + 2 * channels
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=process_group)
    merged, offset = [], 0
    for _, _, channels in moments:
        counts = payload[:, offset]
        means = payload[:, offset + 1:offset + 1 + channels]
        sq_devs = payload[:, offset + 1 + channels:offset + 1 + 2 * channels]
        merged.append(merge_moments(counts, means, sq_devs))
        offset += 1 + 2 * channels
    return merged


def _relative(difference: float, scale: float) -> float:
    """``difference / scale``; a change from zero is infinite, no change is none."""
    return difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)


def _check_options(model: nn.Module, num_batches: int | None, exclude: Sequence[str]
                   ) -> list[str]:
    """The model's module names, in order, once the options are known to be usable."""
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise InvalidInputError(format_message(
            "num_batches must be a positive integer", where="num_batches", got=num_batches,
            hint="pass num_batches=None to use all of data"))
    names = [name for name, _ in model.named_modules()]
    known = set(names)
    unknown = [name for name in exclude if name not in known]
    if unknown:
        raise InvalidInputError(format_message(
            "exclude names modules the model does not have", where="exclude", got=unknown,
            hint="use qualified names from model.named_modules()"))
    return names


def _select_layers(model: nn.Module, exclude: Sequence[str]
                   ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The BatchNorms to re-estimate, and every other one with why it is left alone."""
    skipped: dict[str, str] = {}
    targets: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not looks_like_batchnorm(module):
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude if e):
            skipped[name] = "excluded by the caller (exclude=...)"
        elif (reason := _skip_reason(module)) is not None:
            skipped[name] = reason
        else:
            targets[name] = module
    return targets, skipped


def _instrument(targets: Mapping[str, nn.Module], moments: Mapping[str, _Moments]
                ) -> Callable[[], None]:
    """Make every target measure its input, in training mode; returns what undoes it.

    A plain ``nn.BatchNorm1d/2d/3d`` normalises with the moments it was just measured with
    (:class:`_BatchStatisticsForward`); any other class runs its own training-mode forward after
    a pre-hook has measured its input.
    """
    modes = {name: module.training for name, module in targets.items()}
    handles, patched = [], []
    spares = _Spares()
    for name, module in targets.items():
        if type(module) in _PLAIN_BATCHNORMS and "forward" not in module.__dict__:
            plain = cast(nn.modules.batchnorm._BatchNorm, module)  # its exact type was checked
            module.forward = _BatchStatisticsForward(plain, moments[name], spares)
            patched.append(module)
        else:
            handles.append(module.register_forward_pre_hook(
                functools.partial(_measure_input, moments[name])))
        module.train()

    def undo() -> None:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward
        for name, module in targets.items():
            module.train(modes[name])

    return undo


def _feed(model: nn.Module, data: Iterable[object], num_batches: int | None,
          progress: bool) -> int:
    """Run the batches through ``model`` without gradients; returns how many ran."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else None
    total = num_batches
    if total is None and hasattr(data, "__len__"):
        total = len(data)  # type: ignore[arg-type]
    bar = _Progress(progress, total)
    batches = 0
    try:
        with torch.no_grad():
            for batch in data:
                if num_batches is not None and batches >= num_batches:
                    break
                _run(model, batch, device)
                batches += 1
                bar.update(batches)
    finally:
        bar.close()
    return batches


def _gather(moments: list[tuple[str, _Moments, int]], batches: int,
            process_group: ProcessGroup | None, device: torch.device
            ) -> tuple[list[tuple[Tensor | int, Tensor | None, Tensor | None]], int, int]:
    """Every layer's moments over all ranks, the batches over all ranks, and the world size."""
    world_size, rank = _world(process_group)
    if world_size == 1:
        return [m.total() for _, m, _ in moments], batches, 1
    import torch.distributed as dist

    merged = _merge_across_ranks(moments, process_group, world_size, rank, device)
    counts = torch.tensor([float(batches)], dtype=_F64, device=device)
    dist.all_reduce(counts, group=process_group)
    return list(merged), int(counts.item()), world_size


def _buffer(module: nn.Module, name: str) -> Tensor:
    """A running-statistics buffer of a layer :func:`_select_layers` accepted (so it exists)."""
    buffer = getattr(module, name)
    if not isinstance(buffer, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is {type(buffer).__name__}, not a Tensor")
    return buffer


def _apply(name: str, module: nn.Module, count: int, mean: Tensor, sq_dev: Tensor,
           batches: int) -> LayerRecalibration:
    """Write one layer's new statistics and describe the change."""
    variance = sq_dev / (count - 1)
    running_mean, running_var = _buffer(module, "running_mean"), _buffer(module, "running_var")
    old_mean = running_mean.detach().to(_F64)
    old_var = running_var.detach().to(_F64)
    running_mean.copy_(mean)
    running_var.copy_(variance)
    tracked = getattr(module, "num_batches_tracked", None)
    if isinstance(tracked, Tensor):
        tracked.fill_(batches)
    # Every norm the record needs in one reduction and one transfer (this runs once per layer,
    # and on an accelerator each separate float() would wait for the device).
    norms = torch.linalg.vector_norm(torch.stack(
        (old_mean, old_var.clamp(min=0).sqrt(), mean, mean - old_mean, variance - old_var,
         old_var)), dim=1).tolist()
    old_norm, old_std, new_norm, mean_diff, var_diff, old_var_norm = norms
    eps = float(getattr(module, "eps", 1e-5))
    return LayerRecalibration(
        name=name, samples=count, old_mean=old_norm, new_mean=new_norm,
        mean_change=_relative(mean_diff, max(old_norm, old_std)),
        var_change=_relative(var_diff, old_var_norm),
        near_zero_variance=tuple(torch.nonzero(variance < eps).flatten().tolist()))


def _save_buffers(model: nn.Module, names: Iterable[str]) -> dict[str, dict[str, Tensor]]:
    return {name: {key: value.detach().clone()
                   for key, value in model.get_submodule(name).named_buffers(recurse=False)}
            for name in names}


def _restore_buffers(model: nn.Module, saved: Mapping[str, Mapping[str, Tensor]]) -> None:
    for name, buffers in saved.items():
        module = model.get_submodule(name)
        for key, value in buffers.items():
            getattr(module, key).copy_(value)


def recalibrate_batchnorm(model: nn.Module, data: Iterable[object], *,
                          num_batches: int | None = None, inplace: bool = False,
                          exclude: Sequence[str] = (), progress: bool = False,
                          process_group: ProcessGroup | None = None) -> RecalibrationReport:
    """Re-estimate every BatchNorm's running statistics from ``data``, exactly.

    Only the BatchNorm layers are switched to training mode (so they normalise with batch
    statistics, as during training; see the module's documentation for how); every other module
    keeps its mode, so a model in eval mode runs without dropout or stochastic depth. Each
    layer's running mean and (unbiased) variance become those of every value it saw over all
    batches (and all ranks), computed in float64; ``num_batches_tracked`` becomes the number of
    batches. The layers' modes are restored.

    Args:
        model: The model; put it in eval mode so dropout and stochastic depth stay off.
        data: An iterable of batches on the model's device (tensors, ``(inputs, ...)`` tuples
            whose first element is the input, or dicts of keyword arguments).
        num_batches: Stop after this many batches (default: all of ``data``).
        inplace: Update ``model`` itself instead of a deep copy.
        exclude: Qualified names of BatchNorm layers (or of modules containing them) to leave
            alone.
        progress: Show progress on stderr.
        process_group: The ``torch.distributed`` group to merge over (default: the world, when
            torch.distributed is initialised). Every rank must call this function.

    Returns:
        The report; ``report.model`` is the recalibrated model.

    Raises:
        InvalidInputError: ``num_batches`` is not positive, an ``exclude`` name is not in the
            model, or a batch is of an unusable kind.
    """
    names = _check_options(model, num_batches, exclude)
    work = model if inplace else copy.deepcopy(model)
    targets, skipped = _select_layers(work, exclude)
    # A training-mode forward moves a BatchNorm's buffers; whatever is not re-estimated here is
    # put back afterwards.
    saved = _save_buffers(work, [*skipped, *targets])
    moments = {name: _Moments() for name in targets}
    start = time.perf_counter()
    undo = _instrument(targets, moments)
    try:
        batches = _feed(work, data, num_batches, progress)
    finally:
        undo()
    first = next(work.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    ordered = [(name, moments[name], _buffer(targets[name], "running_mean").numel())
               for name in targets]
    merged, all_batches, world_size = _gather(ordered, batches, process_group, device)
    records = []
    with torch.no_grad():
        for name, (count, mean, sq_dev) in zip(targets, merged, strict=True):
            if mean is None or sq_dev is None or float(count) < 2:
                skipped[name] = ("the data never reached it" if mean is None or float(count) == 0
                                 else "it saw a single value per channel; no variance")
                continue
            del saved[name]
            records.append(_apply(name, targets[name], int(count), mean, sq_dev, all_batches))
        _restore_buffers(work, saved)
    order = {name: i for i, name in enumerate(names)}
    skipped = dict(sorted(skipped.items(), key=lambda item: order.get(item[0], len(order))))
    return RecalibrationReport(model=work, layers=tuple(records), skipped=skipped,
                               batches=batches, world_size=world_size,
                               seconds=time.perf_counter() - start)
