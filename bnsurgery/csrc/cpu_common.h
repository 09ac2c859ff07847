// What bnsurgery's CPU kernels share: how an input is read as an (A, C, L) block of its memory,
// how work is split over threads, and per-channel parameters in the accumulation dtype. Included
// by batch_norm_cpu.cpp, sync_cpu.cpp and moments_cpu.cpp, which are compiled into one library.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace bnsurgery_cpu {

using at::Tensor;

// Values per task below which a thread costs more than it saves: twice torch's own grain
// (32768), since a parallel region waits for its slowest thread. Measured on a (256, 512) input
// at 2 threads: splitting at this size runs the training step in 0.65x the time of one thread;
// a quarter-megavalue threshold (no split there) left it 1.4x slower than torch's kernel.
constexpr int64_t kMinTaskElements = 65536;
// A block of interleaved rows, reduced in two passes while it stays in L2: 128 KB, so a block
// of a wide (256, 512) input holds 64 rows rather than 8, and the per-block merge in double
// (a few operations per channel) is amortised over 64 values, not 8: 0.7x the time.
constexpr int64_t kBlockBytes = 131072;
constexpr int64_t kMaxBlockRows = 64;
// Channels per block on the row path. One channel at a time reads A short stretches of memory (L
// values each) scattered C * L values apart, which the hardware prefetcher cannot follow; a block
// of channels is read row by row, each row of the block one contiguous stretch of (c1 - c0) * L
// values, and its values (about kChannelBlockBytes per tensor) stay in L2 for the next pass.
constexpr int64_t kChannelBlockBytes = 262144;

// --- Layout ----------------------------------------------------------------------------------

struct Block {
  Tensor x;          // the input, dense in the layout below
  int64_t rows;      // A
  int64_t channels;  // C
  int64_t inner;     // L; 1 on the interleaved path
  at::MemoryFormat format;
};

// A contiguous input is (N, C, prod(spatial)) ("row" path); a channels-last one is
// (N * prod(spatial), C, 1) ("interleaved" path); any other strides are made contiguous first.
inline Block block_of(const Tensor& input) {
  TORCH_CHECK(input.dim() >= 2 && input.size(1) > 0,
              "bnsurgery CPU kernels: expected an (N, C, ...) input with C > 0, got shape ",
              input.sizes());
  const int64_t channels = input.size(1);
  const int64_t per_channel = input.numel() / channels;
  if (input.is_contiguous()) {
    const int64_t rows = input.size(0);
    return {input, rows, channels, rows > 0 ? per_channel / rows : 0,
            at::MemoryFormat::Contiguous};
  }
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return {input, per_channel, channels, 1, at::MemoryFormat::ChannelsLast};
  }
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return {input, per_channel, channels, 1, at::MemoryFormat::ChannelsLast3d};
  }
  Tensor dense = input.contiguous();
  const int64_t rows = dense.size(0);
  return {dense, rows, channels, rows > 0 ? per_channel / rows : 0, at::MemoryFormat::Contiguous};
}

// A per-channel parameter as a contiguous tensor of the accumulation dtype (no copy when it
// already is one), or an undefined tensor.
// The check comes first because `to` and `contiguous` are dispatcher calls even when they return
// the tensor itself: tenths of a microsecond each, which small inputs feel.
inline Tensor param(const c10::optional<Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return Tensor();
  if (t->scalar_type() == acc && t->is_contiguous()) return *t;
  return t->to(acc).contiguous();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// --- Work splitting ----------------------------------------------------------------------------

// Grain (items per task) so that each task has at least kMinTaskElements values.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, elements_per_item));
}

// The interleaved path splits rows into `parts` contiguous ranges, one partial result each;
// partials are merged in order, so the result does not depend on scheduling.
inline int64_t parts_for(int64_t rows, int64_t channels) {
  const int64_t by_size = std::max<int64_t>(1, rows * channels / kMinTaskElements);
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()),
                                                 by_size, rows}));
}

// Rows per block: enough to stay in L2, and at most kMaxBlockRows so that each float partial sum
// adds few values before it is merged in double.
inline int64_t block_rows(int64_t channels, int64_t elem_size) {
  const int64_t fit = kBlockBytes / std::max<int64_t>(1, channels * elem_size);
  return std::max<int64_t>(4, std::min<int64_t>(kMaxBlockRows, fit));
}

// Channels per block on the row path (see kChannelBlockBytes).
inline int64_t channel_block(int64_t per_channel, int64_t elem_size) {
  return std::max<int64_t>(1, kChannelBlockBytes / std::max<int64_t>(1, per_channel * elem_size));
}

}  // namespace bnsurgery_cpu
