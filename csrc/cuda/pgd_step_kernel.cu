// CUDA kernel of dnr::pgd_step_ (schema and semantics: csrc/dnr.cpp).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../pgd_step.h"

namespace dnr {
namespace {

// min(max(v, lo), hi), NaN-propagating like the CPU kernel.
template <typename T>
__device__ __forceinline__ T clamp_to(T v, T lo, T hi) {
  const T m = v < lo ? lo : v;
  return m > hi ? hi : m;
}

template <typename scalar_t, typename opmath_t>
__global__ void pgd_step_cuda_kernel(
    scalar_t* __restrict__ delta, scalar_t* __restrict__ x_adv,
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad,
    const opmath_t* __restrict__ eps, int64_t eps_stride,
    const opmath_t* __restrict__ alpha, int64_t alpha_stride, opmath_t lo,
    opmath_t hi, int64_t per_sample, int64_t numel) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  // The sample index costs an integer division per element: skip it when eps and
  // alpha are shared, and divide in 32 bits when the sizes allow (64-bit division
  // is emulated, slow enough to matter in this bandwidth-bound kernel).
  const bool per_sample_scalars = (eps_stride | alpha_stride) != 0;
  const bool small = numel <= static_cast<int64_t>(UINT32_MAX);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < numel; i += step) {
    const int64_t b = !per_sample_scalars
        ? 0
        : small ? static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(per_sample))
                : i / per_sample;
    const opmath_t e = eps[b * eps_stride];
    const opmath_t g = static_cast<opmath_t>(grad[i]);
    // sign(g), 0 for NaN (no step), as torch.sign and the reference compute it.
    const opmath_t s = g > opmath_t(0) ? opmath_t(1) : (g < opmath_t(0) ? opmath_t(-1) : opmath_t(0));
    const opmath_t xi = static_cast<opmath_t>(x[i]);
    const opmath_t d = clamp_to(static_cast<opmath_t>(delta[i]) + alpha[b * alpha_stride] * s, -e, e);
    const scalar_t xa = static_cast<scalar_t>(clamp_to(xi + d, lo, hi));
    x_adv[i] = xa;
    // delta is what x_adv really moved, after rounding to scalar_t.
    delta[i] = static_cast<scalar_t>(static_cast<opmath_t>(xa) - xi);
  }
}

void pgd_step_cuda(
    at::Tensor& delta, at::Tensor& x_adv, const at::Tensor& x,
    const at::Tensor& grad, const at::Tensor& eps, const at::Tensor& alpha,
    double lo, double hi) {
  TORCH_CHECK(delta.is_cuda(), "dnr::pgd_step_ (CUDA kernel): delta is on ", delta.device());
  const c10::cuda::CUDAGuard guard(delta.device());
  const PgdStepInputs in = prepare_pgd_step(delta, x_adv, x, grad, eps, alpha);
  mark_written(delta);
  mark_written(x_adv);
  const int64_t numel = delta.numel();
  if (numel == 0) {
    return;
  }
  constexpr int kThreads = 256;
  // Grid-stride loop: a bounded grid covers any size with 64-bit indices.
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, int64_t{1} << 16);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, delta.scalar_type(), "dnr::pgd_step_", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        pgd_step_cuda_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, stream>>>(
            delta.data_ptr<scalar_t>(), x_adv.data_ptr<scalar_t>(),
            in.x.const_data_ptr<scalar_t>(), in.grad.const_data_ptr<scalar_t>(),
            in.eps.const_data_ptr<opmath_t>(), in.eps.numel() == 1 ? 0 : 1,
            in.alpha.const_data_ptr<opmath_t>(), in.alpha.numel() == 1 ? 0 : 1,
            static_cast<opmath_t>(lo), static_cast<opmath_t>(hi), in.per_sample,
            numel);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(dnr, CUDA, m) {
  m.impl("pgd_step_", &pgd_step_cuda);
}

}  // namespace dnr
