// CPU kernel of dnr::momentum_stats (schema and semantics: csrc/dnr.cpp).
// Deterministic: every tensor is cut into fixed chunks, each chunk is summed in
// a fixed order in double, and the chunk sums are added in chunk order, so the
// result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../multi_tensor.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace dnr {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kLanes = 8;  // independent accumulators: a fixed order that still pipelines

struct ChunkSum {
  double abs_sum = 0.0;
  int64_t count = 0;
};

template <typename scalar_t>
__attribute__((always_inline)) inline ChunkSum sum_chunk_impl(const scalar_t* v, const bool* keep, int64_t n) {
  double acc[kLanes] = {};
  int64_t cnt[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const bool k = keep[i + j];
      acc[j] += k ? std::abs(static_cast<double>(v[i + j])) : 0.0;
      cnt[j] += k;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const bool k = keep[i];
    acc[j] += k ? std::abs(static_cast<double>(v[i])) : 0.0;
    cnt[j] += k;
  }
  ChunkSum out;
  for (int j = 0; j < kLanes; ++j) {
    out.abs_sum += acc[j];
    out.count += cnt[j];
  }
  return out;
}

template <typename scalar_t>
ChunkSum sum_chunk_generic(const scalar_t* v, const bool* keep, int64_t n) {
  return sum_chunk_impl(v, keep, n);
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same loops compiled for AVX2 and chosen at run time. The lanes keep their
// order, so both copies give bit-identical sums.
template <typename scalar_t>
__attribute__((target("avx2,f16c"))) ChunkSum sum_chunk_avx2(const scalar_t* v, const bool* keep, int64_t n) {
  return sum_chunk_impl(v, keep, n);
}

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

template <typename scalar_t>
ChunkSum sum_chunk(const scalar_t* v, const bool* keep, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2()) {
    return sum_chunk_avx2(v, keep, n);
  }
#endif
  return sum_chunk_generic(v, keep, n);
}

at::Tensor momentum_stats_cpu(at::TensorList momenta, at::TensorList masks) {
  check_momentum_stats(momenta, masks);
  const int64_t num_layers = static_cast<int64_t>(momenta.size());
  std::vector<at::Tensor> values(num_layers), keeps(num_layers);
  std::vector<int64_t> first_chunk(num_layers + 1, 0);
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor& m = momenta[l];
    const at::Tensor& k = masks[l];
    TORCH_CHECK(
        m.device().is_cpu(), "dnr::momentum_stats (CPU kernel): momenta[", l,
        "] is on ", m.device());
    values[l] = m.contiguous();
    keeps[l] = k.contiguous();
    first_chunk[l + 1] = first_chunk[l] + (m.numel() + kChunk - 1) / kChunk;
  }

  // Stage 1: one parallel pass over the chunks of all layers.
  std::vector<ChunkSum> partial(first_chunk[num_layers]);
  at::parallel_for(0, first_chunk[num_layers], 1, [&](int64_t begin, int64_t end) {
    int64_t l = 0;
    for (int64_t c = begin; c < end; ++c) {
      while (first_chunk[l + 1] <= c) {
        ++l;
      }
      const int64_t start = (c - first_chunk[l]) * kChunk;
      const int64_t n = std::min(kChunk, values[l].numel() - start);
      const bool* keep = keeps[l].const_data_ptr<bool>() + start;
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, values[l].scalar_type(), "dnr::momentum_stats", [&] {
            partial[c] = sum_chunk(values[l].const_data_ptr<scalar_t>() + start, keep, n);
          });
    }
  });

  // Stage 2: chunk sums in chunk order.
  at::Tensor out = at::empty({num_layers, 2}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t l = 0; l < num_layers; ++l) {
    double abs_sum = 0.0;
    int64_t count = 0;
    for (int64_t c = first_chunk[l]; c < first_chunk[l + 1]; ++c) {
      abs_sum += partial[c].abs_sum;
      count += partial[c].count;
    }
    o[2 * l] = abs_sum;
    o[2 * l + 1] = static_cast<double>(count);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dnr, CPU, m) {
  m.impl("momentum_stats", &momentum_stats_cpu);
}

}  // namespace dnr
