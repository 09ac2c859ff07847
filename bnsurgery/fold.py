"""The arithmetic of folding an inference-mode BatchNorm into a neighbouring linear layer.

In eval mode a BatchNorm is a per-channel affine map, ``bn(x) = x * scale + shift`` with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``. A
convolution or a Linear layer is linear in its input and its weight, so that affine map can be
absorbed into the layer on either side of the BatchNorm:

* **into the preceding layer** (``layer -> bn``): every output channel ``o`` of the layer is
  scaled, ``W'[o] = W[o] * scale[o]`` and ``b'[o] = b[o] * scale[o] + shift[o]``;
* **into the following layer** (``bn -> layer``): every input channel ``c`` is scaled,
  ``W'[:, c] = W[:, c] * scale[c]``, and the shift becomes a constant added to the output,
  ``b'[o] = b[o] + sum over c and kernel taps of W[o, c] * shift[c]``. That constant is only
  right where every kernel tap sees real input, so it is exact for a Linear layer and for a
  convolution without zero padding (reflect, replicate and circular padding copy input values,
  which commute with a per-channel affine map; zeros do not).

The one trap is the channel axis. A ``Conv``/``Linear`` weight is ``(out, in / groups, *kernel)``;
a ``ConvTranspose`` weight is ``(in, out / groups, *kernel)``, so its *output* channels live on
dim 1 *within each group*: output channel ``g * out_per_group + j`` is column ``j`` of the rows of
group ``g``. Scaling dim 0 of a transposed weight is silently wrong when ``in == out`` and crashes
when ``groups > 1``; the functions here take ``transposed`` and ``groups`` and get both right.

Everything is computed in float64 and rounded once to the layer's dtype by
:func:`fold_layer_weights`, so a layer that absorbs two BatchNorms (one on each side) is rounded
once, not twice. :func:`precision_report` says whether that rounding overflows or turns weights
subnormal in a half-precision dtype. These functions are pure: they take and return tensors and
never touch a module, so they can be tested (and reused) on their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bnsurgery.errors import InvalidInputError, format_message
from bnsurgery.results import JsonResult

__all__ = [
    "FoldedWeights",
    "PrecisionReport",
    "batchnorm_scale_shift",
    "fold_batchnorm_after",
    "fold_batchnorm_before",
    "fold_layer_weights",
    "precision_report",
    "split_scale_shift",
]

_F64 = torch.float64


@dataclass(frozen=True)
class FoldedWeights:
    """The new weight and bias of a layer that absorbed one or two BatchNorms.

    Attributes:
        weight: The folded weight, in the requested dtype and the original weight's layout.
        bias: The folded bias (always present once something was folded), same dtype.
        weight64: The float64 weight before rounding, for precision checks; ``None`` unless
            asked for with ``keep_float64=True``.
        bias64: The float64 bias before rounding.
    """

    weight: Tensor
    bias: Tensor
    weight64: Tensor | None
    bias64: Tensor


@dataclass(frozen=True)
class PrecisionReport(JsonResult):
    """What rounding folded float64 weights to a narrower dtype does to them.

    Attributes:
        dtype: The dtype the weights are rounded to, e.g. ``"torch.float16"``.
        overflow: Number of weight and bias entries that become infinite.
        subnormal: Number of entries that were normal (or exactly representable as zero) before
            folding and become subnormal or flush to zero after it: they lose relative precision.
        max_abs: Largest magnitude among the folded float64 values.
        min_abs_nonzero: Smallest non-zero magnitude among the folded float64 values (``0.0`` when
            every value is zero).
    """

    dtype: str
    overflow: int
    subnormal: int
    max_abs: float
    min_abs_nonzero: float

    @property
    def ok(self) -> bool:
        """True when rounding neither overflows nor produces new subnormals."""
        return self.overflow == 0 and self.subnormal == 0


def _check_vector(name: str, value: Tensor | None, channels: int, *, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, Tensor) or value.dim() != 1 or value.numel() != channels:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise InvalidInputError(format_message(
            f"{what}: '{name}' must be a 1-D tensor with one entry per channel", where=name,
            got=f"shape {shape}", expected=f"shape ({channels},)",
            hint="pass the BatchNorm's buffers/parameters unchanged"))


def batchnorm_scale_shift(running_mean: Tensor, running_var: Tensor, *, eps: float,
                          weight: Tensor | None = None, bias: Tensor | None = None
                          ) -> tuple[Tensor, Tensor]:
    """Per-channel ``scale`` and ``shift`` of an eval-mode BatchNorm, in float64.

    ``bn(x) = (x - running_mean) / sqrt(running_var + eps) * weight + bias``
    ``      = x * scale + shift``, with ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``. A missing ``weight`` means 1 and a missing ``bias``
    means 0 (``affine=False`` or ``bias=False``).

    Args:
        running_mean: The running mean, shape ``(C,)``.
        running_var: The running variance, shape ``(C,)``.
        eps: The BatchNorm's epsilon.
        weight: The affine weight (gamma) or ``None``.
        bias: The affine bias (beta) or ``None``.

    Returns:
        ``(scale, shift)``, both float64 of shape ``(C,)``.

    Raises:
        InvalidInputError: A tensor has the wrong shape, or ``running_var + eps`` is not positive.
    """
    if not isinstance(running_mean, Tensor) or running_mean.dim() != 1:
        raise InvalidInputError(format_message(
            "batchnorm_scale_shift needs a 1-D running_mean", where="running_mean",
            got=getattr(running_mean, "shape", type(running_mean).__name__),
            expected="a tensor of shape (C,)",
            hint="a BatchNorm with track_running_stats=False has no running statistics to fold"))
    channels = running_mean.numel()
    _check_vector("running_var", running_var, channels, what="batchnorm_scale_shift")
    _check_vector("weight", weight, channels, what="batchnorm_scale_shift")
    _check_vector("bias", bias, channels, what="batchnorm_scale_shift")
    denominator = running_var.detach().to(_F64) + float(eps)
    if bool((denominator <= 0).any()) or not bool(torch.isfinite(denominator).all()):
        raise InvalidInputError(format_message(
            "BatchNorm running_var + eps must be positive and finite to fold",
            where="running_var", got=f"min {float(denominator.min()):.3g}",
            expected="every entry > 0", hint="recalibrate or retrain the BatchNorm statistics"))
    scale = torch.rsqrt(denominator)
    if weight is not None:
        scale = scale * weight.detach().to(_F64)
    shift = -running_mean.detach().to(_F64) * scale
    if bias is not None:
        shift = shift + bias.detach().to(_F64)
    return scale, shift


def split_scale_shift(scale: Tensor, shift: Tensor, channels: Sequence[int]
                      ) -> list[tuple[Tensor, Tensor]]:
    """Cut a BatchNorm's ``scale``/``shift`` into consecutive channel slices.

    A BatchNorm after ``torch.cat([a, b, c], dim=1)`` normalises channel slice ``i`` of the
    concatenation with entries ``offset_i : offset_i + channels[i]``; each slice folds into the
    layer that produced it.

    Args:
        scale: The float64 scale of the BatchNorm, shape ``(C,)``.
        shift: The float64 shift, shape ``(C,)``.
        channels: The channel count of each concatenated input, in concatenation order.

    Returns:
        One ``(scale, shift)`` pair per slice.

    Raises:
        InvalidInputError: The slices do not add up to ``C``.
    """
    total = scale.numel()
    if sum(channels) != total or any(c <= 0 for c in channels) or shift.numel() != total:
        raise InvalidInputError(format_message(
            "Channel slices must cover the BatchNorm's channels exactly", where="channels",
            got=f"{list(channels)} (sum {sum(channels)})",
            expected=f"positive counts summing to {total}",
            hint="pass the out_channels of every concatenated layer, in order"))
    return list(zip(torch.split(scale, list(channels)), torch.split(shift, list(channels)),
                    strict=True))


def _layer_channels(weight: Tensor, *, transposed: bool, groups: int) -> tuple[int, int]:
    """``(in_channels, out_channels)`` of a layer from its weight's shape."""
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        raise InvalidInputError(format_message(
            "A conv/linear weight needs at least 2 dimensions", where="weight",
            got=getattr(weight, "shape", type(weight).__name__),
            expected="(out, in/groups, *kernel), (in, out/groups, *kernel) or (out, in)",
            hint="pass the layer's .weight"))
    if groups < 1 or weight.shape[0] % groups:
        raise InvalidInputError(format_message(
            "groups must be a positive divisor of the weight's first dimension", where="groups",
            got=groups, expected=f"a divisor of {weight.shape[0]}",
            hint="pass the layer's .groups"))
    if transposed:
        return weight.shape[0], weight.shape[1] * groups
    return weight.shape[1] * groups, weight.shape[0]


def _group_view(weight: Tensor, *, transposed: bool, groups: int) -> Tensor:
    """View a weight as ``(groups, out_per_group, in_per_group, taps)`` whatever its layout."""
    if transposed:
        in_per_group = weight.shape[0] // groups
        view = weight.reshape(groups, in_per_group, weight.shape[1], -1)
        return view.transpose(1, 2)
    out_per_group = weight.shape[0] // groups
    return weight.reshape(groups, out_per_group, weight.shape[1], -1)


def _from_group_view(view: Tensor, like: Tensor, *, transposed: bool) -> Tensor:
    if transposed:
        view = view.transpose(1, 2)
    return view.reshape(like.shape)


def fold_batchnorm_after(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                         transposed: bool = False, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Fold ``bn(layer(x))`` into the layer: scale its output channels, in float64.

    ``layer(x) * scale + shift = (W * scale over output channels)(x) + (b * scale + shift)``.

    Args:
        weight: The layer's weight: ``(out, in/groups, *kernel)`` for Conv and Linear,
            ``(in, out/groups, *kernel)`` for ConvTranspose.
        bias: The layer's bias ``(out,)`` or ``None``.
        scale: The BatchNorm's float64 scale, ``(out,)``.
        shift: The BatchNorm's float64 shift, ``(out,)``.
        transposed: The weight belongs to a ConvTranspose layer.
        groups: The layer's ``groups``.

    Returns:
        ``(weight, bias)`` in float64; the bias is always a tensor.

    Raises:
        InvalidInputError: The shapes do not match.
    """
    _, out_channels = _layer_channels(weight, transposed=transposed, groups=groups)
    _check_vector("scale", scale, out_channels, what="fold_batchnorm_after")
    _check_vector("shift", shift, out_channels, what="fold_batchnorm_after")
    _check_vector("bias", bias, out_channels, what="fold_batchnorm_after")
    scale, shift = scale.to(_F64), shift.to(_F64)
    view = _group_view(weight.detach().to(_F64), transposed=transposed, groups=groups)
    view = view * scale.reshape(groups, -1, 1, 1)
    new_weight = _from_group_view(view, weight, transposed=transposed)
    new_bias = shift.clone() if bias is None else bias.detach().to(_F64) * scale + shift
    return new_weight, new_bias


def fold_batchnorm_before(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *,
                          transposed: bool = False, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Fold ``layer(bn(x))`` into the layer: scale its input channels, in float64.

    ``layer(x * scale + shift) = (W * scale over input channels)(x) + (b + sum W * shift)``. The
    constant term sums the shift over every kernel tap, so it equals the true output only where
    every tap sees real input: exact for Linear layers and for convolutions without zero padding
    (a ConvTranspose only when its kernel is 1 and stride 1). The caller decides exactness; this
    function does the arithmetic.

    Args:
        weight: The layer's weight (see :func:`fold_batchnorm_after` for the layouts).
        bias: The layer's bias or ``None``.
        scale: The BatchNorm's float64 scale, ``(in,)``.
        shift: The BatchNorm's float64 shift, ``(in,)``.
        transposed: The weight belongs to a ConvTranspose layer.
        groups: The layer's ``groups``.

    Returns:
        ``(weight, bias)`` in float64; the bias is always a tensor.

    Raises:
        InvalidInputError: The shapes do not match.
    """
    in_channels, out_channels = _layer_channels(weight, transposed=transposed, groups=groups)
    _check_vector("scale", scale, in_channels, what="fold_batchnorm_before")
    _check_vector("shift", shift, in_channels, what="fold_batchnorm_before")
    _check_vector("bias", bias, out_channels, what="fold_batchnorm_before")
    scale, shift = scale.to(_F64), shift.to(_F64)
    view = _group_view(weight.detach().to(_F64), transposed=transposed, groups=groups)
    # view is (groups, out_per_group, in_per_group, taps); input channel of [g, :, i] is g*ipg+i.
    new_view = view * scale.reshape(groups, 1, -1, 1)
    constant = (view * shift.reshape(groups, 1, -1, 1)).sum(dim=(2, 3)).reshape(out_channels)
    new_weight = _from_group_view(new_view, weight, transposed=transposed)
    new_bias = constant if bias is None else bias.detach().to(_F64) + constant
    return new_weight, new_bias


def fold_layer_weights(weight: Tensor, bias: Tensor | None, *,
                       before: tuple[Tensor, Tensor] | None = None,
                       after: tuple[Tensor, Tensor] | None = None,
                       transposed: bool = False, groups: int = 1,
                       dtype: torch.dtype | None = None,
                       keep_float64: bool = False) -> FoldedWeights:
    """Fold up to two BatchNorms (one before, one after) into a layer, rounding once.

    Computes ``after(layer(before(x)))`` as one layer: the input side first, then the output
    side, both in float64, then rounds to ``dtype`` once. The common case (only ``after``, a
    Conv or Linear weight) is computed in blocks of output channels, so the float64 copy of a
    large weight never exists whole; the result is bit-identical to the one-shot computation.

    Args:
        weight: The layer's weight.
        bias: The layer's bias or ``None``.
        before: ``(scale, shift)`` of a BatchNorm feeding the layer, or ``None``.
        after: ``(scale, shift)`` of a BatchNorm fed by the layer, or ``None``.
        transposed: The weight belongs to a ConvTranspose layer.
        groups: The layer's ``groups``.
        dtype: The dtype to round to; defaults to the weight's dtype.
        keep_float64: Also return the float64 weight (for :func:`precision_report`).

    Returns:
        The folded weights: rounded, and the float64 bias (and weight when asked).

    Raises:
        InvalidInputError: Nothing to fold, or the shapes do not match.
    """
    if before is None and after is None:
        raise InvalidInputError(format_message(
            "fold_layer_weights needs a BatchNorm to fold", where="before/after",
            got="neither", expected="a (scale, shift) pair in at least one of them",
            hint="compute one with batchnorm_scale_shift"))
    dtype = weight.dtype if dtype is None else dtype
    _, out_channels = _layer_channels(weight, transposed=transposed, groups=groups)
    new_bias = (torch.zeros(out_channels, dtype=_F64, device=weight.device) if bias is None
                else bias.detach().to(_F64))
    if before is None and after is not None and not transposed and not keep_float64:
        scale, shift = after
        _check_vector("scale", scale, out_channels, what="fold_layer_weights")
        _check_vector("shift", shift, out_channels, what="fold_layer_weights")
        rounded_weight = _scale_rows_blockwise(weight.detach(), scale.to(_F64), dtype)
        new_bias = new_bias * scale.to(_F64) + shift.to(_F64)
        return FoldedWeights(weight=rounded_weight, bias=new_bias.to(dtype), weight64=None,
                             bias64=new_bias)
    new_weight = weight.detach().to(_F64)
    if before is not None:
        new_weight, new_bias = fold_batchnorm_before(new_weight, new_bias, *before,
                                                     transposed=transposed, groups=groups)
    if after is not None:
        new_weight, new_bias = fold_batchnorm_after(new_weight, new_bias, *after,
                                                    transposed=transposed, groups=groups)
    rounded_weight = torch.empty_like(weight, dtype=dtype)  # keeps channels_last strides
    rounded_weight.copy_(new_weight)
    return FoldedWeights(weight=rounded_weight, bias=new_bias.to(dtype),
                         weight64=new_weight if keep_float64 else None, bias64=new_bias)


_BLOCK_ELEMENTS = 1 << 18  # 2 MiB of float64: the scratch block stays in cache


def _scale_rows_blockwise(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``round(weight * scale[:, None, ...])`` with a float64 product, one block of rows at a time.

    Dim 0 is the outermost dimension of both contiguous and channels_last weights, so a block of
    rows is one contiguous slab in either layout.
    """
    result = torch.empty_like(weight, dtype=dtype)
    rows = weight.shape[0]
    per_row = max(1, weight[0].numel())
    step = max(1, _BLOCK_ELEMENTS // per_row)
    view_shape = (-1,) + (1,) * (weight.dim() - 1)
    for start in range(0, rows, step):
        # copy=True: for a float64 weight, .to(float64) would return the caller's own storage
        # and the in-place multiply below would scale the original weights.
        block = weight[start:start + step].to(_F64, copy=True)
        block.mul_(scale[start:start + step].reshape(view_shape))
        result[start:start + step].copy_(block)
    return result


def precision_report(folded: Sequence[Tensor], original: Sequence[Tensor | None],
                     dtype: torch.dtype) -> PrecisionReport:
    """Count entries that overflow or newly turn subnormal when rounded to ``dtype``.

    A BatchNorm with a tiny running variance multiplies weights by a large factor, which can
    exceed float16's 65504; a small factor can push weights below float16's smallest normal
    number (6.1e-5), where they keep fewer significant bits. Both are invisible in float32.

    Args:
        folded: Float64 folded tensors (weight and bias).
        original: The tensors they replace, aligned with ``folded`` (``None`` for a bias that did
            not exist); entries that were already subnormal there are not counted.
        dtype: The floating dtype the folded values will be stored in.

    Returns:
        The counts and the magnitude range.
    """
    info = torch.finfo(dtype)
    overflow = subnormal = 0
    max_abs, min_abs = 0.0, math.inf
    for value, before in zip(folded, original, strict=True):
        value = value.detach().to(_F64)
        magnitude = value.abs()
        rounded = value.to(dtype).to(_F64).abs()
        overflow += int((torch.isinf(rounded) & torch.isfinite(value)).sum())
        tiny_now = (magnitude > 0) & (rounded < info.tiny)
        if before is not None:
            previous = before.detach().to(dtype).to(_F64).abs().reshape(magnitude.shape)
            tiny_now &= ~((previous > 0) & (previous < info.tiny))
        subnormal += int(tiny_now.sum())
        if magnitude.numel():
            max_abs = max(max_abs, float(magnitude.max()))
            nonzero = magnitude[magnitude > 0]
            if nonzero.numel():
                min_abs = min(min_abs, float(nonzero.min()))
    return PrecisionReport(dtype=str(dtype), overflow=overflow, subnormal=subnormal,
                           max_abs=max_abs, min_abs_nonzero=0.0 if min_abs == math.inf else min_abs)
