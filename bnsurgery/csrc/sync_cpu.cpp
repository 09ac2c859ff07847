// bnsurgery's compiled SyncBatchNorm steps for CPU: what bnsurgery/sync_batchnorm.py computes on
// each rank between its collectives, written from scratch (no torch batch-norm call) and
// registered as operators in the `bnsurgery` namespace. The collectives stay in Python, so a
// failing rank is still reported on every rank the way the pure-tensor path reports it.
//
// One training step on one rank, with M the global number of values per channel:
//   cpp_sync_statistics   x -> (S_r, M2_r) per channel, float64: this rank's sum, and its sum of
//                         squared deviations from its own mean (all_gathered, then merged);
//   cpp_sync_normalise    (x, global mean, global variance) -> (y, mean, residual, invstd):
//                         y = (x - mean) * invstd * weight + bias, centred on the global mean
//                         rounded to the accumulation dtype, its rounding residual taken back
//                         out in the shift;
//   cpp_sync_grad_sums    (g, x, mean, residual) -> local sum(g) and sum(g * (x - mean)), float64
//                         (all_reduced);
//   cpp_sync_grad_input   (g, x, ..., global sums, M) -> dL/dx = a * g + b * (x - mean) + c with
//                         a = weight * invstd, b = -a * invstd^2 * sum(g * (x - mean)) / M and
//                         c = -a * sum(g) / M, over the global batch.
//
// Layout and numerics are those of batch_norm_cpu.cpp: every input is read as an (A, C, L) block
// of its memory (contiguous: (N, C, prod(spatial)), one channel is A runs of L values; channels-
// last or 2-D: (rows, C, 1), each row one value of every channel; other strides are made
// contiguous first). Statistics are corrected two-pass sums over chunks that sit in cache, taken
// relative to each channel's first value and merged with Chan's formula in double, so a mean 1e4
// times the spread keeps the variance's digits. float16 / bfloat16 use float arithmetic and are rounded once on the way out.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

using namespace bnsurgery_cpu;  // Block, block_of, ptr_or_null, the work-splitting rules

// A per-channel vector as a contiguous (C,) tensor of `dtype` (no copy when it already is one).
Tensor channel_vector(const Tensor& t, at::ScalarType dtype, int64_t channels, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == channels, "bnsurgery sync kernels: ", name,
              " must be a vector of ", channels, " values (one per channel), got shape ",
              t.sizes());
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.to(dtype).contiguous();
}

Tensor optional_vector(const c10::optional<Tensor>& t, at::ScalarType dtype, int64_t channels,
                       const char* name) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return channel_vector(*t, dtype, channels, name);
}

// --- Statistics ------------------------------------------------------------------------------

// Every value is taken relative to a per-channel shift K (the channel's first value): the chunk
// means that Chan's formula merges are then of the size of the spread, not of the mean, so their
// differences keep their digits in double even when the mean is 1e4 times the spread (merged
// unshifted, a float64 variance would lose four of its sixteen digits there). x - K is exact for
// values within a factor of two of K (Sterbenz), which clustered values are.

// Mean (relative to K) and sum of squared deviations of n contiguous values, by the corrected
// two-pass algorithm: a provisional mean m of x - K (rounded to acc_t), then d = x - K - m, small
// and exact when the values cluster; the mean is m + sum(d) / n and M2 = sum(d^2) - sum(d)^2 / n.
template <typename scalar_t, typename acc_t>
inline void chunk_moments(const scalar_t* __restrict__ p, int64_t n, acc_t shift, double& mean,
                          double& m2) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(p[i]) - shift;
  const acc_t provisional = sum / static_cast<acc_t>(n);
  acc_t sd = 0, sq = 0;
#pragma omp simd reduction(+ : sd, sq)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = (static_cast<acc_t>(p[i]) - shift) - provisional;
    sd += d;
    sq += d * d;
  }
  const double sum_d = sd, sum_sq = sq;
  mean = static_cast<double>(provisional) + sum_d / n;
  m2 = std::max(0.0, sum_sq - sum_d * sum_d / n);
}

// Chan's formula: merge nb values (mean mb, squared deviations m2b) into moments over na values.
inline void merge(double& na, double& mean, double& m2, double nb, double mb, double m2b) {
  const double n = na + nb;
  if (n == 0) return;
  const double delta = mb - mean;
  mean += delta * (nb / n);
  m2 += m2b + delta * delta * (na * nb / n);
  na = n;
}

// Row path: channels [c0, c1), the block read row by row, each channel's runs merged in order.
template <typename scalar_t, typename acc_t>
void row_moments(const scalar_t* x, int64_t A, int64_t C, int64_t L, int64_t c0, int64_t c1,
                 const acc_t* shift, double* mean, double* m2) {
  for (int64_t a = 0; a < A; ++a) {
    const double seen = static_cast<double>(a * L);
    for (int64_t c = c0; c < c1; ++c) {
      double cm, cm2, n = seen;
      chunk_moments<scalar_t, acc_t>(x + (a * C + c) * L, L, shift[c], cm, cm2);
      merge(n, mean[c], m2[c], static_cast<double>(L), cm, cm2);
    }
  }
}

// One block of nb interleaved rows (in L2) merged into a part's moments over `seen` rows: its
// provisional mean (relative to the shift), then the corrected second pass.
template <typename scalar_t, typename acc_t>
void block_moments(const scalar_t* x, int64_t nb, int64_t C, double seen,
                   const acc_t* __restrict__ shift, std::vector<acc_t>& sum,
                   std::vector<acc_t>& sd, std::vector<acc_t>& sq, double* mean, double* m2) {
  std::fill(sum.begin(), sum.end(), acc_t(0));
  std::fill(sd.begin(), sd.end(), acc_t(0));
  std::fill(sq.begin(), sq.end(), acc_t(0));
  acc_t* __restrict__ s = sum.data();
  for (int64_t i = 0; i < nb; ++i) {
    const scalar_t* __restrict__ row = x + i * C;
    for (int64_t c = 0; c < C; ++c) s[c] += static_cast<acc_t>(row[c]) - shift[c];
  }
  const acc_t inv = acc_t(1) / static_cast<acc_t>(nb);
  for (int64_t c = 0; c < C; ++c) s[c] *= inv;  // now the provisional block mean
  acc_t* __restrict__ d = sd.data();
  acc_t* __restrict__ q = sq.data();
  for (int64_t i = 0; i < nb; ++i) {
    const scalar_t* __restrict__ row = x + i * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = (static_cast<acc_t>(row[c]) - shift[c]) - s[c];
      d[c] += v;
      q[c] += v * v;
    }
  }
  const double n = static_cast<double>(nb);
  for (int64_t c = 0; c < C; ++c) {
    const double dc = d[c];
    double na = seen;
    merge(na, mean[c], m2[c], n, static_cast<double>(s[c]) + dc / n,
          std::max(0.0, static_cast<double>(q[c]) - dc * dc / n));
  }
}

// Per-channel mean relative to `shift` (each channel's first value, filled in here) and sum of
// squared deviations, in double, for both layouts.
template <typename scalar_t, typename acc_t>
void moments(const Block& b, std::vector<acc_t>& shift, std::vector<double>& mean,
             std::vector<double>& m2) {
  const int64_t A = b.rows, C = b.channels, L = b.inner;
  const scalar_t* x = b.x.data_ptr<scalar_t>();
  shift.resize(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc_t>(x[c * L]);  // row 0's values
  mean.assign(C, 0.0);
  m2.assign(C, 0.0);
  if (L > 1) {
    const int64_t block = channel_block(A * L, sizeof(scalar_t));
    const int64_t blocks = (C + block - 1) / block;
    at::parallel_for(0, blocks, grain_for(block * A * L), [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        row_moments<scalar_t, acc_t>(x, A, C, L, bi * block, std::min(C, (bi + 1) * block),
                                     shift.data(), mean.data(), m2.data());
      }
    });
    return;
  }
  const int64_t parts = parts_for(A, C);
  const int64_t step = block_rows(C, sizeof(scalar_t));
  std::vector<double> part_n(parts, 0.0), part_mean(parts * C, 0.0), part_m2(parts * C, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(C), sd(C), sq(C);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r0 = A * p / parts, r1 = A * (p + 1) / parts;
      for (int64_t r = r0; r < r1; r += step) {
        const int64_t nb = std::min(step, r1 - r);
        block_moments<scalar_t, acc_t>(x + r * C, nb, C, static_cast<double>(r - r0),
                                       shift.data(), sum, sd, sq, part_mean.data() + p * C,
                                       part_m2.data() + p * C);
      }
      part_n[p] = static_cast<double>(r1 - r0);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0;
    for (int64_t p = 0; p < parts; ++p) {
      merge(n, mean[c], m2[c], part_n[p], part_mean[p * C + c], part_m2[p * C + c]);
    }
  }
}

// --- Per-value maps ----------------------------------------------------------------------------

// out = (x - centre) * scale + shift per channel, for both layouts, rounded once.
template <typename scalar_t, typename acc_t>
void centre_scale_shift(const Block& b, scalar_t* out, const acc_t* centre, const acc_t* scale,
                        const acc_t* shift) {
  const int64_t A = b.rows, C = b.channels, L = b.inner;
  const scalar_t* x = b.x.data_ptr<scalar_t>();
  if (L > 1) {
    at::parallel_for(0, A * C, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t ac = begin; ac < end; ++ac) {
        const int64_t c = ac % C;
        const acc_t m = centre[c], s = scale[c], t = shift[c];
        const scalar_t* __restrict__ in = x + ac * L;
        scalar_t* __restrict__ o = out + ac * L;
        for (int64_t i = 0; i < L; ++i) {
          o[i] = static_cast<scalar_t>((static_cast<acc_t>(in[i]) - m) * s + t);
        }
      }
    });
    return;
  }
  at::parallel_for(0, A, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ in = x + r * C;
      scalar_t* __restrict__ o = out + r * C;
      for (int64_t c = 0; c < C; ++c) {
        o[c] = static_cast<scalar_t>((static_cast<acc_t>(in[c]) - centre[c]) * scale[c] +
                                     shift[c]);
      }
    }
  });
}

// out = a * g + k * (x - centre) + c0 per channel, for both layouts, rounded once.
template <typename scalar_t, typename acc_t>
void gradient_map(const Block& b, const scalar_t* g, scalar_t* out, const acc_t* a,
                  const acc_t* k, const acc_t* centre, const acc_t* c0) {
  const int64_t A = b.rows, C = b.channels, L = b.inner;
  const scalar_t* x = b.x.data_ptr<scalar_t>();
  if (L > 1) {
    at::parallel_for(0, A * C, grain_for(L), [&](int64_t begin, int64_t end) {
      for (int64_t ac = begin; ac < end; ++ac) {
        const int64_t c = ac % C;
        const acc_t av = a[c], kc = k[c], m = centre[c], cc = c0[c];
        const scalar_t* __restrict__ xi = x + ac * L;
        const scalar_t* __restrict__ gi = g + ac * L;
        scalar_t* __restrict__ o = out + ac * L;
        for (int64_t i = 0; i < L; ++i) {
          o[i] = static_cast<scalar_t>(av * static_cast<acc_t>(gi[i]) +
                                       kc * (static_cast<acc_t>(xi[i]) - m) + cc);
        }
      }
    });
    return;
  }
  at::parallel_for(0, A, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ xi = x + r * C;
      const scalar_t* __restrict__ gi = g + r * C;
      scalar_t* __restrict__ o = out + r * C;
      for (int64_t c = 0; c < C; ++c) {
        o[c] = static_cast<scalar_t>(a[c] * static_cast<acc_t>(gi[c]) +
                                     k[c] * (static_cast<acc_t>(xi[c]) - centre[c]) + c0[c]);
      }
    }
  });
}

// --- Gradient sums ---------------------------------------------------------------------------

// sum(g) and sum(g * (x - centre)) per channel (double), chunks summed in acc_t, for both
// layouts.
template <typename scalar_t, typename acc_t>
void gradient_sums(const Block& b, const scalar_t* g, const acc_t* centre,
                   std::vector<double>& sum_g, std::vector<double>& sum_gd) {
  const int64_t A = b.rows, C = b.channels, L = b.inner;
  const scalar_t* x = b.x.data_ptr<scalar_t>();
  sum_g.assign(C, 0.0);
  sum_gd.assign(C, 0.0);
  if (L > 1) {
    const int64_t block = channel_block(A * L, sizeof(scalar_t));
    const int64_t blocks = (C + block - 1) / block;
    at::parallel_for(0, blocks, grain_for(block * A * L), [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        const int64_t first = bi * block, last = std::min(C, first + block);
        for (int64_t r = 0; r < A; ++r) {
          for (int64_t c = first; c < last; ++c) {
            const scalar_t* __restrict__ xi = x + (r * C + c) * L;
            const scalar_t* __restrict__ gi = g + (r * C + c) * L;
            const acc_t m = centre[c];
            acc_t sg = 0, sgd = 0;
#pragma omp simd reduction(+ : sg, sgd)
            for (int64_t i = 0; i < L; ++i) {
              const acc_t gv = static_cast<acc_t>(gi[i]);
              sg += gv;
              sgd += gv * (static_cast<acc_t>(xi[i]) - m);
            }
            sum_g[c] += sg;
            sum_gd[c] += sgd;
          }
        }
      }
    });
    return;
  }
  const int64_t parts = parts_for(A, C);
  const int64_t step = block_rows(C, sizeof(scalar_t));
  std::vector<double> part(2 * parts * C, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> bg(C), bgd(C);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r0 = A * p / parts, r1 = A * (p + 1) / parts;
      double* pg = part.data() + 2 * p * C;
      for (int64_t r = r0; r < r1; r += step) {
        std::fill(bg.begin(), bg.end(), acc_t(0));
        std::fill(bgd.begin(), bgd.end(), acc_t(0));
        acc_t* __restrict__ sg = bg.data();
        acc_t* __restrict__ sgd = bgd.data();
        for (int64_t i = r; i < std::min(r + step, r1); ++i) {
          const scalar_t* __restrict__ xi = x + i * C;
          const scalar_t* __restrict__ gi = g + i * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t gv = static_cast<acc_t>(gi[c]);
            sg[c] += gv;
            sgd[c] += gv * (static_cast<acc_t>(xi[c]) - centre[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          pg[c] += sg[c];
          pg[C + c] += sgd[c];
        }
      }
    }
  });
  for (int64_t p = 0; p < parts; ++p) {  // in order: independent of the thread count
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += part[2 * p * C + c];
      sum_gd[c] += part[2 * p * C + C + c];
    }
  }
}

// --- Operators ---------------------------------------------------------------------------------

// (S_r, M2_r): this rank's per-channel sum and sum of squared deviations from its own mean.
std::tuple<Tensor, Tensor> sync_statistics(const Tensor& input) {
  const Block b = block_of(input);
  const int64_t C = b.channels;
  auto options = input.options().dtype(at::kDouble);
  Tensor sums = at::zeros({C}, options), sq_devs = at::zeros({C}, options);
  if (input.numel() == 0) return {sums, sq_devs};
  const double count = static_cast<double>(input.numel() / C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "bnsurgery_sync_statistics", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> shift;
    std::vector<double> mean, m2;
    moments<scalar_t, acc_t>(b, shift, mean, m2);
    double* s = sums.data_ptr<double>();
    double* q = sq_devs.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      s[c] = (static_cast<double>(shift[c]) + mean[c]) * count;
      q[c] = m2[c];
    }
  });
  return {sums, sq_devs};
}

// y with the global statistics, and what the backward needs: the mean rounded to the
// accumulation dtype (what y is centred on), the residual mean - rounded mean, and invstd.
std::tuple<Tensor, Tensor, Tensor, Tensor> sync_normalise(const Tensor& input,
                                                          const Tensor& mean_in,
                                                          const Tensor& var_in,
                                                          const c10::optional<Tensor>& weight_opt,
                                                          const c10::optional<Tensor>& bias_opt,
                                                          double eps) {
  const Block b = block_of(input);
  const int64_t C = b.channels;
  const auto acc = at::toOpMathType(input.scalar_type());
  const Tensor mean64 = channel_vector(mean_in, at::kDouble, C, "mean");
  const Tensor var64 = channel_vector(var_in, at::kDouble, C, "var");
  const Tensor weight = optional_vector(weight_opt, acc, C, "weight");
  const Tensor bias = optional_vector(bias_opt, acc, C, "bias");
  auto options = input.options().dtype(acc);
  Tensor mean = at::empty({C}, options), residual = at::empty({C}, options);
  Tensor invstd = at::empty({C}, options);
  Tensor y = input.numel() == 0 ? input.clone() : at::empty_like(b.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "bnsurgery_sync_normalise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const double* m64 = mean64.data_ptr<double>();
    const double* v64 = var64.data_ptr<double>();
    const acc_t* w = ptr_or_null<acc_t>(weight);
    const acc_t* bi = ptr_or_null<acc_t>(bias);
    acc_t* m = mean.data_ptr<acc_t>();
    acc_t* r = residual.data_ptr<acc_t>();
    acc_t* is = invstd.data_ptr<acc_t>();
    std::vector<acc_t> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      m[c] = static_cast<acc_t>(m64[c]);
      const double lost = m64[c] - static_cast<double>(m[c]);  // what rounding the mean lost
      r[c] = static_cast<acc_t>(lost);
      is[c] = static_cast<acc_t>(1.0 / std::sqrt(v64[c] + eps));  // 1 / sqrt(var + eps)
      scale[c] = w ? w[c] * is[c] : is[c];
      // y = (x - rounded mean - lost) * scale + bias: the lost part is per channel, in the shift.
      shift[c] = static_cast<acc_t>((bi ? bi[c] : acc_t(0)) - lost * scale[c]);
    }
    if (input.numel() > 0) {
      centre_scale_shift<scalar_t, acc_t>(b, y.data_ptr<scalar_t>(), m, scale.data(),
                                          shift.data());
    }
  });
  return {y, mean, residual, invstd};
}

// This rank's sum(g) and sum(g * (x - mean)) per channel, float64, with mean = the rounded mean
// plus `residual`: sum(g * (x - rounded)) - residual * sum(g), so that a mean far larger than the
// spread does not swamp the second sum with residual * sum(g).
std::tuple<Tensor, Tensor> sync_grad_sums(const Tensor& grad_out, const Tensor& input,
                                          const Tensor& mean_in, const Tensor& residual_in) {
  const Block b = block_of(input);
  const int64_t C = b.channels;
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnsurgery sync kernels: grad_out has shape ",
              grad_out.sizes(), ", the input ", input.sizes());
  const auto acc = at::toOpMathType(input.scalar_type());
  const Tensor mean = channel_vector(mean_in, acc, C, "mean");
  const Tensor residual = channel_vector(residual_in, acc, C, "mean_residual");
  auto options = input.options().dtype(at::kDouble);
  Tensor sum_dy = at::zeros({C}, options), sum_dy_xmu = at::zeros({C}, options);
  if (input.numel() == 0) return {sum_dy, sum_dy_xmu};
  const Tensor g = grad_out.to(input.scalar_type()).contiguous(b.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "bnsurgery_sync_grad_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<double> sum_g, sum_gd;
    gradient_sums<scalar_t, acc_t>(b, g.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), sum_g,
                                   sum_gd);
    const acc_t* r = residual.data_ptr<acc_t>();
    double* sd = sum_dy.data_ptr<double>();
    double* sdx = sum_dy_xmu.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      sd[c] = sum_g[c];
      sdx[c] = sum_gd[c] - static_cast<double>(r[c]) * sum_g[c];
    }
  });
  return {sum_dy, sum_dy_xmu};
}

// dL/dx from the GLOBAL sums over `count` values per channel: a * g + b * (x - mean) + c, where
// x - mean = (x - rounded mean) - residual, whose last term folds into c.
Tensor sync_grad_input(const Tensor& grad_out, const Tensor& input,
                       const c10::optional<Tensor>& weight_opt, const Tensor& mean_in,
                       const Tensor& residual_in, const Tensor& invstd_in,
                       const Tensor& sum_dy_in, const Tensor& sum_dy_xmu_in, int64_t count) {
  const Block b = block_of(input);
  const int64_t C = b.channels;
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "bnsurgery sync kernels: grad_out has shape ",
              grad_out.sizes(), ", the input ", input.sizes());
  TORCH_CHECK(count > 0, "bnsurgery sync kernels: count must be positive, got ", count);
  const auto acc = at::toOpMathType(input.scalar_type());
  const Tensor mean = channel_vector(mean_in, acc, C, "mean");
  const Tensor residual = channel_vector(residual_in, acc, C, "mean_residual");
  const Tensor invstd = channel_vector(invstd_in, acc, C, "invstd");
  const Tensor sum_dy = channel_vector(sum_dy_in, at::kDouble, C, "sum_dy");
  const Tensor sum_dy_xmu = channel_vector(sum_dy_xmu_in, at::kDouble, C, "sum_dy_xmu");
  const Tensor weight = optional_vector(weight_opt, acc, C, "weight");
  if (input.numel() == 0) return at::zeros_like(input);
  const Tensor g = grad_out.to(input.scalar_type()).contiguous(b.format);
  Tensor grad_x = at::empty_like(b.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "bnsurgery_sync_grad_input", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = ptr_or_null<acc_t>(weight);
    const acc_t* is = invstd.data_ptr<acc_t>();
    const acc_t* r = residual.data_ptr<acc_t>();
    const double* sd = sum_dy.data_ptr<double>();
    const double* sdx = sum_dy_xmu.data_ptr<double>();
    const double n = static_cast<double>(count);
    std::vector<acc_t> a(C), k(C), c0(C);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = w ? w[c] * is[c] : is[c];
      const double ac = a[c], isc = is[c];
      const double kc = -ac * isc * isc * (sdx[c] / n);
      k[c] = static_cast<acc_t>(kc);
      c0[c] = static_cast<acc_t>(-ac * (sd[c] / n) - kc * static_cast<double>(r[c]));
    }
    gradient_map<scalar_t, acc_t>(b, g.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                                  a.data(), k.data(), mean.data_ptr<acc_t>(), c0.data());
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bnsurgery, m) {
  m.def("cpp_sync_statistics(Tensor input) -> (Tensor, Tensor)");
  m.def("cpp_sync_normalise(Tensor input, Tensor mean, Tensor var, Tensor? weight, "
        "Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpp_sync_grad_sums(Tensor grad_out, Tensor input, Tensor mean, "
        "Tensor mean_residual) -> (Tensor, Tensor)");
  m.def("cpp_sync_grad_input(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, "
        "Tensor mean_residual, Tensor invstd, Tensor sum_dy, Tensor sum_dy_xmu, int count) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(bnsurgery, CPU, m) {
  m.impl("cpp_sync_statistics", &sync_statistics);
  m.impl("cpp_sync_normalise", &sync_normalise);
  m.impl("cpp_sync_grad_sums", &sync_grad_sums);
  m.impl("cpp_sync_grad_input", &sync_grad_input);
}
