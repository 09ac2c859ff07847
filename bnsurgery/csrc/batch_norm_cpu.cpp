// bnsurgery's compiled BatchNorm for CPU: the formulas of bnsurgery/functional.py, written from
// scratch (no torch batch-norm call), registered as operators in the `bnsurgery` namespace.
//
// Memory layout. Every input is read as an (A, C, L) block of its memory:
//   - a contiguous NCHW / NCDHW / (N, C, L) input is (N, C, prod(spatial)): each channel is A rows
//     of L contiguous values ("row" path, parallel over channels);
//   - a channels-last input or a 2-D (N, C) one is (rows, C, 1): each row holds one value of every
//     channel ("interleaved" path, parallel over blocks of rows with per-thread partial sums);
//   - any other strides are made contiguous first.
//
// Numerics. Statistics are never taken as E[x^2] - E[x]^2, which loses every digit when the mean
// is large next to the spread. Each chunk (one row of a channel, or a block of rows) is reduced
// in two passes while it sits in cache (its mean, then the squared deviations from that mean), and
// chunks are merged with Chan's pairwise formula in double precision. Float inputs accumulate in
// float lanes inside a chunk and in double across chunks; double inputs accumulate in double;
// float16 / bfloat16 inputs use float arithmetic and are rounded once on the way out.
//
// Passes over memory: training forward reads the input once for the statistics and once more to
// write the output (on the row path the second read comes from cache: one channel is a few
// hundred KB); backward reads (x, grad_out) once for sum(g) and sum(g * (x - mean)), and once more
// to write grad_x.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_common.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

using namespace bnsurgery_cpu;  // Block, block_of, param, the work-splitting rules

// --- Reductions --------------------------------------------------------------------------------

// Mean and sum of squared deviations of n contiguous values (the values are in L1 for the second
// pass). The corrected two-pass algorithm: the first pass gives a provisional mean m, rounded to
// acc_t (with a mean far larger than the spread, the float sum behind it is off in its last
// digits); the second sums d = x - m and d^2, both small and exact, and the exact mean is
// m + sum(d) / n, the squared deviations sum(d^2) - sum(d)^2 / n.
//
// The sums are `omp simd` reductions: the compiler keeps one partial sum per vector lane (the
// reordering a plain loop may not do), which is what makes them run at memory speed.
template <typename scalar_t, typename acc_t>
inline void chunk_moments(const scalar_t* __restrict__ p, int64_t n, double& mean, double& m2) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(p[i]);
  const acc_t provisional = sum / static_cast<acc_t>(n);
  acc_t sd = 0, sq = 0;
#pragma omp simd reduction(+ : sd, sq)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - provisional;
    sd += d;
    sq += d * d;
  }
  const double sum_d = sd, sum_sq = sq;
  mean = static_cast<double>(provisional) + sum_d / n;
  m2 = std::max(0.0, sum_sq - sum_d * sum_d / n);
}

// Chan's formula: merge a chunk of `nb` values (mean mb, squared deviations m2b) into running
// moments over `na` values.
inline void merge(double& na, double& mean, double& m2, double nb, double mb, double m2b) {
  const double n = na + nb;
  const double delta = mb - mean;
  mean += delta * (nb / n);
  m2 += m2b + delta * delta * (na * nb / n);
  na = n;
}

// sum(g), sum(g * (x - mean)) and sum(x - mean) over n contiguous values. The last one is ideally
// zero; it measures how far the rounded mean is from the exact one (see backward).
template <typename scalar_t, typename acc_t>
inline void chunk_grad_sums(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                            int64_t n, acc_t mean, acc_t& sum_g, acc_t& sum_gxmu, acc_t& sum_xmu) {
  acc_t sg = 0, sgx = 0, sx = 0;
#pragma omp simd reduction(+ : sg, sgx, sx)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t gv = static_cast<acc_t>(g[i]);
    const acc_t d = static_cast<acc_t>(x[i]) - mean;
    sg += gv;
    sgx += gv * d;
    sx += d;
  }
  sum_g = sg;
  sum_gxmu = sgx;
  sum_xmu = sx;
}

// out = (in - centre) * scale + shift over n contiguous values, rounded once.
template <typename scalar_t, typename acc_t>
inline void centre_scale_shift(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                               int64_t n, acc_t centre, acc_t scale, acc_t shift) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>((static_cast<acc_t>(in[i]) - centre) * scale + shift);
  }
}

// --- Interleaved rows (one value of every channel per row) ---------------------------------------
// Each helper takes one row; __restrict__ tells the vectoriser that the buffers do not overlap.

template <typename scalar_t, typename acc_t>
inline void row_sum(const scalar_t* __restrict__ row, acc_t* __restrict__ sum, int64_t C) {
  for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc_t>(row[c]);
}

template <typename scalar_t, typename acc_t>
inline void row_sq_dev(const scalar_t* __restrict__ row, const acc_t* __restrict__ mean,
                       acc_t* __restrict__ sum_d, acc_t* __restrict__ m2, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = static_cast<acc_t>(row[c]) - mean[c];
    sum_d[c] += d;
    m2[c] += d * d;
  }
}

template <typename scalar_t, typename acc_t>
inline void row_grad_sums(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                          const acc_t* __restrict__ mean, acc_t* __restrict__ sum_g,
                          acc_t* __restrict__ sum_gxmu, acc_t* __restrict__ sum_xmu, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t gv = static_cast<acc_t>(g[c]);
    const acc_t d = static_cast<acc_t>(x[c]) - mean[c];
    sum_g[c] += gv;
    sum_gxmu[c] += gv * d;
    sum_xmu[c] += d;
  }
}

template <typename scalar_t, typename acc_t>
inline void row_affine(const scalar_t* __restrict__ x, const acc_t* __restrict__ centre,
                       const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                       scalar_t* __restrict__ out, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    out[c] = static_cast<scalar_t>((static_cast<acc_t>(x[c]) - centre[c]) * scale[c] + shift[c]);
  }
}

// dL/dx = a * g + k * (x - mean) + c0 (training); a * g (evaluation: k = c0 = 0 unused).
template <typename scalar_t, typename acc_t>
inline void row_grad_train(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                           const acc_t* __restrict__ mean, const acc_t* __restrict__ a,
                           const acc_t* __restrict__ k, const acc_t* __restrict__ c0,
                           scalar_t* __restrict__ out, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    out[c] = static_cast<scalar_t>(a[c] * static_cast<acc_t>(g[c])
                                   + k[c] * (static_cast<acc_t>(x[c]) - mean[c]) + c0[c]);
  }
}

template <typename scalar_t, typename acc_t>
inline void row_grad_eval(const scalar_t* __restrict__ g, const acc_t* __restrict__ a,
                          scalar_t* __restrict__ out, int64_t C) {
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(a[c] * static_cast<acc_t>(g[c]));
}

// Same two for one channel's row of L values (per-channel constants).
template <typename scalar_t, typename acc_t>
inline void run_grad_train(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                           acc_t mean, acc_t a, acc_t k, acc_t c0, scalar_t* __restrict__ out,
                           int64_t L) {
  for (int64_t i = 0; i < L; ++i) {
    out[i] = static_cast<scalar_t>(a * static_cast<acc_t>(g[i])
                                   + k * (static_cast<acc_t>(x[i]) - mean) + c0);
  }
}

template <typename scalar_t, typename acc_t>
inline void run_grad_eval(const scalar_t* __restrict__ g, acc_t a, scalar_t* __restrict__ out,
                          int64_t L) {
  for (int64_t i = 0; i < L; ++i) out[i] = static_cast<scalar_t>(a * static_cast<acc_t>(g[i]));
}

// --- Statistics --------------------------------------------------------------------------------

// Mean and biased variance of channels [c0, c1) on the row path, the block read row by row; each
// channel's rows are merged in order, so the result does not depend on the block size.
template <typename scalar_t, typename acc_t>
void row_moments(const scalar_t* x, int64_t A, int64_t C, int64_t L, int64_t c0, int64_t c1,
                 double* mean, double* var, std::vector<double>& m2) {
  m2.assign(c1 - c0, 0.0);
  for (int64_t c = c0; c < c1; ++c) mean[c] = 0.0;
  for (int64_t a = 0; a < A; ++a) {
    const double seen = static_cast<double>(a * L);
    for (int64_t c = c0; c < c1; ++c) {
      double cm, cm2, n = seen;
      chunk_moments<scalar_t, acc_t>(x + (a * C + c) * L, L, cm, cm2);
      merge(n, mean[c], m2[c - c0], static_cast<double>(L), cm, cm2);
    }
  }
  const double n = static_cast<double>(A * L);
  for (int64_t c = c0; c < c1; ++c) var[c] = m2[c - c0] / n;
}

// Per-channel mean and *biased* variance (double), for both layouts.
template <typename scalar_t, typename acc_t>
void moments(const Block& b, std::vector<double>& mean, std::vector<double>& var) {
  const int64_t A = b.rows, C = b.channels, L = b.inner;
  const scalar_t* x = b.x.data_ptr<scalar_t>();
  mean.assign(C, 0.0);
  var.assign(C, 0.0);
  if (L > 1) {
    const int64_t block = channel_block(A * L, sizeof(scalar_t));
    const int64_t blocks = (C + block - 1) / block;
    at::parallel_for(0, blocks, grain_for(block * A * L), [&](int64_t begin, int64_t end) {
      std::vector<double> m2;
      for (int64_t bi = begin; bi < end; ++bi) {
        row_moments<scalar_t, acc_t>(x, A, C, L, bi * block, std::min(C, (bi + 1) * block),
                                     mean.data(), var.data(), m2);
      }
    });
    return;
  }
  const int64_t parts = parts_for(A, C);
  const int64_t step = block_rows(C, sizeof(scalar_t));
  std::vector<double> part_n(parts, 0.0), part_mean(parts * C, 0.0), part_m2(parts * C, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> bsum(C), bd(C), bm2(C);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r0 = A * p / parts, r1 = A * (p + 1) / parts;
      double* pm = part_mean.data() + p * C;
      double* pm2 = part_m2.data() + p * C;
      double n = 0;
      for (int64_t r = r0; r < r1; r += step) {
        // One block of rows, in L2: its provisional mean, then the corrected second pass (see
        // chunk_moments), merged into this part's moments.
        const int64_t nb = std::min(step, r1 - r);
        std::fill(bsum.begin(), bsum.end(), acc_t(0));
        std::fill(bd.begin(), bd.end(), acc_t(0));
        std::fill(bm2.begin(), bm2.end(), acc_t(0));
        for (int64_t i = 0; i < nb; ++i) row_sum<scalar_t, acc_t>(x + (r + i) * C, bsum.data(), C);
        const acc_t inv = acc_t(1) / static_cast<acc_t>(nb);
        for (int64_t c = 0; c < C; ++c) bsum[c] *= inv;  // now the provisional block mean
        for (int64_t i = 0; i < nb; ++i) {
          row_sq_dev<scalar_t, acc_t>(x + (r + i) * C, bsum.data(), bd.data(), bm2.data(), C);
        }
        const double na = n, nbd = static_cast<double>(nb), total = na + nbd;
        for (int64_t c = 0; c < C; ++c) {
          const double sd = bd[c];
          const double block_mean = static_cast<double>(bsum[c]) + sd / nbd;
          const double block_m2 = std::max(0.0, static_cast<double>(bm2[c]) - sd * sd / nbd);
          const double delta = block_mean - pm[c];
          pm[c] += delta * (nbd / total);
          pm2[c] += block_m2 + delta * delta * (na * nbd / total);
        }
        n = total;
      }
      part_n[p] = n;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, m = 0, m2 = 0;
    for (int64_t p = 0; p < parts; ++p) {
      merge(n, m, m2, part_n[p], part_mean[p * C + c], part_m2[p * C + c]);
    }
    mean[c] = m;
    var[c] = m2 / n;
  }
}

// y = (x - centre) * scale + shift per channel, for both layouts. Centring first, rather than
// folding the mean into the shift (x * scale + (bias - mean * scale)), keeps the digits of a
// mean far larger than the spread: x - centre is exact there.
template <typename scalar_t, typename acc_t>
void normalise(const Block& b, Tensor& y, const acc_t* centre, const std::vector<acc_t>& scale,
               const std::vector<acc_t>& shift) {
  const int64_t A = b.rows, C = b.channels, L = b.inner;
  const scalar_t* x = b.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  if (L > 1) {
    at::parallel_for(0, A * C, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t ac = begin; ac < end; ++ac) {
        const int64_t c = ac % C;
        centre_scale_shift<scalar_t, acc_t>(x + ac * L, out + ac * L, L, centre[c], scale[c],
                                            shift[c]);
      }
    });
    return;
  }
  const acc_t* s = scale.data();
  const acc_t* t = shift.data();
  at::parallel_for(0, A, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      row_affine<scalar_t, acc_t>(x + r * C, centre, s, t, out + r * C, C);
    }
  });
}

// scale = weight * invstd and shift = bias - (mean - centre) * scale, per channel, where centre
// is the mean rounded to the accumulation dtype (what the output is centred on) and mean the
// exact one: the rounding error of the centre is taken back out in the shift.
template <typename acc_t>
void scale_and_shift(int64_t C, const double* mean, const acc_t* centre, const acc_t* invstd,
                     const acc_t* weight, const acc_t* bias, std::vector<acc_t>& scale,
                     std::vector<acc_t>& shift) {
  scale.resize(C);
  shift.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t s = weight ? weight[c] * invstd[c] : invstd[c];
    scale[c] = s;
    const double residual = mean[c] - static_cast<double>(centre[c]);
    shift[c] = static_cast<acc_t>((bias ? bias[c] : acc_t(0)) - residual * s);
  }
}

// Training forward on the row path, one block of channels at a time: its moments, then
// mean / invstd / scale / shift (as scale_and_shift), then y, the second read of the block coming
// from L2 rather than memory.
template <typename scalar_t, typename acc_t>
void train_rows(const Block& b, Tensor& y, const acc_t* weight, const acc_t* bias, double eps,
                std::vector<double>& mean_d, std::vector<double>& var_d, acc_t* m, acc_t* is) {
  const int64_t A = b.rows, C = b.channels, L = b.inner;
  const scalar_t* x = b.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  mean_d.assign(C, 0.0);
  var_d.assign(C, 0.0);
  const int64_t block = channel_block(A * L, sizeof(scalar_t));
  const int64_t blocks = (C + block - 1) / block;
  at::parallel_for(0, blocks, grain_for(block * A * L), [&](int64_t begin, int64_t end) {
    std::vector<double> m2;
    std::vector<acc_t> scale(block), shift(block);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t c0 = bi * block, c1 = std::min(C, c0 + block);
      row_moments<scalar_t, acc_t>(x, A, C, L, c0, c1, mean_d.data(), var_d.data(), m2);
      for (int64_t c = c0; c < c1; ++c) {
        m[c] = static_cast<acc_t>(mean_d[c]);
        is[c] = static_cast<acc_t>(1.0 / std::sqrt(var_d[c] + eps));  // 1 / sqrt(var + eps)
        const acc_t sc = weight ? weight[c] * is[c] : is[c];
        const double residual = mean_d[c] - static_cast<double>(m[c]);
        scale[c - c0] = sc;
        shift[c - c0] = static_cast<acc_t>((bias ? bias[c] : acc_t(0)) - residual * sc);
      }
      for (int64_t a = 0; a < A; ++a) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t off = (a * C + c) * L;
          centre_scale_shift<scalar_t, acc_t>(x + off, out + off, L, m[c], scale[c - c0],
                                              shift[c - c0]);
        }
      }
    }
  });
}

// A running statistic as a contiguous (C,) tensor of the accumulation dtype to update: the
// buffer itself when it already is one, else a copy that `store` rounds back into it once.
Tensor updatable(const Tensor& buffer, at::ScalarType acc) {
  if (buffer.scalar_type() == acc && buffer.is_contiguous()) return buffer;
  return buffer.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

void store(Tensor& buffer, const Tensor& values) {
  if (!values.is_same(buffer)) buffer.copy_(values);
}

std::tuple<Tensor, Tensor, Tensor> empty_result(const Tensor& input) {
  const auto acc = at::toOpMathType(input.scalar_type());
  auto options = input.options().dtype(acc);
  Tensor zeros = at::zeros({input.size(1)}, options);
  return {input.clone(), zeros, zeros.clone()};
}

// --- Operators ---------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> batch_norm_eval(const Tensor& input,
                                                   const c10::optional<Tensor>& weight_opt,
                                                   const c10::optional<Tensor>& bias_opt,
                                                   const Tensor& running_mean,
                                                   const Tensor& running_var, double eps) {
  if (input.numel() == 0) return empty_result(input);
  const Block b = block_of(input);
  const auto acc = at::toOpMathType(input.scalar_type());
  const int64_t C = b.channels;
  Tensor weight = param(weight_opt, acc), bias = param(bias_opt, acc);
  // The mean is returned, so it is a copy, never the buffer itself.
  Tensor running = param(running_mean, acc);
  auto options = input.options().dtype(acc);
  Tensor mean = at::empty({C}, options), invstd = at::empty({C}, options);
  Tensor y = at::empty_like(b.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "bnsurgery_batch_norm_eval", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor var = param(running_var, acc);
    const acc_t* v = var.data_ptr<acc_t>();
    const acc_t* rm = running.data_ptr<acc_t>();
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* is = invstd.data_ptr<acc_t>();
    std::vector<double> mean_d(C);
    for (int64_t c = 0; c < C; ++c) {
      m[c] = rm[c];
      is[c] = acc_t(1) / std::sqrt(v[c] + static_cast<acc_t>(eps));  // invstd = 1/sqrt(var+eps)
      mean_d[c] = m[c];
    }
    std::vector<acc_t> scale, shift;
    scale_and_shift<acc_t>(C, mean_d.data(), m, is, ptr_or_null<acc_t>(weight),
                           ptr_or_null<acc_t>(bias), scale, shift);
    normalise<scalar_t, acc_t>(b, y, m, scale, shift);
  });
  return {y, mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input,
                                                    const c10::optional<Tensor>& weight_opt,
                                                    const c10::optional<Tensor>& bias_opt,
                                                    c10::optional<Tensor> running_mean,
                                                    c10::optional<Tensor> running_var,
                                                    double momentum, double eps) {
  if (input.numel() == 0) return empty_result(input);
  const Block b = block_of(input);
  const auto acc = at::toOpMathType(input.scalar_type());
  const int64_t C = b.channels;
  const int64_t count = input.numel() / C;
  Tensor weight = param(weight_opt, acc), bias = param(bias_opt, acc);
  auto options = input.options().dtype(acc);
  Tensor mean = at::empty({C}, options), invstd = at::empty({C}, options);
  Tensor y = at::empty_like(b.x);
  const bool update_mean = running_mean.has_value() && running_mean->defined();
  const bool update_var = running_var.has_value() && running_var->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "bnsurgery_batch_norm_train", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<double> mean_d, var_d;
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* is = invstd.data_ptr<acc_t>();
    if (b.inner > 1) {
      train_rows<scalar_t, acc_t>(b, y, ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias),
                                  eps, mean_d, var_d, m, is);
    } else {
      moments<scalar_t, acc_t>(b, mean_d, var_d);
      for (int64_t c = 0; c < C; ++c) {
        m[c] = static_cast<acc_t>(mean_d[c]);
        is[c] = static_cast<acc_t>(1.0 / std::sqrt(var_d[c] + eps));
      }
      std::vector<acc_t> scale, shift;
      scale_and_shift<acc_t>(C, mean_d.data(), m, is, ptr_or_null<acc_t>(weight),
                             ptr_or_null<acc_t>(bias), scale, shift);
      normalise<scalar_t, acc_t>(b, y, m, scale, shift);
    }
    // Running statistics: an exponential moving average with the unbiased variance, each new
    // value computed in the accumulation dtype and rounded once into its buffer.
    const acc_t keep = static_cast<acc_t>(1.0 - momentum);
    const acc_t take = static_cast<acc_t>(momentum);
    const double bessel = count > 1 ? static_cast<double>(count) / (count - 1) : 1.0;
    if (update_mean) {
      Tensor updated = updatable(*running_mean, acc);
      acc_t* u = updated.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) u[c] = u[c] * keep + m[c] * take;
      store(*running_mean, updated);
    }
    if (update_var) {
      Tensor updated = updatable(*running_var, acc);
      acc_t* u = updated.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        u[c] = u[c] * keep + static_cast<acc_t>(var_d[c] * bessel) * take;
      }
      store(*running_var, updated);
    }
  });
  return {y, mean, invstd};
}

// Gradients. Training: dL/dx = a * g + k * (x - mean) + c per channel, with a = weight * invstd,
// k = -a * invstd^2 * sum(g * (x - mean)) / M and c = -a * sum(g) / M (functional.py's formula
// with its per-channel factors gathered). Evaluation: dL/dx = a * g. Always
// dL/dweight = sum(g * (x - mean)) * invstd and dL/dbias = sum(g).
//
// The saved mean is rounded to the accumulation dtype, so x - mean is off by a per-channel
// constant r = mean(x - mean), ideally 0. With a mean far larger than the spread, r times sum(g)
// would swamp sum(g * (x - mean)); measuring r in the same pass and taking it back out keeps the
// digits.
//
// Outputs not asked for in output_mask are returned as empty (0,) tensors.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out,
                                                       const Tensor& input,
                                                       const c10::optional<Tensor>& weight_opt,
                                                       const Tensor& saved_mean,
                                                       const Tensor& saved_invstd, bool training,
                                                       std::array<bool, 3> output_mask) {
  const auto acc = at::toOpMathType(input.scalar_type());
  const int64_t C = input.size(1);
  auto acc_options = input.options().dtype(acc);
  Tensor grad_x = output_mask[0] ? Tensor() : at::empty({0}, input.options());
  Tensor grad_w = output_mask[1] ? at::empty({C}, acc_options) : at::empty({0}, acc_options);
  Tensor grad_b = output_mask[2] ? at::empty({C}, acc_options) : at::empty({0}, acc_options);
  if (input.numel() == 0) {
    if (output_mask[0]) grad_x = at::zeros_like(input);
    if (output_mask[1]) grad_w.zero_();
    if (output_mask[2]) grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  const Block b = block_of(input);
  const Tensor g_dense = grad_out.contiguous(b.format);
  const int64_t A = b.rows, L = b.inner;
  const int64_t count = input.numel() / C;
  Tensor weight = param(weight_opt, acc);
  Tensor mean_t = param(saved_mean, acc), invstd_t = param(saved_invstd, acc);
  if (output_mask[0]) grad_x = at::empty_like(b.x);
  const bool reduce = training || output_mask[1] || output_mask[2];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "bnsurgery_batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = b.x.data_ptr<scalar_t>();
    const scalar_t* g = g_dense.data_ptr<scalar_t>();
    const acc_t* mean = mean_t.data_ptr<acc_t>();
    const acc_t* invstd = invstd_t.data_ptr<acc_t>();
    const acc_t* w = ptr_or_null<acc_t>(weight);
    std::vector<acc_t> a(C), k(C, acc_t(0)), c0(C);
    for (int64_t c = 0; c < C; ++c) a[c] = w ? w[c] * invstd[c] : invstd[c];
    scalar_t* gx = output_mask[0] ? grad_x.data_ptr<scalar_t>() : nullptr;
    std::vector<double> sum_g(C, 0.0), sum_gxmu(C, 0.0), sum_xmu(C, 0.0);
    // dL/dx of one channel, once its sums are known: a * g + k * (x - mean) + c.
    auto factors = [&](int64_t c) {
      if (training) {
        const double residual = sum_xmu[c] / count;
        const double dot = sum_gxmu[c] - residual * sum_g[c];
        sum_gxmu[c] = dot;
        const double ac = a[c], is = invstd[c];
        const double kc = -ac * is * is * (dot / count);
        k[c] = static_cast<acc_t>(kc);
        c0[c] = static_cast<acc_t>(-ac * (sum_g[c] / count) - kc * residual);
      } else {
        k[c] = 0;
        c0[c] = 0;
      }
    };
    if (L > 1) {
      // Row path: one block of channels at a time (see channel_block), read row by row, its
      // values still in L2 for the second pass.
      const int64_t block = channel_block(A * L, sizeof(scalar_t));
      const int64_t blocks = (C + block - 1) / block;
      at::parallel_for(0, blocks, grain_for(block * A * L), [&](int64_t begin, int64_t end) {
        for (int64_t bi = begin; bi < end; ++bi) {
          const int64_t first = bi * block, last = std::min(C, first + block);
          if (reduce) {
            for (int64_t r = 0; r < A; ++r) {
              for (int64_t c = first; c < last; ++c) {
                const int64_t off = (r * C + c) * L;
                acc_t sg, sgx, sx;
                chunk_grad_sums<scalar_t, acc_t>(x + off, g + off, L, mean[c], sg, sgx, sx);
                sum_g[c] += sg;
                sum_gxmu[c] += sgx;
                sum_xmu[c] += sx;
              }
            }
            for (int64_t c = first; c < last; ++c) factors(c);
          }
          if (!gx) continue;
          for (int64_t r = 0; r < A; ++r) {
            for (int64_t c = first; c < last; ++c) {
              const int64_t off = (r * C + c) * L;
              if (training) {
                run_grad_train<scalar_t, acc_t>(x + off, g + off, mean[c], a[c], k[c], c0[c],
                                                gx + off, L);
              } else {
                run_grad_eval<scalar_t, acc_t>(g + off, a[c], gx + off, L);
              }
            }
          }
        }
      });
    } else {
      if (reduce) {
        const int64_t parts = parts_for(A, C);
        const int64_t step = block_rows(C, sizeof(scalar_t));
        std::vector<double> part(3 * parts * C, 0.0);
        at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
          std::vector<acc_t> bg(C), bgx(C), bx(C);
          for (int64_t p = begin; p < end; ++p) {
            const int64_t r0 = A * p / parts, r1 = A * (p + 1) / parts;
            double* pg = part.data() + (3 * p) * C;
            double* pgx = pg + C;
            double* px = pgx + C;
            for (int64_t r = r0; r < r1; r += step) {
              const int64_t nb = std::min(step, r1 - r);
              std::fill(bg.begin(), bg.end(), acc_t(0));
              std::fill(bgx.begin(), bgx.end(), acc_t(0));
              std::fill(bx.begin(), bx.end(), acc_t(0));
              for (int64_t i = 0; i < nb; ++i) {
                row_grad_sums<scalar_t, acc_t>(x + (r + i) * C, g + (r + i) * C, mean, bg.data(),
                                               bgx.data(), bx.data(), C);
              }
              for (int64_t c = 0; c < C; ++c) {
                pg[c] += bg[c];
                pgx[c] += bgx[c];
                px[c] += bx[c];
              }
            }
          }
        });
        for (int64_t p = 0; p < parts; ++p) {
          const double* pg = part.data() + (3 * p) * C;
          for (int64_t c = 0; c < C; ++c) {
            sum_g[c] += pg[c];
            sum_gxmu[c] += pg[C + c];
            sum_xmu[c] += pg[2 * C + c];
          }
        }
        for (int64_t c = 0; c < C; ++c) factors(c);
      }
      if (gx) {
        const acc_t* ap = a.data();
        const acc_t* kp = k.data();
        const acc_t* cp = c0.data();
        at::parallel_for(0, A, grain_for(C), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            if (training) {
              row_grad_train<scalar_t, acc_t>(x + r * C, g + r * C, mean, ap, kp, cp, gx + r * C,
                                              C);
            } else {
              row_grad_eval<scalar_t, acc_t>(g + r * C, ap, gx + r * C, C);
            }
          }
        });
      }
    }
    if (output_mask[1]) {
      acc_t* gw = grad_w.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) gw[c] = static_cast<acc_t>(sum_gxmu[c] * invstd[c]);
    }
    if (output_mask[2]) {
      acc_t* gb = grad_b.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) gb[c] = static_cast<acc_t>(sum_g[c]);
    }
  });
  return {grad_x, grad_w, grad_b};
}

// --- Autograd --------------------------------------------------------------------------------
// The derivative of the two forward operators, registered for the Autograd dispatch key: a
// training call from Python is one operator call, its node a C++ one. The forward and the
// backward call the operators through the dispatcher (below autograd), so that fake tensors,
// tracing modes and the profiler see them as before.
//
// Backward computes the gradients of functional.py's formulas with the backward operator,
// unless something will differentiate or batch the backward itself: create_graph=True (grad
// mode on), a forward-mode tangent on the incoming gradient, or a batched / wrapped tensor
// (gradcheck's batched gradients, torch.func). Then it runs the same formulas written out in
// differentiable ATen operations (autograd_function.backward_differentiable, line for line),
// which autograd and the batching rules can see through.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TrainSignature = decltype(batch_norm_train);
using EvalSignature = decltype(batch_norm_eval);
using BackwardSignature = decltype(batch_norm_backward);

const c10::TypedOperatorHandle<TrainSignature>& train_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("bnsurgery::cpp_batch_norm_train", "").typed<TrainSignature>();
  return op;
}

const c10::TypedOperatorHandle<EvalSignature>& eval_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("bnsurgery::cpp_batch_norm_eval", "").typed<EvalSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("bnsurgery::cpp_batch_norm_backward", "").typed<BackwardSignature>();
  return op;
}

bool defined(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

bool requires_grad(const c10::optional<Tensor>& t) { return defined(t) && t->requires_grad(); }

// Whether the backward must be differentiable or batchable (see above).
bool unusual(const Tensor& t) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Batched,
                                            c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::Python});
  return t.key_set().has_any(wrapped) || t._fw_grad(/*level=*/0).defined();
}

// The backward formulas in differentiable operations. In training the statistics are
// recomputed from x inside the graph: they depend on x, and a second derivative must see it.
variable_list differentiable_backward(const Tensor& grad_out, const Tensor& x,
                                      const Tensor& weight, Tensor mean, Tensor invstd,
                                      bool training, double eps) {
  const auto acc = invstd.scalar_type();
  std::vector<int64_t> dims{0};
  std::vector<int64_t> shape(x.dim(), 1);  // a (C,) vector viewed to broadcast against x
  shape[1] = -1;
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  const Tensor xf = x.to(acc), g = grad_out.to(acc);
  if (training) {
    mean = xf.mean(dims);                                            // mean = sum(x) / M
    const Tensor var = (xf - mean.view(shape)).square().mean(dims);  // biased variance
    invstd = at::rsqrt(var + eps);
  }
  const Tensor x_hat = (xf - mean.view(shape)) * invstd.view(shape);
  const Tensor w = weight.defined() ? weight.to(acc) : at::ones_like(invstd);
  const Tensor grad_b = g.sum(dims);                                 // dL/dbias = sum(g)
  const Tensor grad_w = (g * x_hat).sum(dims);                       // dL/dweight = sum(g x_hat)
  Tensor inner = g;
  if (training) {  // g - mean(g) - x_hat * mean(g * x_hat)
    inner = g - g.mean(dims).view(shape) - x_hat * (g * x_hat).mean(dims).view(shape);
  }
  const Tensor grad_x = (w * invstd).view(shape) * inner;
  return {grad_x.to(x.scalar_type()), grad_w, grad_b};
}

// Shared by both nodes: saves what backward needs, and which of its inputs are tensors.
void save(AutogradContext* ctx, const Tensor& input, const c10::optional<Tensor>& weight,
          const c10::optional<Tensor>& bias, const Tensor& mean, const Tensor& invstd,
          bool training, double eps) {
  ctx->mark_non_differentiable({mean, invstd});
  ctx->save_for_backward({input, defined(weight) ? *weight : Tensor(), mean, invstd});
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
  // Edges exist for tensor arguments only: where weight's and bias's are, if they exist.
  ctx->saved_data["weight_edge"] = defined(weight) ? int64_t(1) : int64_t(-1);
  ctx->saved_data["bias_edge"] = defined(bias) ? int64_t(1 + defined(weight)) : int64_t(-1);
  ctx->saved_data["bias_dtype"] =
      defined(bias) ? static_cast<int64_t>(bias->scalar_type()) : int64_t(-1);
}

// Gradients for (input, weight, bias); the caller pads them to the forward's argument count.
variable_list gradients(AutogradContext* ctx, const variable_list& grad_outputs) {
  const auto saved = ctx->get_saved_variables();
  const Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3];
  const bool training = ctx->saved_data["training"].toBool();
  const int64_t weight_edge = ctx->saved_data["weight_edge"].toInt();
  const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
  const std::array<bool, 3> needs{ctx->needs_input_grad(0),
                                  weight_edge >= 0 && ctx->needs_input_grad(weight_edge),
                                  bias_edge >= 0 && ctx->needs_input_grad(bias_edge)};
  Tensor grad_out = grad_outputs[0];
  if (!grad_out.defined()) grad_out = at::zeros_like(x);
  variable_list grads;
  if (x.numel() > 0 && (at::GradMode::is_enabled() || unusual(grad_out) || unusual(x))) {
    grads = differentiable_backward(grad_out, x, weight, mean, invstd, training,
                                    ctx->saved_data["eps"].toDouble());
  } else {
    auto [gx, gw, gb] = backward_op().call(grad_out, x, weight, mean, invstd, training, needs);
    grads = {gx, gw, gb};
  }
  for (size_t i = 0; i < 3; ++i) {
    if (!needs[i]) grads[i] = Tensor();
  }
  if (grads[1].defined()) grads[1] = grads[1].to(weight.scalar_type());
  const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
  if (grads[2].defined() && bias_dtype >= 0) {
    grads[2] = grads[2].to(static_cast<at::ScalarType>(bias_dtype));
  }
  return grads;
}

struct TrainNode : public torch::autograd::Function<TrainNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias,
                               c10::optional<Tensor> running_mean,
                               c10::optional<Tensor> running_var, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd] =
        train_op().call(input, weight, bias, running_mean, running_var, momentum, eps);
    save(ctx, input, weight, bias, mean, invstd, /*training=*/true, eps);
    return {y, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads = gradients(ctx, grad_outputs);
    grads.resize(7);  // none for running_mean, running_var, momentum, eps
    return grads;
  }
};

struct EvalNode : public torch::autograd::Function<EvalNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, const Tensor& running_mean,
                               const Tensor& running_var, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd] = eval_op().call(input, weight, bias, running_mean, running_var, eps);
    save(ctx, input, weight, bias, mean, invstd, /*training=*/false, eps);
    return {y, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads = gradients(ctx, grad_outputs);
    grads.resize(6);  // none for running_mean, running_var, eps
    return grads;
  }
};

// The running statistics are updated below autograd: their version counters are bumped here,
// as for any in-place operation, so a graph that saved them notices.
void bump(const c10::optional<Tensor>& t) {
  if (defined(t) && !t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(
    const Tensor& input, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias, c10::optional<Tensor> running_mean,
    c10::optional<Tensor> running_var, double momentum, double eps) {
  std::tuple<Tensor, Tensor, Tensor> out;
  if (at::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    const variable_list r =
        TrainNode::apply(input, weight, bias, running_mean, running_var, momentum, eps);
    out = {r[0], r[1], r[2]};
  } else {  // nothing to differentiate: no node
    at::AutoDispatchBelowADInplaceOrView guard;
    out = train_op().call(input, weight, bias, running_mean, running_var, momentum, eps);
  }
  bump(running_mean);
  bump(running_var);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_eval_autograd(
    const Tensor& input, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias, const Tensor& running_mean, const Tensor& running_var,
    double eps) {
  if (at::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    const variable_list r = EvalNode::apply(input, weight, bias, running_mean, running_var, eps);
    return {r[0], r[1], r[2]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return eval_op().call(input, weight, bias, running_mean, running_var, eps);
}

// --- The checked entry point from Python --------------------------------------------------------
//
// bnsurgery.functional.batch_norm checks its arguments in Python, as torch does, and names what is
// wrong in its errors; for a small input those checks and the operator's boxed call cost as much
// as the kernel. `fast_batch_norm` makes the same checks here and runs the operator (its Autograd
// kernel first, so a node is recorded when gradients are wanted) when every one passes. When any
// fails, or an argument is unusual (a tensor subclass, a wrapped or dual tensor, another device or
// layout), it returns None and the Python path runs: it never raises a user error and never
// accepts what the Python path would refuse.

PyTypeObject* parameter_type = nullptr;  // torch.nn.Parameter, set when the module is imported

// A tensor argument that the fast path may take: a plain Tensor or Parameter on the CPU, strided,
// not wrapped by a transform, with no forward-mode tangent.
const Tensor* usable(PyObject* obj) {
  if (!THPVariable_CheckExact(obj) && Py_TYPE(obj) != parameter_type) return nullptr;
  const Tensor& t = THPVariable_Unpack(obj);
  if (!t.is_cpu() || t.layout() != at::kStrided || unusual(t)) return nullptr;
  return &t;
}

// An optional per-channel argument: None, or a usable tensor of `channels` values.
bool per_channel(PyObject* obj, int64_t channels, c10::optional<Tensor>& out) {
  if (obj == Py_None) return true;
  const Tensor* t = usable(obj);
  if (t == nullptr || t->numel() != channels) return false;
  out = *t;
  return true;
}

bool floating(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// A Python float or int (not a bool) as a double.
bool real(PyObject* obj, double& out) {
  if (PyBool_Check(obj) || !(PyFloat_Check(obj) || PyLong_Check(obj))) return false;
  out = PyFloat_AsDouble(obj);
  if (out == -1.0 && PyErr_Occurred()) {  // an int too large for a double
    PyErr_Clear();
    return false;
  }
  return true;
}

py::object fast_batch_norm(py::handle input_obj, py::handle mean_obj, py::handle var_obj,
                           py::handle weight_obj, py::handle bias_obj, py::handle training_obj,
                           py::handle momentum_obj, py::handle eps_obj) {
  double momentum = 0, eps = 0;
  if (!PyBool_Check(training_obj.ptr()) || !real(momentum_obj.ptr(), momentum) ||
      !real(eps_obj.ptr(), eps)) {
    return py::none();
  }
  const bool training = training_obj.ptr() == Py_True;
  const Tensor* input = usable(input_obj.ptr());
  if (input == nullptr || !floating(*input) || input->dim() < 2 || input->numel() == 0) {
    return py::none();
  }
  const int64_t channels = input->size(1);
  c10::optional<Tensor> running_mean, running_var, weight, bias;
  if (!per_channel(mean_obj.ptr(), channels, running_mean) ||
      !per_channel(var_obj.ptr(), channels, running_var) ||
      !per_channel(weight_obj.ptr(), channels, weight) ||
      !per_channel(bias_obj.ptr(), channels, bias) ||
      requires_grad(running_mean) || requires_grad(running_var)) {
    return py::none();
  }
  if (training ? !(eps > 0) || input->numel() / channels == 1
               : !(eps >= 0) || !running_mean || !running_var) {
    return py::none();
  }
  Tensor y;
  {
    py::gil_scoped_release no_gil;
    if (training) {
      y = std::get<0>(train_op().call(*input, weight, bias, running_mean, running_var, momentum,
                                      eps));
    } else {
      y = std::get<0>(eval_op().call(*input, weight, bias, *running_mean, *running_var, eps));
    }
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(y)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bnsurgery, m) {
  m.def("cpp_batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
        "Tensor running_var, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("cpp_batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cpp_batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, "
        "Tensor invstd, bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnsurgery, CPU, m) {
  m.impl("cpp_batch_norm_eval", &batch_norm_eval);
  m.impl("cpp_batch_norm_train", &batch_norm_train);
  m.impl("cpp_batch_norm_backward", &batch_norm_backward);
}

TORCH_LIBRARY_IMPL(bnsurgery, Autograd, m) {
  m.impl("cpp_batch_norm_eval", &batch_norm_eval_autograd);
  m.impl("cpp_batch_norm_train", &batch_norm_train_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // A class lives as long as its module, and torch.nn is never unloaded: a borrowed pointer.
  parameter_type = reinterpret_cast<PyTypeObject*>(
      py::module_::import("torch.nn").attr("Parameter").ptr());
  m.def("fast_batch_norm", &fast_batch_norm,
        "batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) "
        "on this kernel when every argument check passes, else None");
}
