// CPU kernel of dnr::pgd_step_ (schema and semantics: csrc/dnr.cpp).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../pgd_step.h"
#include "cpu_features.h"

namespace dnr {
namespace {

constexpr int64_t kGrainSize = 32768;  // elements per task, as ATen's elementwise ops

// One sample's block [0, n) with one eps/alpha. Branch-free (the sign of a random
// gradient defeats branch prediction) so that the loop vectorises.
template <typename scalar_t, typename opmath_t>
__attribute__((always_inline)) inline void pgd_block(
    scalar_t* __restrict__ delta, scalar_t* __restrict__ x_adv,
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad, opmath_t e,
    opmath_t a, opmath_t lo, opmath_t hi, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t g = static_cast<opmath_t>(grad[i]);
    // sign(g), 0 for NaN (no step), as torch.sign and the reference compute it.
    const opmath_t s = static_cast<opmath_t>(g > opmath_t(0)) - static_cast<opmath_t>(g < opmath_t(0));
    const opmath_t xi = static_cast<opmath_t>(x[i]);
    opmath_t d = static_cast<opmath_t>(delta[i]) + a * s;
    d = d < -e ? -e : d;  // min(max(., -e), e) with NaN passed through
    d = d > e ? e : d;
    opmath_t v = xi + d;
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    const scalar_t xa = static_cast<scalar_t>(v);
    x_adv[i] = xa;
    // delta is what x_adv really moved, after rounding to scalar_t.
    delta[i] = static_cast<scalar_t>(static_cast<opmath_t>(xa) - xi);
  }
}

template <typename scalar_t, typename opmath_t>
void pgd_block_generic(
    scalar_t* delta, scalar_t* x_adv, const scalar_t* x, const scalar_t* grad, opmath_t e,
    opmath_t a, opmath_t lo, opmath_t hi, int64_t n) {
  pgd_block(delta, x_adv, x, grad, e, a, lo, hi, n);
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same loop compiled for AVX2 (8 floats a step), chosen at run time.
template <typename scalar_t, typename opmath_t>
__attribute__((target("avx2,fma,f16c"))) void pgd_block_avx2(
    scalar_t* delta, scalar_t* x_adv, const scalar_t* x, const scalar_t* grad, opmath_t e,
    opmath_t a, opmath_t lo, opmath_t hi, int64_t n) {
  pgd_block(delta, x_adv, x, grad, e, a, lo, hi, n);
}

#endif

template <typename scalar_t>
void pgd_step_kernel(
    scalar_t* delta, scalar_t* x_adv, const scalar_t* x, const scalar_t* grad,
    const at::opmath_type<scalar_t>* eps, int64_t eps_stride,
    const at::opmath_type<scalar_t>* alpha, int64_t alpha_stride,
    at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi,
    int64_t per_sample, int64_t numel) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      // Walk one sample's block at a time so eps/alpha are loaded once per block.
      const int64_t b = i / per_sample;
      const int64_t block_end = std::min(end, (b + 1) * per_sample);
      const opmath_t e = eps[b * eps_stride];
      const opmath_t a = alpha[b * alpha_stride];
#if defined(__x86_64__) && defined(__GNUC__)
      if (cpu_has_avx2_fma_f16c()) {
        pgd_block_avx2(delta + i, x_adv + i, x + i, grad + i, e, a, lo, hi, block_end - i);
        i = block_end;
        continue;
      }
#endif
      pgd_block_generic(delta + i, x_adv + i, x + i, grad + i, e, a, lo, hi, block_end - i);
      i = block_end;
    }
  });
}

void pgd_step_cpu(
    at::Tensor& delta, at::Tensor& x_adv, const at::Tensor& x,
    const at::Tensor& grad, const at::Tensor& eps, const at::Tensor& alpha,
    double lo, double hi) {
  TORCH_CHECK(delta.device().is_cpu(), "dnr::pgd_step_ (CPU kernel): delta is on ", delta.device());
  const PgdStepInputs in = prepare_pgd_step(delta, x_adv, x, grad, eps, alpha);
  mark_written(delta);
  mark_written(x_adv);
  if (delta.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, delta.scalar_type(), "dnr::pgd_step_", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        pgd_step_kernel<scalar_t>(
            delta.data_ptr<scalar_t>(), x_adv.data_ptr<scalar_t>(),
            in.x.const_data_ptr<scalar_t>(), in.grad.const_data_ptr<scalar_t>(),
            in.eps.const_data_ptr<opmath_t>(), in.eps.numel() == 1 ? 0 : 1,
            in.alpha.const_data_ptr<opmath_t>(), in.alpha.numel() == 1 ? 0 : 1,
            static_cast<opmath_t>(lo), static_cast<opmath_t>(hi),
            in.per_sample, delta.numel());
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(dnr, CPU, m) {
  m.impl("pgd_step_", &pgd_step_cpu);
}

}  // namespace dnr
