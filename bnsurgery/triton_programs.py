"""The Triton programs of the CUDA BatchNorm kernel: statistics, normalisation and gradients.

Imported only by :mod:`bnsurgery.kernel_triton`, on first use, because it imports triton.
The host side (which program runs with which blocks, the torch operators) lives there; this
module is only the device code, and computes the formulas of :mod:`bnsurgery.functional`.

Every program reads the input as the contiguous ``(A, C, L)`` block of
:func:`bnsurgery.kernel_tensor.channel_block`: element ``(a, c, l)`` lies at
``a * C * L + c * L + l``. A contiguous NCHW tensor is ``(N, C, H*W)``; a channels-last or a
2-D one is ``(N*H*W, C, 1)``. Tiles are ``[BLOCK_A, BLOCK_C, BLOCK_L]``: for NCHW one channel
(``BLOCK_C = 1``) and a long run of neighbouring spatial values, for channels-last one value
(``BLOCK_L = 1``) of many neighbouring channels. Either way a tile's innermost axis follows the
memory, so every load is coalesced, and one program source serves both layouts.

The per-channel reductions are split in two stages, because one program per channel would leave
most of a GPU idle: programs ``(split, channel block)`` each reduce one range of rows, and a
second program per channel block combines the partial results. The statistics are Welford's
running mean and sum of squared deviations, merged pairwise with Chan's formula, never
``E[x^2] - E[x]^2``, which loses every digit when the mean is large next to the spread.

Triton compiles one variant per value of every ``tl.constexpr`` and, for integer arguments, per
divisibility by 16: the row count ``A`` (the batch size, which varies from call to call) is
exempt, so a new batch size costs no compilation; ``C`` and ``L`` keep it, because whether rows
start on aligned addresses decides whether loads can be vectorised.

Scalars: Triton passes a Python float as float32. ``momentum`` and ``eps`` arrive as two float32
halves (``hi + lo``) so that a float64 input gets them to float64 precision.
"""

import triton
import triton.language as tl

__all__ = [
    "backward_combine",
    "backward_partial",
    "grad_input",
    "normalise",
    "stats_combine",
    "stats_partial",
]


@triton.jit
def _chan_merge(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan's pairwise merge of two (mean, M2, count) summaries of disjoint sets of values."""
    count = count_a + count_b
    weight_b = count_b / tl.maximum(count, 1.0)  # 0 when both sets are empty
    delta = mean_b - mean_a
    return mean_a + delta * weight_b, m2_a + m2_b + delta * delta * count_a * weight_b, count


@triton.jit(do_not_specialize=["A", "rows_per_split"])
def stats_partial(x_ptr, mean_ptr, m2_ptr, A, C, L, rows_per_split,
                  BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per channel and per split of rows: the mean and the sum of squared deviations (M2).

    Each lane of the tile keeps Welford's running mean and M2 of the values it visits
    (``delta = x - mean; mean += delta / n; M2 += delta * (x - mean)``), exact to rounding
    whatever the offset of the data; the lanes are then merged pairwise with Chan's formula.
    """
    acc = mean_ptr.dtype.element_ty
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(0)
    a_begin = split * rows_per_split
    a_end = tl.minimum(a_begin + rows_per_split, A)
    mean = tl.zeros([BLOCK_A, BLOCK_C, BLOCK_L], acc)
    m2 = tl.zeros([BLOCK_A, BLOCK_C, BLOCK_L], acc)
    count = tl.zeros([BLOCK_A, BLOCK_C, BLOCK_L], acc)
    for a_start in range(a_begin, a_end, BLOCK_A):
        for l_start in range(0, L, BLOCK_L):
            row = a_start + tl.arange(0, BLOCK_A)
            positions = l_start + tl.arange(0, BLOCK_L)
            # int64 rows: a large activation has more than 2**31 elements.
            offsets = (row[:, None, None].to(tl.int64) * C * L + channels[None, :, None] * L
                       + positions[None, None, :])
            mask = ((row[:, None, None] < a_end) & (channels[None, :, None] < C)
                    & (positions[None, None, :] < L))
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc)
            count += tl.where(mask, 1.0, 0.0)
            delta = tl.where(mask, x - mean, 0.0)
            mean += delta / tl.maximum(count, 1.0)
            m2 += delta * (x - mean)
    mean, m2, count = tl.reduce((mean, m2, count), 2, _chan_merge)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _chan_merge)
    keep = channels < C
    tl.store(mean_ptr + split * C + channels, mean, mask=keep)
    tl.store(m2_ptr + split * C + channels, m2, mask=keep)


@triton.jit(do_not_specialize=["splits", "rows_per_split", "A"])
def stats_combine(mean_part_ptr, m2_part_ptr, mean_ptr, invstd_ptr, running_mean_ptr,
                  running_var_ptr, splits, rows_per_split, A, C, L, momentum_hi, momentum_lo,
                  eps_hi, eps_lo, HAS_RUNNING_MEAN: tl.constexpr, HAS_RUNNING_VAR: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the splits: batch mean, ``invstd = 1 / sqrt(var + eps)``, running statistics.

    ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* variance
    ``var * M / (M - 1)``, computed in the statistics' dtype and rounded once into the buffer.
    """
    acc = mean_ptr.dtype.element_ty
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = channels < C
    mean = tl.zeros([BLOCK_C], acc)
    m2 = tl.zeros([BLOCK_C], acc)
    count = tl.zeros([BLOCK_C], acc)
    # BLOCK_S splits at a time, merged across the tile, then into the running summary: a GPU
    # has thousands of splits to merge for a channels-last input, too many to take one by one.
    for split_start in range(0, splits, BLOCK_S):
        split = split_start + tl.arange(0, BLOCK_S)
        rows = tl.minimum(rows_per_split, A - split * rows_per_split)
        live = (split[:, None] < splits) & keep[None, :]
        offsets = split[:, None] * C + channels[None, :]
        part_mean = tl.load(mean_part_ptr + offsets, mask=live, other=0.0)
        part_m2 = tl.load(m2_part_ptr + offsets, mask=live, other=0.0)
        part_count = tl.where(live, tl.cast(rows, acc)[:, None] * tl.cast(L, acc), 0.0)
        tile_mean, tile_m2, tile_count = tl.reduce((part_mean, part_m2, part_count), 0,
                                                   _chan_merge)
        mean, m2, count = _chan_merge(mean, m2, count, tile_mean, tile_m2, tile_count)
    var = m2 / count
    invstd = 1.0 / tl.sqrt(var + (tl.cast(eps_hi, acc) + tl.cast(eps_lo, acc)))
    tl.store(mean_ptr + channels, mean, mask=keep)
    tl.store(invstd_ptr + channels, invstd, mask=keep)
    momentum = tl.cast(momentum_hi, acc) + tl.cast(momentum_lo, acc)
    if HAS_RUNNING_MEAN:
        running = tl.load(running_mean_ptr + channels, mask=keep, other=0.0).to(acc)
        updated = running * (1 - momentum) + mean * momentum
        tl.store(running_mean_ptr + channels,
                 updated.to(running_mean_ptr.dtype.element_ty), mask=keep)
    if HAS_RUNNING_VAR:
        unbiased = tl.where(count > 1, var * (count / (count - 1)), var)
        running = tl.load(running_var_ptr + channels, mask=keep, other=0.0).to(acc)
        updated = running * (1 - momentum) + unbiased * momentum
        tl.store(running_var_ptr + channels,
                 updated.to(running_var_ptr.dtype.element_ty), mask=keep)


@triton.jit(do_not_specialize=["A"])
def normalise(x_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, running_mean_ptr,
              running_var_ptr, A, C, L, eps_hi, eps_lo, EVALUATION: tl.constexpr,
              HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_A: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """``y = (x - mean) * (invstd * weight) + bias`` for one block of rows and channels.

    In training ``mean`` and ``invstd`` come from :func:`stats_combine`. In evaluation they are
    the running statistics, turned into ``invstd`` here and written out by the first row of
    programs (the backward pass needs them). Subtracting the mean before scaling, rather than
    one multiply-add ``x * scale + shift``, keeps the digits when the mean is large.
    """
    acc = mean_ptr.dtype.element_ty
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    a_start = tl.program_id(0) * BLOCK_A
    keep = channels < C
    if EVALUATION:
        mean = tl.load(running_mean_ptr + channels, mask=keep, other=0.0).to(acc)
        var = tl.load(running_var_ptr + channels, mask=keep, other=1.0).to(acc)
        invstd = 1.0 / tl.sqrt(var + (tl.cast(eps_hi, acc) + tl.cast(eps_lo, acc)))
        if tl.program_id(0) == 0:
            tl.store(mean_ptr + channels, mean, mask=keep)
            tl.store(invstd_ptr + channels, invstd, mask=keep)
    else:
        mean = tl.load(mean_ptr + channels, mask=keep, other=0.0)
        invstd = tl.load(invstd_ptr + channels, mask=keep, other=0.0)
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(weight_ptr + channels, mask=keep, other=0.0).to(acc)
    shift = tl.zeros([BLOCK_C], acc)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + channels, mask=keep, other=0.0).to(acc)
    for l_start in range(0, L, BLOCK_L):
        row = a_start + tl.arange(0, BLOCK_A)
        positions = l_start + tl.arange(0, BLOCK_L)
        # int64 rows: a large activation has more than 2**31 elements.
        offsets = (row[:, None, None].to(tl.int64) * C * L + channels[None, :, None] * L
                   + positions[None, None, :])
        mask = ((row[:, None, None] < A) & (channels[None, :, None] < C)
                & (positions[None, None, :] < L))
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc)
        y = (x - mean[None, :, None]) * scale[None, :, None] + shift[None, :, None]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["A", "rows_per_split"])
def backward_partial(grad_ptr, x_ptr, mean_ptr, sum_dy_ptr, sum_dy_xmu_ptr, sum_xmu_ptr, A, C,
                     L, rows_per_split, TRAINING: tl.constexpr, BLOCK_A: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per channel and split: ``sum(g)``, ``sum(g * (x - mean))`` and (training) ``sum(x - mean)``.

    The last one measures how far the saved, rounded mean is from the true one; see
    :func:`backward_combine`. Sums accumulate per lane over the tiles, then once across lanes.
    """
    acc = mean_ptr.dtype.element_ty
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(0)
    a_begin = split * rows_per_split
    a_end = tl.minimum(a_begin + rows_per_split, A)
    keep = channels < C
    mean = tl.load(mean_ptr + channels, mask=keep, other=0.0)
    sum_dy = tl.zeros([BLOCK_A, BLOCK_C, BLOCK_L], acc)
    sum_dy_xmu = tl.zeros([BLOCK_A, BLOCK_C, BLOCK_L], acc)
    sum_xmu = tl.zeros([BLOCK_A, BLOCK_C, BLOCK_L], acc)
    for a_start in range(a_begin, a_end, BLOCK_A):
        for l_start in range(0, L, BLOCK_L):
            row = a_start + tl.arange(0, BLOCK_A)
            positions = l_start + tl.arange(0, BLOCK_L)
            # int64 rows: a large activation has more than 2**31 elements.
            offsets = (row[:, None, None].to(tl.int64) * C * L + channels[None, :, None] * L
                       + positions[None, None, :])
            mask = ((row[:, None, None] < a_end) & (channels[None, :, None] < C)
                    & (positions[None, None, :] < L))
            g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(acc)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc)
            centred = tl.where(mask, x - mean[None, :, None], 0.0)
            sum_dy += g
            sum_dy_xmu += g * centred
            if TRAINING:
                sum_xmu += centred
    base = split * C + channels
    tl.store(sum_dy_ptr + base, tl.sum(tl.sum(sum_dy, axis=2), axis=0), mask=keep)
    tl.store(sum_dy_xmu_ptr + base, tl.sum(tl.sum(sum_dy_xmu, axis=2), axis=0), mask=keep)
    if TRAINING:
        tl.store(sum_xmu_ptr + base, tl.sum(tl.sum(sum_xmu, axis=2), axis=0), mask=keep)


@triton.jit(do_not_specialize=["splits", "count"])
def backward_combine(sum_dy_part_ptr, sum_dy_xmu_part_ptr, sum_xmu_part_ptr, invstd_ptr,
                     weight_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr, grad_weight_ptr,
                     grad_bias_ptr, splits, C, count, TRAINING: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the splits into ``dL/dweight``, ``dL/dbias`` and the factors of ``dL/dx``.

    ``dL/dx = a * g + b * (x - mean) + c`` per channel, with ``a = weight * invstd``,
    ``b = -a * invstd^2 * mean(g * (x - mean))`` and ``c = -a * mean(g)`` (training; in
    evaluation ``b = c = 0``). The saved mean is rounded, so ``x - mean`` carries a per-channel
    offset ``r = mean(x - mean)``; taking ``r * sum(g)`` back out of ``sum(g * (x - mean))``
    (and ``b * r`` out of ``c``) keeps the gradient accurate when the mean is large next to the
    spread.
    """
    acc = invstd_ptr.dtype.element_ty
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = channels < C
    sum_dy = tl.zeros([BLOCK_S, BLOCK_C], acc)
    sum_dy_xmu = tl.zeros([BLOCK_S, BLOCK_C], acc)
    sum_xmu = tl.zeros([BLOCK_S, BLOCK_C], acc)
    for split_start in range(0, splits, BLOCK_S):
        split = split_start + tl.arange(0, BLOCK_S)
        live = (split[:, None] < splits) & keep[None, :]
        offsets = split[:, None] * C + channels[None, :]
        sum_dy += tl.load(sum_dy_part_ptr + offsets, mask=live, other=0.0)
        sum_dy_xmu += tl.load(sum_dy_xmu_part_ptr + offsets, mask=live, other=0.0)
        if TRAINING:
            sum_xmu += tl.load(sum_xmu_part_ptr + offsets, mask=live, other=0.0)
    sum_dy = tl.sum(sum_dy, axis=0)
    sum_dy_xmu = tl.sum(sum_dy_xmu, axis=0)
    sum_xmu = tl.sum(sum_xmu, axis=0)
    invstd = tl.load(invstd_ptr + channels, mask=keep, other=0.0)
    a = invstd
    if HAS_WEIGHT:
        a = invstd * tl.load(weight_ptr + channels, mask=keep, other=0.0).to(acc)
    total = tl.cast(count, acc)
    if TRAINING:
        residual = sum_xmu / total
        sum_dy_xmu = sum_dy_xmu - residual * sum_dy
        b = -a * invstd * invstd * (sum_dy_xmu / total)
        c = -a * (sum_dy / total) - b * residual
        tl.store(coef_b_ptr + channels, b, mask=keep)
        tl.store(coef_c_ptr + channels, c, mask=keep)
    tl.store(coef_a_ptr + channels, a, mask=keep)
    tl.store(grad_weight_ptr + channels, sum_dy_xmu * invstd, mask=keep)
    tl.store(grad_bias_ptr + channels, sum_dy, mask=keep)


@triton.jit(do_not_specialize=["A"])
def grad_input(grad_ptr, x_ptr, mean_ptr, invstd_ptr, weight_ptr, coef_a_ptr, coef_b_ptr,
               coef_c_ptr, out_ptr, A, C, L, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """``dL/dx = a * g + b * (x - mean) + c`` (training), ``weight * invstd * g`` (evaluation)."""
    acc = invstd_ptr.dtype.element_ty
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    a_start = tl.program_id(0) * BLOCK_A
    keep = channels < C
    if TRAINING:
        a = tl.load(coef_a_ptr + channels, mask=keep, other=0.0)
        b = tl.load(coef_b_ptr + channels, mask=keep, other=0.0)
        c = tl.load(coef_c_ptr + channels, mask=keep, other=0.0)
        mean = tl.load(mean_ptr + channels, mask=keep, other=0.0)
    else:
        a = tl.load(invstd_ptr + channels, mask=keep, other=0.0)
        if HAS_WEIGHT:
            a = a * tl.load(weight_ptr + channels, mask=keep, other=0.0).to(acc)
    for l_start in range(0, L, BLOCK_L):
        row = a_start + tl.arange(0, BLOCK_A)
        positions = l_start + tl.arange(0, BLOCK_L)
        # int64 rows: a large activation has more than 2**31 elements.
        offsets = (row[:, None, None].to(tl.int64) * C * L + channels[None, :, None] * L
                   + positions[None, None, :])
        mask = ((row[:, None, None] < A) & (channels[None, :, None] < C)
                & (positions[None, None, :] < L))
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(acc)
        result = g * a[None, :, None]
        if TRAINING:
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc)
            result += (x - mean[None, :, None]) * b[None, :, None] + c[None, :, None]
        tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)
