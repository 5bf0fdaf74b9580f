// CUDA kernels of the list ops dnr::momentum_stats and dnr::masked_sgd_step_
// (schemas and semantics: csrc/dnr.cpp), in one file to keep the number of slow
// translation units small.
//
// Each op runs over its whole tensor list in one launch, multi_tensor_apply
// style: the host cuts the tensors into segments (chunks or rows) and uploads a
// table of (pointers, length, dtype); block s handles segment s. The table is
// uploaded from a host buffer at every call, so a CUDA graph that captured a call
// would replay stale pointers: the ops are tagged cudagraph_unsafe (csrc/dnr.cpp). Segments may
// have different dtypes: a block switches on its segment's dtype (uniform per
// block, so no divergence). Reductions are deterministic: each block reduces in
// a fixed tree order, and per-layer sums of block partials are added in chunk
// order by a second kernel (no atomics).
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "../multi_tensor.h"

namespace dnr {
namespace {

enum DType : int64_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "dnr: unsupported dtype ", t, " (float32, float64, float16, bfloat16)");
  }
  return kF32;
}

int64_t address(const at::Tensor& t) {
  return reinterpret_cast<int64_t>(t.data_ptr());
}

// Appends one table row per chunk of `chunk` elements of the same-sized tensors:
// each tensor's address at the chunk's first element, the chunk's length, `dtype`.
void append_chunks(std::vector<int64_t>& table, std::initializer_list<const at::Tensor*> tensors,
                   int64_t chunk, int64_t dtype) {
  const int64_t n = (*tensors.begin())->numel();
  for (int64_t start = 0; start < n; start += chunk) {
    for (const at::Tensor* t : tensors) {
      table.push_back(address(*t) + start * t->element_size());
    }
    table.push_back(std::min(chunk, n - start));
    table.push_back(dtype);
  }
}

// The host table as a device tensor: one pinned buffer (from torch's caching
// host allocator, safe to reuse once the copy is done) and an async copy.
at::Tensor upload(const std::vector<int64_t>& table, const at::Device& device) {
  at::Tensor host = at::empty(
      {static_cast<int64_t>(table.size())},
      at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr<int64_t>(), table.data(), table.size() * sizeof(int64_t));
  return host.to(device, /*non_blocking=*/true);
}

// Calls f(T*) with a segment's data pointer cast to its element type.
template <typename F>
__device__ __forceinline__ void with_dtype(int64_t code, int64_t ptr, F&& f) {
  switch (code) {
    case kF32: f(reinterpret_cast<float*>(ptr)); break;
    case kF64: f(reinterpret_cast<double*>(ptr)); break;
    case kF16: f(reinterpret_cast<c10::Half*>(ptr)); break;
    default: f(reinterpret_cast<c10::BFloat16*>(ptr)); break;
  }
}

constexpr int kReduceThreads = 256;

// Sum over the block in a fixed tree order; the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      shared[threadIdx.x] += shared[threadIdx.x + width];
    }
    __syncthreads();
  }
  return shared[0];
}

// One block per table row: the row count as a grid size, checked (gridDim.x is
// at most 2^31 - 1; a silent narrowing would skip rows).
unsigned int grid_size(int64_t rows, const char* op) {
  constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;
  TORCH_CHECK(
      rows >= 0 && rows <= kMaxGrid, "dnr::", op, " (CUDA kernel): ", rows,
      " blocks exceed the CUDA grid limit of ", kMaxGrid, "; split the tensor list");
  return static_cast<unsigned int>(rows);
}

// ------------------------------------------------------------------ momentum_stats

constexpr int64_t kStatsChunk = 16384;  // elements per block
constexpr int kStatsCols = 4;           // table row: values, mask, length, dtype

__global__ void __launch_bounds__(kReduceThreads) masked_abs_sums_kernel(
    const int64_t* __restrict__ table, double* __restrict__ sums,
    long long* __restrict__ counts) {
  __shared__ double shared_sum[kReduceThreads];
  __shared__ long long shared_count[kReduceThreads];
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * kStatsCols;
  const bool* keep = reinterpret_cast<const bool*>(row[1]);
  const int64_t n = row[2];
  double acc = 0.0;
  long long cnt = 0;
  with_dtype(row[3], row[0], [&](auto* v) {
    for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) {
      const bool k = keep[i];
      acc += k ? fabs(static_cast<double>(v[i])) : 0.0;
      cnt += k;
    }
  });
  acc = block_sum(acc, shared_sum);
  cnt = block_sum(cnt, shared_count);
  if (threadIdx.x == 0) {
    sums[blockIdx.x] = acc;
    counts[blockIdx.x] = cnt;
  }
}

// out[l] = (sum of its chunks' sums in chunk order, count): one thread per layer.
__global__ void layer_sums_kernel(
    const double* __restrict__ sums, const long long* __restrict__ counts,
    const int64_t* __restrict__ first_chunk, int64_t num_layers, double* __restrict__ out) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= num_layers) {
    return;
  }
  double s = 0.0;
  long long c = 0;
  for (int64_t k = first_chunk[l]; k < first_chunk[l + 1]; ++k) {
    s += sums[k];
    c += counts[k];
  }
  out[2 * l] = s;
  out[2 * l + 1] = static_cast<double>(c);
}

at::Tensor momentum_stats_cuda(at::TensorList momenta, at::TensorList masks) {
  check_momentum_stats(momenta, masks);
  const int64_t num_layers = static_cast<int64_t>(momenta.size());
  TORCH_CHECK(num_layers > 0 && momenta[0].is_cuda(), "dnr::momentum_stats (CUDA kernel): needs CUDA tensors");
  const at::Device device = momenta[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep_alive;  // contiguous copies live until the kernels ran
  std::vector<int64_t> table, first_chunk{0};
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor v = momenta[l].contiguous();
    const at::Tensor k = masks[l].contiguous();
    keep_alive.push_back(v);
    keep_alive.push_back(k);
    append_chunks(table, {&v, &k}, kStatsChunk, dtype_code(v.scalar_type()));
    first_chunk.push_back(static_cast<int64_t>(table.size()) / kStatsCols);
  }
  const int64_t chunks = first_chunk.back();
  table.insert(table.end(), first_chunk.begin(), first_chunk.end());
  const at::Tensor dev_table = upload(table, device);
  const auto options = at::TensorOptions().device(device);
  at::Tensor sums = at::empty({std::max<int64_t>(chunks, 1)}, options.dtype(at::kDouble));
  at::Tensor counts = at::empty({std::max<int64_t>(chunks, 1)}, options.dtype(at::kLong));
  at::Tensor out = at::empty({num_layers, 2}, options.dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (chunks > 0) {
    masked_abs_sums_kernel<<<grid_size(chunks, "momentum_stats"), kReduceThreads, 0, stream>>>(
        dev_table.const_data_ptr<int64_t>(), sums.data_ptr<double>(),
        reinterpret_cast<long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  constexpr int kThreads = 128;
  layer_sums_kernel<<<grid_size((num_layers + kThreads - 1) / kThreads, "momentum_stats"), kThreads, 0, stream>>>(
      sums.const_data_ptr<double>(),
      reinterpret_cast<const long long*>(counts.const_data_ptr<int64_t>()),
      dev_table.const_data_ptr<int64_t>() + chunks * kStatsCols, num_layers,
      out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------- masked_sgd_step_

// Small chunks: many resident blocks keep enough loads in flight to saturate HBM.
constexpr int64_t kSgdChunk = 16384;  // elements per block
constexpr int kSgdThreads = 256;
constexpr int kSgdCols = 6;  // table row: param, grad, buffer, mask (all at the chunk), length, dtype

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};

// Explicit rounding: no contraction other than the fmas ATen's ops compute.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename scalar_t>
__device__ __forceinline__ void sgd_chunk(
    scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ buf,
    const bool* __restrict__ mask, int64_t n, const SgdArgs& a) {
  using T = at::opmath_type<scalar_t>;
  // Scalars rounded to T as ATen rounds its Scalar arguments.
  const T lr_neg = static_cast<T>(-a.lr), mom = static_cast<T>(a.momentum);
  const T one_minus_damp = static_cast<T>(1.0 - a.dampening), wd = static_cast<T>(a.weight_decay);
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < n; i += kSgdThreads) {
    const T pi = static_cast<T>(p[i]);
    T gi = static_cast<T>(g[i]);
    if (a.weight_decay != 0) {
      gi = fma_rn(wd, pi, gi);
    }
    T d = gi;
    if (a.momentum != 0) {
      const T b = a.first_step ? gi : fma_rn(one_minus_damp, gi, mul_rn(static_cast<T>(buf[i]), mom));
      buf[i] = static_cast<scalar_t>(b);
      d = a.nesterov ? fma_rn(mom, b, gi) : b;
    }
    p[i] = static_cast<scalar_t>(mul_rn(fma_rn(lr_neg, d, pi), mask[i] ? T(1) : T(0)));
  }
}

__global__ void __launch_bounds__(kSgdThreads) masked_sgd_kernel(
    const int64_t* __restrict__ table, SgdArgs args) {
  const int64_t* row = table + static_cast<int64_t>(blockIdx.x) * kSgdCols;
  const int64_t n = row[4];
  const bool* mask = reinterpret_cast<const bool*>(row[3]);
  with_dtype(row[5], row[0], [&](auto* p) {
    using scalar_t = std::remove_pointer_t<decltype(p)>;
    sgd_chunk(p, reinterpret_cast<const scalar_t*>(row[1]), reinterpret_cast<scalar_t*>(row[2]), mask, n, args);
  });
}

void masked_sgd_step_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    at::TensorList masks, double lr, double momentum, double dampening,
    double weight_decay, bool nesterov, bool first_step) {
  check_masked_sgd_step(params, grads, bufs, masks, momentum, dampening, nesterov);
  if (params.empty()) {
    return;
  }
  TORCH_CHECK(params[0].is_cuda(), "dnr::masked_sgd_step_ (CUDA kernel): params[0] is on ", params[0].device());
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  for (size_t i = 0; i < params.size(); ++i) {
    mark_written(params[i]);
    if (momentum != 0) {  // without momentum the buffers are neither read nor written
      mark_written(bufs[i]);
    }
  }
  std::vector<at::Tensor> keep_alive;
  std::vector<int64_t> table;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor g = with_layout_of(grads[i], p);
    const at::Tensor k = with_layout_of(masks[i], p);
    keep_alive.push_back(g);
    keep_alive.push_back(k);
    append_chunks(table, {&p, &g, &bufs[i], &k}, kSgdChunk, dtype_code(p.scalar_type()));
  }
  const int64_t chunks = static_cast<int64_t>(table.size()) / kSgdCols;
  if (chunks == 0) {
    return;
  }
  const at::Tensor dev_table = upload(table, device);
  masked_sgd_kernel<<<grid_size(chunks, "masked_sgd_step_"), kSgdThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dev_table.const_data_ptr<int64_t>(),
      SgdArgs{lr, momentum, dampening, weight_decay, nesterov, first_step});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(dnr, CUDA, m) {
  m.impl("momentum_stats", &momentum_stats_cuda);
  m.impl("masked_sgd_step_", &masked_sgd_step_cuda);
}

}  // namespace dnr
