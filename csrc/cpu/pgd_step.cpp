// CPU kernel of dnr::pgd_step_ (schema and semantics: csrc/dnr.cpp).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../pgd_step.h"

namespace dnr {
namespace {

constexpr int64_t kGrainSize = 32768;  // elements per task, as ATen's elementwise ops

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
      for (; i < block_end; ++i) {
        const opmath_t g = static_cast<opmath_t>(grad[i]);
        const opmath_t s = g > opmath_t(0) ? opmath_t(1) : (g < opmath_t(0) ? opmath_t(-1) : opmath_t(0));
        const opmath_t xi = static_cast<opmath_t>(x[i]);
        const opmath_t d = std::min(std::max(static_cast<opmath_t>(delta[i]) + a * s, -e), e);
        const scalar_t xa = static_cast<scalar_t>(std::min(std::max(xi + d, lo), hi));
        x_adv[i] = xa;
        // delta is what x_adv really moved, after rounding to scalar_t.
        delta[i] = static_cast<scalar_t>(static_cast<opmath_t>(xa) - xi);
      }
    }
  });
}

void pgd_step_cpu(
    at::Tensor& delta, at::Tensor& x_adv, const at::Tensor& x,
    const at::Tensor& grad, const at::Tensor& eps, const at::Tensor& alpha,
    double lo, double hi) {
  TORCH_CHECK(delta.device().is_cpu(), "dnr::pgd_step_ (CPU kernel): delta is on ", delta.device());
  const PgdStepInputs in = prepare_pgd_step(delta, x_adv, x, grad, eps, alpha);
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
