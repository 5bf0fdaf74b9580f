// CPU kernel of dnr::masked_sgd_step_ (schema and semantics: csrc/dnr.cpp).
// One pass per tensor: weight decay, momentum, update and mask in registers.
// Every multiply-add is an explicit fma, as ATen's own vectorised add(alpha=...)
// computes it, so float32 results equal torch.optim.SGD + mask multiply bit for
// bit; float16/bfloat16 keep float intermediates (rounded once on store).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../multi_tensor.h"
#include "cpu_features.h"

namespace dnr {
namespace {

constexpr int64_t kGrainSize = 32768;

template <typename T>
struct SgdConstants {
  T lr_neg, momentum, one_minus_dampening, weight_decay;
  bool use_momentum, nesterov, first_step, decay;
};

// always_inline: compiled again inside the avx2/fma entry point below.
template <typename scalar_t, typename T>
__attribute__((always_inline)) inline void sgd_range(
    scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
    scalar_t* __restrict__ buf, const bool* __restrict__ mask, int64_t n,
    const SgdConstants<T>& c) {
  for (int64_t i = 0; i < n; ++i) {
    const T pi = static_cast<T>(p[i]);
    T gi = static_cast<T>(g[i]);
    if (c.decay) {
      gi = std::fma(c.weight_decay, pi, gi);  // grad.add(p, alpha=weight_decay)
    }
    T d = gi;
    if (c.use_momentum) {
      // buf.mul_(momentum).add_(g, alpha=1 - dampening): the product is rounded first.
      const T b = c.first_step
          ? gi
          : std::fma(c.one_minus_dampening, gi, static_cast<T>(buf[i]) * c.momentum);
      buf[i] = static_cast<scalar_t>(b);
      d = c.nesterov ? std::fma(c.momentum, b, gi) : b;
    }
    // p.add_(d, alpha=-lr).mul_(mask)
    p[i] = static_cast<scalar_t>(std::fma(c.lr_neg, d, pi) * static_cast<T>(mask[i]));
  }
}

template <typename scalar_t, typename T>
void sgd_range_generic(
    scalar_t* p, const scalar_t* g, scalar_t* buf, const bool* mask, int64_t n,
    const SgdConstants<T>& c) {
  sgd_range(p, g, buf, mask, n, c);
}

#if defined(__x86_64__) && defined(__GNUC__)
// Without -mfma, std::fma is a library call per element; this copy vectorises.
template <typename scalar_t, typename T>
__attribute__((target("avx2,fma,f16c"))) void sgd_range_avx2(
    scalar_t* p, const scalar_t* g, scalar_t* buf, const bool* mask, int64_t n,
    const SgdConstants<T>& c) {
  sgd_range(p, g, buf, mask, n, c);
}

#endif

void masked_sgd_step_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    at::TensorList masks, double lr, double momentum, double dampening,
    double weight_decay, bool nesterov, bool first_step) {
  check_masked_sgd_step(params, grads, bufs, masks, momentum, dampening, nesterov);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(
        params[i].device().is_cpu(), "dnr::masked_sgd_step_ (CPU kernel): params[", i,
        "] is on ", params[i].device());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    mark_written(params[i]);
    if (momentum != 0) {  // without momentum the buffers are neither read nor written
      mark_written(bufs[i]);
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) {
      continue;
    }
    const at::Tensor g = with_layout_of(grads[i], p);
    const at::Tensor k = with_layout_of(masks[i], p);
    at::Tensor buf = bufs[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, p.scalar_type(), "dnr::masked_sgd_step_", [&] {
          using T = at::opmath_type<scalar_t>;
          // Scalars rounded to T as ATen rounds its Scalar arguments.
          const SgdConstants<T> c{
              static_cast<T>(-lr), static_cast<T>(momentum),
              static_cast<T>(1.0 - dampening), static_cast<T>(weight_decay),
              momentum != 0, nesterov, first_step, weight_decay != 0};
          scalar_t* pp = p.data_ptr<scalar_t>();
          const scalar_t* gp = g.const_data_ptr<scalar_t>();
          scalar_t* bp = buf.data_ptr<scalar_t>();
          const bool* kp = k.const_data_ptr<bool>();
          at::parallel_for(0, p.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
            if (cpu_has_avx2_fma_f16c()) {
              sgd_range_avx2(pp + begin, gp + begin, bp + begin, kp + begin, end - begin, c);
              return;
            }
#endif
            sgd_range_generic(pp + begin, gp + begin, bp + begin, kp + begin, end - begin, c);
          });
        });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dnr, CPU, m) {
  m.impl("masked_sgd_step_", &masked_sgd_step_cpu);
}

}  // namespace dnr
