"""The ``triton`` BatchNorm backend: Triton programs for CUDA tensors, as torch operators.

The device code is :mod:`bnsurgery.triton_programs`; this module chooses block sizes, launches
the programs, and registers three operators in the ``bnsurgery`` namespace
(``bnsurgery::triton_forward_train``, ``bnsurgery::triton_forward_eval``,
``bnsurgery::triton_backward``) with fake implementations and (evaluation) an autograd formula,
so that tracing tools and direct callers see ordinary, well-described operators.
:func:`forward` and :func:`backward` keep the backend contract of :mod:`bnsurgery.kernel_tensor`
and run the same implementations.

What runs, per call (each program reads the input once):

- training forward: partial statistics per (split of rows, channel block), a combine per channel
  block (mean, ``invstd``, running statistics), then the normalisation: three launches;
- evaluation forward: the normalisation alone;
- backward: partial ``sum(g)`` and ``sum(g * (x - mean))``, a combine into ``dL/dweight``,
  ``dL/dbias`` and the per-channel factors of ``dL/dx``, then ``dL/dx``.

Every float dtype runs here: float16 and bfloat16 with float32 statistics and arithmetic
(rounded once to the input's dtype), float32, and float64 in float64 throughout. Layouts: a
contiguous or channels-last input (and 2-D ``(N, C)``) is read in place; any other stride
pattern is copied to a contiguous one first, and the output is then contiguous.

Triton is imported on first use, not with this module: :func:`unavailable_reason` only looks for
it. On the CPU the backend runs only through Triton's interpreter (``TRITON_INTERPRET=1`` set
before the programs are first used), which is how it is tested without a GPU; it is slow
(microseconds per element) and meant for tests only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import struct
from collections.abc import Sequence
from types import ModuleType
from typing import Any, cast

import torch
from torch import Tensor

from bnsurgery import kernel_tensor
from bnsurgery._lazy import require
from bnsurgery.kernel_tensor import accumulate_dtype, channel_block, like

__all__ = [
    "OPERATORS",
    "backward",
    "backward_op",
    "forward",
    "forward_eval_op",
    "forward_train_op",
    "unavailable_reason",
]

#: The registered operators, by name.
OPERATORS = ("bnsurgery::triton_backward", "bnsurgery::triton_forward_eval",
             "bnsurgery::triton_forward_train")

_INTERPRET_ENV = "TRITON_INTERPRET"
_programs: ModuleType | None = None
_programs_interpreted: bool | None = None
_sm_counts: dict[int, int] = {}
# A CUDA grid's second axis (here: channel blocks) has at most 65535 programs; beyond that the
# reference backend runs.
_MAX_GRID_Y = 65535


def _interpret_requested() -> bool:
    return os.environ.get(_INTERPRET_ENV, "").strip().lower() in ("1", "true", "on", "yes")


def unavailable_reason(device: torch.device) -> str | None:
    """Why this backend cannot run on ``device``, or ``None`` when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu":
        if _programs_interpreted is False:
            return ("the Triton programs were compiled for CUDA when first used; "
                    f"set {_INTERPRET_ENV}=1 before then to run CPU tensors in the interpreter")
        if not _interpret_requested():
            return (f"runs on CUDA devices; CPU tensors only through Triton's interpreter "
                    f"({_INTERPRET_ENV}=1, for tests)")
        return None
    if device.type != "cuda":
        return f"runs on CUDA devices, not {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available to torch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_reason(index)


@functools.cache
def _cuda_reason(index: int) -> str | None:
    """Why CUDA device ``index`` cannot run the programs (asked once per device: every call
    of the layer asks which backend runs)."""
    if torch.version.hip is None and torch.cuda.get_device_capability(index) < (7, 0):
        return "needs an NVIDIA GPU of compute capability 7.0 or newer"
    return None


def _load_programs() -> ModuleType:
    """The Triton programs, importing triton (and compiling nothing yet) on first use."""
    global _programs, _programs_interpreted
    if _programs is None:
        require("triton", purpose="the Triton BatchNorm kernel")
        _programs = importlib.import_module("bnsurgery.triton_programs")
        _programs_interpreted = _interpret_requested()
    return _programs


# --- Launch plans ----------------------------------------------------------------------------


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _target_programs(device: torch.device) -> int:
    """How many programs keep the device busy: a few per multiprocessor on a GPU."""
    if device.type != "cuda":
        return 4  # the interpreter: enough for the tests to see several splits
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _sm_counts[index]


def _blocks(rows: int, channels: int, length: int,
            device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_A, BLOCK_C, BLOCK_L)``: one tile's extent along rows, channels and positions.

    The innermost axis of a tile follows the memory: positions for NCHW (one channel per tile),
    channels for channels-last and 2-D inputs. A GPU tile holds up to 2048 values. The
    interpreter's tiles hold 16, so that small test tensors cross tile, split and channel-block
    boundaries as large ones do on a GPU.
    """
    cuda = device.type == "cuda"
    tile = 2048 if cuda else 16
    if length == 1:
        block_c = min(_next_power_of_2(channels), 128 if cuda else 4)
        block_l = 1
    else:
        block_c = 1
        block_l = min(_next_power_of_2(length), 512 if cuda else 8)
    block_a = min(max(1, tile // (block_c * block_l)), _next_power_of_2(rows))
    return block_a, block_c, block_l


def _combine_blocks(splits: int, channels: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_C)`` of the programs that merge the splits' partial results."""
    cuda = device.type == "cuda"
    block_c = min(_next_power_of_2(channels), 128 if cuda else 4)
    block_s = max(1, min(_next_power_of_2(splits), (2048 if cuda else 8) // block_c))
    return block_s, block_c


def _splits(rows: int, block_a: int, channel_blocks: int,
            device: torch.device) -> tuple[int, int]:
    """``(splits, rows_per_split)`` for the reductions: enough programs to fill the device."""
    row_blocks = -(-rows // block_a)
    target = max(1, min(row_blocks, -(-_target_programs(device) // channel_blocks)))
    rows_per_split = block_a * -(-row_blocks // target)
    return -(-rows // rows_per_split), rows_per_split


def _halves(value: float) -> tuple[float, float]:
    """``value`` as two float32 numbers whose sum is ``value`` to float64 precision."""
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, float(value) - high


def _device_guard(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _in_block_layout(x: Tensor) -> bool:
    """Whether ``x``'s memory is an ``(A, C, L)`` block: contiguous, or channels-last."""
    if x.is_contiguous():
        return True
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.is_contiguous(memory_format=fmt)
    return False


def _readable(x: Tensor) -> Tensor:
    """``x`` itself when its memory is an ``(A, C, L)`` block, else a contiguous copy."""
    return x if _in_block_layout(x) else x.contiguous()


def _output_like(x: Tensor) -> Tensor:
    """An uninitialised tensor in the layout the programs write: ``x``'s, or contiguous."""
    if x.numel() == 0 or _in_block_layout(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _dense(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


# --- Implementations -------------------------------------------------------------------------


def _forward_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                  momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulate_dtype(x.dtype)
    channels = x.shape[1]
    mean = torch.empty(channels, dtype=acc, device=x.device)
    invstd = torch.empty(channels, dtype=acc, device=x.device)
    y = _output_like(x)
    if x.numel() == 0:
        return y, mean.zero_(), invstd.zero_()
    programs = _load_programs()
    x = _readable(x)
    block = channel_block(x)
    rows, _, length = block.shape
    block_a, block_c, block_l = _blocks(rows, channels, length, x.device)
    channel_blocks = -(-channels // block_c)
    if channel_blocks > _MAX_GRID_Y:  # more than 65535 channels, one per program: rare
        return kernel_tensor.forward(x, weight, bias, running_mean, running_var, training,
                                     momentum, eps)
    weight, bias = _dense(weight), _dense(bias)
    # Running statistics are updated in place; a strided buffer goes through a dense copy.
    stats = [t if t is None or t.is_contiguous() else t.contiguous()
             for t in (running_mean, running_var)]
    eps_hi, eps_lo = _halves(eps)
    dummy = mean  # stands in for absent optional tensors; never read (the flags say so)
    with _device_guard(x):
        if training:
            splits, rows_per_split = _splits(rows, block_a, channel_blocks, x.device)
            mean_parts, m2_parts = torch.empty((2, splits, channels), dtype=acc,
                                               device=x.device).unbind(0)
            programs.stats_partial[(splits, channel_blocks)](
                block, mean_parts, m2_parts, rows, channels, length, rows_per_split,
                BLOCK_A=block_a, BLOCK_C=block_c, BLOCK_L=block_l)
            combine_s, combine_c = _combine_blocks(splits, channels, x.device)
            momentum_hi, momentum_lo = _halves(momentum)
            programs.stats_combine[(-(-channels // combine_c),)](
                mean_parts, m2_parts, mean, invstd,
                dummy if stats[0] is None else stats[0], dummy if stats[1] is None else stats[1],
                splits, rows_per_split, rows, channels, length, momentum_hi, momentum_lo,
                eps_hi, eps_lo, HAS_RUNNING_MEAN=stats[0] is not None,
                HAS_RUNNING_VAR=stats[1] is not None, BLOCK_S=combine_s, BLOCK_C=combine_c)
        programs.normalise[(-(-rows // block_a), channel_blocks)](
            block, channel_block(y), mean, invstd, dummy if weight is None else weight,
            dummy if bias is None else bias,
            dummy if running_mean is None else stats[0],
            dummy if running_var is None else stats[1], rows, channels, length,
            eps_hi, eps_lo, EVALUATION=not training, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, BLOCK_A=block_a, BLOCK_C=block_c, BLOCK_L=block_l)
    for buffer, dense in zip((running_mean, running_var), stats, strict=True):
        if training and buffer is not None and dense is not None and dense is not buffer:
            buffer.copy_(dense)
    return y, mean, invstd


def _backward_impl(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                   invstd: Tensor, training: bool, need_input: bool,
                   need_params: bool) -> tuple[Tensor, Tensor, Tensor]:
    acc = invstd.dtype
    channels = x.shape[1]
    grad_x = _output_like(x) if need_input else x.new_empty(0)
    grad_w = torch.empty(channels if need_params else 0, dtype=acc, device=x.device)
    grad_b = torch.empty_like(grad_w)
    if x.numel() == 0 or not (need_input or need_params):
        return grad_x, grad_w.zero_(), grad_b.zero_()
    programs = _load_programs()
    x = _readable(x)
    grad = like(grad_out, x)
    block, grad_block = channel_block(x), channel_block(grad)
    rows, _, length = block.shape
    block_a, block_c, block_l = _blocks(rows, channels, length, x.device)
    channel_blocks = -(-channels // block_c)
    if channel_blocks > _MAX_GRID_Y:
        grads = kernel_tensor.backward(grad_out, x, weight, mean, invstd, training,
                                       (need_input, need_params, need_params))
        # The reference backend returns every gradient that was asked for.
        return (cast(Tensor, grads[0]) if need_input else grad_x,
                cast(Tensor, grads[1]) if need_params else grad_w,
                cast(Tensor, grads[2]) if need_params else grad_b)
    weight, mean, invstd = _dense(weight), mean.contiguous(), invstd.contiguous()
    coef_a, coef_b, coef_c = torch.empty((3, channels), dtype=acc, device=x.device).unbind(0)
    dummy = coef_a
    with _device_guard(x):
        if training or need_params:
            splits, rows_per_split = _splits(rows, block_a, channel_blocks, x.device)
            parts = torch.empty((3, splits, channels), dtype=acc, device=x.device)
            programs.backward_partial[(splits, channel_blocks)](
                grad_block, block, mean, parts[0], parts[1], parts[2], rows, channels, length,
                rows_per_split, TRAINING=training, BLOCK_A=block_a, BLOCK_C=block_c,
                BLOCK_L=block_l)
            combine_s, combine_c = _combine_blocks(splits, channels, x.device)
            sums_w = grad_w if need_params else torch.empty_like(coef_a)
            sums_b = grad_b if need_params else torch.empty_like(coef_a)
            programs.backward_combine[(-(-channels // combine_c),)](
                parts[0], parts[1], parts[2], invstd, dummy if weight is None else weight,
                coef_a, coef_b, coef_c, sums_w, sums_b, splits, channels, rows * length,
                TRAINING=training, HAS_WEIGHT=weight is not None, BLOCK_S=combine_s,
                BLOCK_C=combine_c)
        if need_input:
            programs.grad_input[(-(-rows // block_a), channel_blocks)](
                grad_block, block, mean, invstd, dummy if weight is None else weight,
                coef_a, coef_b, coef_c, channel_block(grad_x), rows, channels, length,
                TRAINING=training, HAS_WEIGHT=weight is not None, BLOCK_A=block_a,
                BLOCK_C=block_c, BLOCK_L=block_l)
    return grad_x, grad_w, grad_b


# --- The operators ---------------------------------------------------------------------------


@torch.library.custom_op("bnsurgery::triton_forward_train",
                         mutates_args=("running_mean", "running_var"))
def forward_train_op(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     running_mean: Tensor | None, running_var: Tensor | None, momentum: float,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode forward: ``(y, mean, invstd)``; updates the running statistics in place."""
    return _forward_impl(x, weight, bias, running_mean, running_var, True, momentum, eps)


@torch.library.custom_op("bnsurgery::triton_forward_eval", mutates_args=())
def forward_eval_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
                    running_var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluation-mode forward with the running statistics: ``(y, mean, invstd)``."""
    return _forward_impl(x, weight, bias, running_mean, running_var, False, 0.0, eps)


@torch.library.custom_op("bnsurgery::triton_backward", mutates_args=())
def backward_op(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                invstd: Tensor, training: bool, need_input: bool,
                need_params: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dL/dx, dL/dweight, dL/dbias)``; an output not asked for is an empty tensor."""
    return _backward_impl(grad_out, x, weight, mean, invstd, training, need_input, need_params)


def _fake_forward(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    stats = x.new_empty(x.shape[1], dtype=accumulate_dtype(x.dtype))
    return _output_like(x), stats, torch.empty_like(stats)


@forward_train_op.register_fake
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
      running_var: Tensor | None, momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _fake_forward(x)


@forward_eval_op.register_fake
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
      running_var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _fake_forward(x)


@backward_op.register_fake
def _(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
      training: bool, need_input: bool, need_params: bool) -> tuple[Tensor, Tensor, Tensor]:
    grad_x = _output_like(x) if need_input else x.new_empty(0)
    grad_w = x.new_empty(x.shape[1] if need_params else 0, dtype=invstd.dtype)
    return grad_x, grad_w, torch.empty_like(grad_w)


# ctx is autograd's context object, typed Any in torch too: attributes are set on it freely.
def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]
                   ) -> None:
    x, weight, bias = inputs[:3]
    _, mean, invstd = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(mean, invstd)


def _operator_backward(ctx: Any, grad_y: Tensor, grad_mean: Tensor | None,
                       grad_invstd: Tensor | None) -> tuple[Tensor | None, ...]:
    """Evaluation mode: mean and ``invstd`` are constants, ``dL/dx = weight * invstd * g``."""
    x, weight, mean, invstd = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_x, grad_w, grad_b = backward_op(grad_y, x, weight, mean, invstd, False,
                                         need_input, need_weight or need_bias)
    weight_dtype, bias_dtype = ctx.dtypes
    return (grad_x if need_input else None,
            grad_w.to(weight_dtype) if need_weight else None,
            grad_b.to(bias_dtype) if need_bias else None,
            *([None] * (len(ctx.needs_input_grad) - 3)))


# torch refuses an autograd formula on an operator that mutates its inputs, as the training
# forward does (the running statistics): in training the autograd node is
# bnsurgery.autograd_function.BatchNormFunction, which calls the backward operator.
torch.library.register_autograd(
    "bnsurgery::triton_forward_eval", _operator_backward,
    setup_context=_setup_context)


# --- The backend contract --------------------------------------------------------------------


def _same_device(x: Tensor, tensors: Sequence[Tensor | None]) -> bool:
    return all(t is None or t.device == x.device for t in tensors)


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
            running_var: Tensor | None, training: bool, momentum: float,
            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backend ``forward`` of :mod:`bnsurgery.kernel_tensor`, on the Triton programs.

    It runs the operators' implementation directly rather than through the dispatcher: it is
    only called eagerly (:func:`bnsurgery.kernels.select_backend` hands graph capture to the
    reference backend), and a Python operator's dispatch costs more per call than the launches
    of a small layer. Tensors spread over several devices go to the reference backend, which
    raises torch's own error for them: a Triton program would read another device's pointer.
    """
    if not _same_device(x, (weight, bias, running_mean, running_var)):
        return kernel_tensor.forward(x, weight, bias, running_mean, running_var, training,
                                     momentum, eps)
    return _forward_impl(x, weight, bias, running_mean, running_var, training,
                         float(momentum), float(eps))


def backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor,
             training: bool, needs: tuple[bool, bool, bool]
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backend ``backward`` of :mod:`bnsurgery.kernel_tensor`, as :func:`forward` runs."""
    if not _same_device(x, (grad_out, weight, mean, invstd)):
        return kernel_tensor.backward(grad_out, x, weight, mean, invstd, training, needs)
    grad_x, grad_w, grad_b = _backward_impl(grad_out, x, weight, mean, invstd, training,
                                            needs[0], needs[1] or needs[2])
    return (grad_x if needs[0] else None, grad_w if needs[1] else None,
            grad_b if needs[2] else None)
