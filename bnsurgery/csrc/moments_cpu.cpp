// Measure-and-normalise for BatchNorm recalibration: one operator, `cpp_batch_norm_measure`, that
// returns a BatchNorm input's exact float64 moments per channel and writes the input normalised
// with them into `out`, as a training-mode forward would hand it on. Written from scratch (no torch batch-norm
// call); compiled into the same library as batch_norm_cpu.cpp, in the same `bnsurgery`
// namespace.
//
// What it computes, per channel c of an input x of shape (N, C, ...):
//   mean[c]   = the mean of every value of the channel, float64;
//   sq_dev[c] = sum((x - mean[c])^2) over the channel, float64;
//   y         = (x - m) / sqrt(v + eps) * weight[c] + bias[c], where m and v are mean[c] and the
//               biased variance sq_dev[c] / count, each ROUNDED to `stats_dtype` (the dtype of
//               the layer's running buffers): what F.batch_norm(x, mean.to(dtype),
//               var.to(dtype), weight, bias, training=False, eps=eps) gives, so the statistics a
//               layer hands on do not depend on which implementation measured them.
//
// Numerics. Values are accumulated in double lanes as d = x - K, K a provisional per-channel
// value (the mean of the first stretch the channel is read in), so sum(d^2) - sum(d)^2 / n does
// not cancel: with K that close to the mean the variance keeps its digits however large the
// mean is next to the spread (E[x^2] - E[x]^2 loses them all). Parts reduced on different
// threads are merged with Chan's formula, in a fixed order.
//
// Memory. On the row path (contiguous NCHW and 3-D / 5-D) a group of channels, a few hundred KB,
// is measured and then normalised while it is still in L2: the input is read from memory once,
// the output written once, as an evaluation-mode BatchNorm does (a single channel larger than
// L2, e.g. batch 64 at 112 x 112, is read twice). While one group is written out the next is
// fetched into L2 (on maps of 64 values and more), so that reading and writing overlap as they
// do in one pass. On the interleaved path (channels-last, and
// 2-D (N, C)) every row holds one value of every channel, so the statistics of any channel need
// the whole input: it is read twice there, as a training-mode forward reads it.
//
// The reductions use GCC / Clang vector types, as the build's flags (-march=native, -fopenmp)
// already assume one of those compilers.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

using namespace bnsurgery_cpu;  // Block, block_of, param, kMinTaskElements

// Bytes of input per group of channels on the row path: small enough to stay in L2 between the
// statistics and the normalisation.
constexpr int64_t kGroupBytes = 262144;
// Channels per group at most: enough for the affine maps' loop to vectorise.
constexpr int64_t kMaxGroupChannels = 64;
// Rows averaged for the provisional per-channel value on the interleaved path.
constexpr int64_t kShiftRows = 64;
// Rows of the interleaved path gathered before they are added to the per-channel sums: the
// sums are loaded and stored once per kRowGroup rows instead of once per row.
constexpr int64_t kRowGroup = 4;

// --- Reductions ----------------------------------------------------------------------------------
// Written with GCC / Clang vector types, which the compiler lowers to the target's registers (one
// AVX-512 register for eight doubles, two AVX2 or four NEON ones): the auto-vectoriser keeps to
// half-width registers on some x86 targets and, for a 4x4 map's 16 values a row, spills its
// accumulators to the stack, which cost more than the arithmetic.

// Passed only between inlined functions of this file, so the ABI note GCC makes for 64-byte
// vectors on targets without AVX-512 does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef double Lanes __attribute__((vector_size(64)));  // eight doubles
typedef float Floats8 __attribute__((vector_size(32)));
constexpr int64_t kWidth = 8;

template <typename scalar_t>
inline Lanes load_lanes(const scalar_t* p) {
  if constexpr (std::is_same<scalar_t, double>::value) {
    Lanes v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else {
#if defined(__AVX512F__)
    // One widening conversion; GCC otherwise converts in four-lane halves and reassembles them,
    // three shuffles per eight values that make the reduction wait on the shuffle port.
    if constexpr (std::is_same<scalar_t, float>::value) {
      return reinterpret_cast<Lanes>(_mm512_cvtps_pd(_mm256_loadu_ps(p)));
    }
#endif
    Floats8 f;
    if constexpr (std::is_same<scalar_t, float>::value) {
      std::memcpy(&f, p, sizeof f);
    } else {
      for (int j = 0; j < kWidth; ++j) f[j] = static_cast<float>(p[j]);
    }
    return __builtin_convertvector(f, Lanes);
  }
}

// a = x - shift over the first n < kWidth values at p, zero in the other lanes. A masked load
// where the target has one; otherwise through a zeroed buffer (writing the lanes of a vector one
// by one goes through the stack and stalls the load that follows, about as long as a short map
// takes to reduce).
template <typename scalar_t>
inline Lanes partial_lanes(const scalar_t* p, int64_t n, double shift) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  const __mmask8 mask = static_cast<__mmask8>((1u << n) - 1);
  if constexpr (std::is_same<scalar_t, float>::value) {
    const __m512d v = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mask, p));
    return reinterpret_cast<Lanes>(_mm512_maskz_sub_pd(mask, v, _mm512_set1_pd(shift)));
  } else if constexpr (std::is_same<scalar_t, double>::value) {
    const __m512d v = _mm512_maskz_loadu_pd(mask, p);
    return reinterpret_cast<Lanes>(_mm512_maskz_sub_pd(mask, v, _mm512_set1_pd(shift)));
  }
#endif
  scalar_t buffer[kWidth];
  for (int j = 0; j < kWidth; ++j) buffer[j] = j < n ? p[j] : scalar_t(0);
  Lanes keep;
  for (int j = 0; j < kWidth; ++j) keep[j] = j < n ? 1.0 : 0.0;
  return (load_lanes(buffer) - shift) * keep;
}

// The sum of the eight lanes, as a tree (a chain of seven dependent adds is slower).
inline double lane_sum(Lanes v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

// Running sums of d and d^2 in eight independent vector accumulators, so that the adds do not
// wait on each other (an add's latency is four times its throughput); summed across lanes once,
// at the end of a channel.
struct Sums {
  Lanes d[4] = {}, q[4] = {};

  double sum_d() const { return lane_sum((d[0] + d[1]) + (d[2] + d[3])); }
  double sum_sq() const { return lane_sum((q[0] + q[1]) + (q[2] + q[3])); }
};

// Adds d = x - shift and d^2 over n contiguous values to `s`.
template <typename scalar_t>
inline void shifted_sums(const scalar_t* __restrict__ p, int64_t n, double shift, Sums& s) {
  int64_t i = 0;
  for (; i + 4 * kWidth <= n; i += 4 * kWidth) {
    for (int k = 0; k < 4; ++k) {
      const Lanes a = load_lanes(p + i + k * kWidth) - shift;
      s.d[k] += a;
      s.q[k] += a * a;
    }
  }
  for (int k = 0; i + kWidth <= n; i += kWidth, ++k) {
    const Lanes a = load_lanes(p + i) - shift;
    s.d[k] += a;
    s.q[k] += a * a;
  }
  if (i < n) {
    const Lanes a = partial_lanes(p + i, n - i, shift);
    s.d[3] += a;
    s.q[3] += a * a;
  }
}

// Chan's formula: merge `nb` values (mean mb, squared deviations m2b) into `na` values.
inline void merge(double& na, double& mean, double& m2, double nb, double mb, double m2b) {
  if (nb == 0) return;
  const double n = na + nb;
  const double delta = mb - mean;
  mean += delta * (nb / n);
  m2 += m2b + delta * delta * (na * nb / n);
  na = n;
}

// --- Normalisation constants ----------------------------------------------------------------------

struct Options {
  at::ScalarType stats_dtype;
  double eps;
};

// `values` rounded to `dtype` and back in place, as Tensor.to(dtype) rounds them (half and
// bfloat16 through float, as c10's conversions go). The switch is outside the loops so that they
// vectorise.
void round_in_place(double* values, int64_t n, at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return;
    case at::kFloat:
      for (int64_t i = 0; i < n; ++i) values[i] = static_cast<float>(values[i]);
      return;
    case at::kHalf:
      for (int64_t i = 0; i < n; ++i) {
        values[i] = static_cast<float>(c10::Half(static_cast<float>(values[i])));
      }
      return;
    case at::kBFloat16:
      for (int64_t i = 0; i < n; ++i) {
        values[i] = static_cast<float>(c10::BFloat16(static_cast<float>(values[i])));
      }
      return;
    default:
      TORCH_CHECK(false, "cpp_batch_norm_measure: stats_dtype must be a float dtype, got ", dtype);
  }
}

// The per-channel affine map y = (x - centre) * scale + shift that normalises with the statistics
// rounded to `stats_dtype`, for channels [c0, c1). `centre` is that mean in the arithmetic dtype;
// what rounding to it loses (only when stats_dtype is wider) goes back in through the shift.
// Centring first, rather than folding the mean into the shift, keeps x - centre exact when the
// mean is large next to the spread. `work` holds 2 * (c1 - c0) doubles.
template <typename acc_t>
void affine_maps(int64_t c0, int64_t c1, const double* mean, const double* sq_dev, double count,
                 Options o, const acc_t* weight, const acc_t* bias, double* work, acc_t* centre,
                 acc_t* scale, acc_t* shift) {
  const int64_t n = c1 - c0;
  double* m = work;
  double* v = work + n;
  for (int64_t k = 0; k < n; ++k) {
    m[k] = mean[c0 + k];
    v[k] = sq_dev[c0 + k] / count;
  }
  round_in_place(m, n, o.stats_dtype);
  round_in_place(v, n, o.stats_dtype);
  for (int64_t k = 0; k < n; ++k) {
    const acc_t invstd = static_cast<acc_t>(1.0 / std::sqrt(v[k] + o.eps));
    const acc_t sc = weight ? weight[c0 + k] * invstd : invstd;
    const acc_t ce = static_cast<acc_t>(m[k]);
    const double residual = m[k] - static_cast<double>(ce);
    centre[c0 + k] = ce;
    scale[c0 + k] = sc;
    shift[c0 + k] = static_cast<acc_t>((bias ? bias[c0 + k] : acc_t(0)) - residual * sc);
  }
}

// --- Row path: a group of channels measured, then normalised from cache ----------------------
// A channel is A stretches of L contiguous values, C * L values apart, and the stretches of a
// group of channels in one row are one contiguous run of (c1 - c0) * L values. The group is read
// row by row, as memory lies (one channel at a time would start A new streams per channel, each
// a few KB, which the hardware prefetcher takes a while to follow), each channel's sums kept in
// its own accumulators; then the group's affine maps are computed together (their square roots
// and divisions vectorise); then the group is normalised, row by row again, while its values
// are still in L2.

// One channel's running sums of d = x - shift and d^2, eight double lanes each.
struct ChannelSums {
  Lanes d = {}, q = {};
};

// Adds d = x - shift and d^2 over n contiguous values into `acc`. A long stretch goes through
// shifted_sums' eight independent accumulators; a short one (a small map: 4 x 4, 7 x 7) adds
// straight into the channel's own two.
template <typename scalar_t>
inline void add_stretch(const scalar_t* __restrict__ p, int64_t n, double shift,
                        ChannelSums& acc) {
  if (n >= 4 * kWidth) {
    Sums s;
    shifted_sums(p, n, shift, s);
    acc.d += (s.d[0] + s.d[1]) + (s.d[2] + s.d[3]);
    acc.q += (s.q[0] + s.q[1]) + (s.q[2] + s.q[3]);
    return;
  }
  Lanes d = acc.d, q = acc.q;
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    const Lanes a = load_lanes(p + i) - shift;
    d += a;
    q += a * a;
  }
  if (i < n) {
    const Lanes a = partial_lanes(p + i, n - i, shift);
    d += a;
    q += a * a;
  }
  acc.d = d;
  acc.q = q;
}

// Maps of fewer values than this are normalised through per-value tables (below).
constexpr int64_t kShortInner = 64;

// What every group of one input shares.
template <typename scalar_t, typename acc_t>
struct RowJob {
  const scalar_t* x;
  int64_t rows, inner, stride;  // A, L, C * L
  scalar_t* out;
  const acc_t* weight;
  const acc_t* bias;
  Options o;
  double* mean;
  double* sq_dev;
  acc_t* centre;
  acc_t* scale;
  acc_t* shift;
};

// One thread's scratch space, reused from group to group.
template <typename acc_t>
struct Scratch {
  std::vector<ChannelSums> sums;
  std::vector<double> shifts, work;
  std::vector<acc_t> table;
};

// Values of one cache line.
template <typename scalar_t>
constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));

// out = (in - centre) * scale + shift, rounded once, one cache line at a time, asking with each for a line of `ahead` (the next
// group's values at the same place in the row) to be brought into L2: while this group is
// written out the next one comes in, and its statistics are then read from L2 rather than from
// memory. Without it the two steps take turns, the read of one group waiting on memory alone,
// where an evaluation kernel reads and writes at once.
template <typename scalar_t, typename acc_t>
inline void apply_affine_ahead(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                               int64_t n, acc_t centre, acc_t scale, acc_t shift,
                               const scalar_t* ahead, int64_t ahead_n) {
  constexpr int64_t line = kLine<scalar_t>;
  int64_t i = 0;
  for (; i + line <= n; i += line) {
    if (i < ahead_n) __builtin_prefetch(ahead + i, 0, 2);
#pragma omp simd
    for (int64_t t = 0; t < line; ++t) {
      out[i + t] =
          static_cast<scalar_t>((static_cast<acc_t>(in[i + t]) - centre) * scale + shift);
    }
  }
  for (; i < n; ++i) {
    out[i] = static_cast<scalar_t>((static_cast<acc_t>(in[i]) - centre) * scale + shift);
  }
}

// Measures channels [c0, c1) and normalises them, bringing the next `ahead` channels' values
// into L2 as it writes (0: the last group of this thread).
template <typename scalar_t, typename acc_t>
void measure_group(const RowJob<scalar_t, acc_t>& j, int64_t c0, int64_t c1, int64_t ahead,
                   Scratch<acc_t>& s) {
  const int64_t A = j.rows, L = j.inner, stride = j.stride, G = c1 - c0;
  const scalar_t* x = j.x + c0 * L;
  s.sums.assign(G, ChannelSums{});
  s.shifts.resize(G);
  // Row 0: each channel's provisional value is the mean of its first stretch (still in L1
  // when it is added in).
  for (int64_t k = 0; k < G; ++k) {
    Sums first;
    shifted_sums(x + k * L, L, 0.0, first);
    s.shifts[k] = first.sum_d() / static_cast<double>(L);
    add_stretch(x + k * L, L, s.shifts[k], s.sums[k]);
  }
  for (int64_t a = 1; a < A; ++a) {
    const scalar_t* row = x + a * stride;
    for (int64_t k = 0; k < G; ++k) add_stretch(row + k * L, L, s.shifts[k], s.sums[k]);
  }
  const double n = static_cast<double>(A * L);
  for (int64_t k = 0; k < G; ++k) {
    const double sum_d = lane_sum(s.sums[k].d), sum_sq = lane_sum(s.sums[k].q);
    j.mean[c0 + k] = s.shifts[k] + sum_d / n;
    j.sq_dev[c0 + k] = std::max(0.0, sum_sq - sum_d * sum_d / n);
  }
  s.work.resize(2 * G);
  affine_maps<acc_t>(c0, c1, j.mean, j.sq_dev, n, j.o, j.weight, j.bias, s.work.data(),
                     j.centre, j.scale, j.shift);
  scalar_t* out = j.out + c0 * L;
  if (L >= kShortInner) {
    // In each row the next group's values start where this group's end, G * L further on.
    for (int64_t a = 0; a < A; ++a) {
      for (int64_t k = 0; k < G; ++k) {
        const int64_t off = a * stride + k * L;
        apply_affine_ahead<scalar_t, acc_t>(x + off, out + off, L, j.centre[c0 + k],
                                            j.scale[c0 + k], j.shift[c0 + k], x + off + G * L,
                                            std::max<int64_t>(0, (ahead - k) * L));
      }
    }
    return;
  }
  // A short map: the group's maps written out once per value of a row, so that each row is one
  // vectorised loop over G * L values rather than G loops of a few values each.
  const int64_t width = G * L;
  s.table.resize(3 * width);
  acc_t* __restrict__ ce = s.table.data();
  acc_t* __restrict__ sc = ce + width;
  acc_t* __restrict__ sh = sc + width;
  for (int64_t k = 0; k < G; ++k) {
    std::fill_n(ce + k * L, L, j.centre[c0 + k]);
    std::fill_n(sc + k * L, L, j.scale[c0 + k]);
    std::fill_n(sh + k * L, L, j.shift[c0 + k]);
  }
  for (int64_t a = 0; a < A; ++a) {
    const scalar_t* __restrict__ in = x + a * stride;
    scalar_t* __restrict__ dst = out + a * stride;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      dst[i] = static_cast<scalar_t>((static_cast<acc_t>(in[i]) - ce[i]) * sc[i] + sh[i]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void measure_rows(const Block& l, Tensor& y, const acc_t* weight, const acc_t* bias, Options o,
                  double* mean, double* sq_dev) {
  const int64_t C = l.channels, per_channel = l.rows * l.inner;
  const int64_t bytes = per_channel * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t group = std::clamp<int64_t>(kGroupBytes / std::max<int64_t>(1, bytes), 1,
                                            kMaxGroupChannels);
  const int64_t groups = (C + group - 1) / group;
  const int64_t grain =
      std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, group * per_channel));
  std::vector<acc_t> maps(3 * C);
  const RowJob<scalar_t, acc_t> job{l.x.data_ptr<scalar_t>(), l.rows, l.inner, C * l.inner,
                                    y.data_ptr<scalar_t>(), weight, bias, o, mean, sq_dev,
                                    maps.data(), maps.data() + C, maps.data() + 2 * C};
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t c1 = std::min(C, (g + 1) * group);
      const int64_t ahead = g + 1 < end ? std::min(C, (g + 2) * group) - c1 : 0;
      measure_group<scalar_t, acc_t>(job, g * group, c1, ahead, scratch);
    }
  });
}

// --- Interleaved path: parts of rows measured in parallel, merged, then normalised --------------

// Moments of rows [r0, r1) into part_mean / part_m2 (C each), shifted by the mean of its first
// kShiftRows rows. `sums` is scratch space.
template <typename scalar_t>
void part_moments(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, double* part_mean,
                  double* part_m2, std::vector<double>& sums) {
  sums.assign(3 * C, 0.0);
  double* __restrict__ sd = sums.data();
  double* __restrict__ sq = sd + C;
  double* __restrict__ shift = sq + C;
  const int64_t head = std::min(kShiftRows, r1 - r0);
  for (int64_t r = r0; r < r0 + head; ++r) {
    const scalar_t* __restrict__ row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) shift[c] += static_cast<double>(row[c]);
  }
  for (int64_t c = 0; c < C; ++c) shift[c] /= static_cast<double>(head);
  int64_t r = r0;
  for (; r + kRowGroup <= r1; r += kRowGroup) {
    const scalar_t* __restrict__ p = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double d0 = static_cast<double>(p[c]) - shift[c];
      const double d1 = static_cast<double>(p[C + c]) - shift[c];
      const double d2 = static_cast<double>(p[2 * C + c]) - shift[c];
      const double d3 = static_cast<double>(p[3 * C + c]) - shift[c];
      sd[c] += (d0 + d1) + (d2 + d3);
      sq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; r < r1; ++r) {
    const scalar_t* __restrict__ row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(row[c]) - shift[c];
      sd[c] += d;
      sq[c] += d * d;
    }
  }
  const double n = static_cast<double>(r1 - r0);
  for (int64_t c = 0; c < C; ++c) {
    part_mean[c] = shift[c] + sd[c] / n;
    part_m2[c] = std::max(0.0, sq[c] - sd[c] * sd[c] / n);
  }
}

template <typename scalar_t, typename acc_t>
void measure_interleaved(const Block& l, Tensor& y, const acc_t* weight, const acc_t* bias,
                         Options o, double* mean, double* sq_dev) {
  const int64_t R = l.rows, C = l.channels;
  const scalar_t* x = l.x.data_ptr<scalar_t>();
  const int64_t by_size = std::max<int64_t>(1, R * C / kMinTaskElements);
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), by_size, R}));
  std::vector<double> part_mean(parts * C), part_m2(parts * C);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sums;
    for (int64_t p = begin; p < end; ++p) {
      part_moments<scalar_t>(x, C, R * p / parts, R * (p + 1) / parts, part_mean.data() + p * C,
                             part_m2.data() + p * C, sums);
    }
  });
  std::vector<acc_t> centre(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, m = 0, m2 = 0;
    for (int64_t p = 0; p < parts; ++p) {
      merge(n, m, m2, static_cast<double>(R * (p + 1) / parts - R * p / parts),
            part_mean[p * C + c], part_m2[p * C + c]);
    }
    mean[c] = m;
    sq_dev[c] = m2;
  }
  std::vector<double> work(2 * C);
  affine_maps<acc_t>(0, C, mean, sq_dev, static_cast<double>(R), o, weight, bias, work.data(),
                     centre.data(), scale.data(), shift.data());
  scalar_t* out = y.data_ptr<scalar_t>();
  const acc_t* __restrict__ ce = centre.data();
  const acc_t* __restrict__ sc = scale.data();
  const acc_t* __restrict__ sh = shift.data();
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / C);
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ row = x + r * C;
      scalar_t* __restrict__ dst = out + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        dst[c] = static_cast<scalar_t>((static_cast<acc_t>(row[c]) - ce[c]) * sc[c] + sh[c]);
      }
    }
  });
}

// --- Operator ------------------------------------------------------------------------------------

// Writes the normalised input into `out`, which the caller allocates in the layout the kernel
// writes (the input's own when it is dense, contiguous or channels-last; contiguous otherwise),
// so that recalibration can hand a layer the buffer it wrote last batch once nothing else holds
// it. `out` shares no memory with `input` (the loops read and write through restrict pointers).
std::tuple<Tensor, Tensor> batch_norm_measure(const Tensor& input,
                                              const c10::optional<Tensor>& weight_opt,
                                              const c10::optional<Tensor>& bias_opt,
                                              at::ScalarType stats_dtype, double eps,
                                              Tensor& out) {
  TORCH_CHECK(input.dim() >= 2, "cpp_batch_norm_measure: the input needs a batch and a channel "
              "axis (N, C, ...), got ", input.dim(), " dimension(s)");
  TORCH_CHECK(at::isFloatingType(stats_dtype), "cpp_batch_norm_measure: stats_dtype must be a "
              "float dtype, got ", stats_dtype);
  const int64_t C = input.size(1);
  for (const auto* t : {&weight_opt, &bias_opt}) {
    TORCH_CHECK(!t->has_value() || !(*t)->defined() || (*t)->numel() == C,
                "cpp_batch_norm_measure: weight and bias need one value per channel (", C,
                "), got ", (*t)->numel());
  }
  TORCH_CHECK(out.sizes() == input.sizes() && out.scalar_type() == input.scalar_type() &&
              out.device() == input.device(), "cpp_batch_norm_measure: out must have the "
              "input's shape, dtype and device, got ", out.sizes(), " ", out.scalar_type(),
              " for ", input.sizes(), " ", input.scalar_type());
  auto stats_options = input.options().dtype(at::kDouble);
  if (input.numel() == 0) return {at::zeros({C}, stats_options), at::zeros({C}, stats_options)};
  // Every channel's entry is written by either path.
  Tensor mean = at::empty({C}, stats_options), sq_dev = at::empty({C}, stats_options);
  const Block l = block_of(input);
  TORCH_CHECK(out.is_contiguous(l.format), "cpp_batch_norm_measure: out must be dense in the "
              "layout the kernel writes (", l.format, "), got strides ", out.strides());
  at::assert_no_overlap(out, l.x);
  const auto acc = at::toOpMathType(input.scalar_type());
  Tensor weight = param(weight_opt, acc), bias = param(bias_opt, acc);
  Tensor& y = out;
  const Options o{stats_dtype, eps};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "bnsurgery_batch_norm_measure", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = ptr_or_null<acc_t>(weight);
    const acc_t* b = ptr_or_null<acc_t>(bias);
    if (l.inner > 1) {
      measure_rows<scalar_t, acc_t>(l, y, w, b, o, mean.data_ptr<double>(),
                                    sq_dev.data_ptr<double>());
    } else {
      measure_interleaved<scalar_t, acc_t>(l, y, w, b, o, mean.data_ptr<double>(),
                                           sq_dev.data_ptr<double>());
    }
  });
  return {mean, sq_dev};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bnsurgery, m) {
  m.def("cpp_batch_norm_measure(Tensor input, Tensor? weight, Tensor? bias, "
        "ScalarType stats_dtype, float eps, Tensor(a!) out) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnsurgery, CPU, m) {
  m.impl("cpp_batch_norm_measure", &batch_norm_measure);
}
