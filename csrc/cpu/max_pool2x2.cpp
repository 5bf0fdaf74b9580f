// CPU kernels of dnr::max_pool2x2 and dnr::max_pool2x2_backward (schemas and
// semantics: csrc/dnr.cpp).
//
// Why: ATen's CPU max_pool2d on NCHW tensors walks every window with generic
// scalar code (any kernel size, stride, padding, dilation) and writes int64
// argmax indices; on one core it was about a quarter of a wide_cnn PGD-7
// training step. For the 2x2 / stride-2 window of dnr's CNNs both passes sweep
// pairs of input rows: in float32 with AVX2, branch-free, 8 windows a step; in
// other dtypes (or without AVX2) with a plain loop. No indices are stored: the
// backward recomputes each window's argmax from the input with the same rule.
//
// The argmax rule is ATen's (aten/src/ATen/native/cpu/MaxPoolKernel.cpp,
// cpu_max_pool): scan the window row by row, take a value when it is greater
// than the running maximum or NaN. So the first maximum wins a tie, the last
// NaN wins, an all -inf window points at its first element, and the gradient
// (0 + grad_output at the argmax, 0 elsewhere) is bit for bit what
// max_pool2d_with_indices_backward computes, -0.0 included.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "cpu_features.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace dnr {
namespace {

constexpr int64_t kGrainSize = 32768;  // input elements per task, as ATen's elementwise ops

// Output row of wo windows from input rows r0, r1: out[j] = the window's maximum, by the
// rule above (v != v is isnan without a call). Any dtype; the float32 case has the AVX2
// version below.
template <typename scalar_t>
void forward_row(const scalar_t* __restrict__ r0, const scalar_t* __restrict__ r1, scalar_t* __restrict__ out,
                 int64_t wo) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < wo; ++j) {
    opmath_t m = r0[2 * j];
    const opmath_t b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
    m = (b > m) | (b != b) ? b : m;
    m = (c > m) | (c != c) ? c : m;
    m = (d > m) | (d != d) ? d : m;
    out[j] = static_cast<scalar_t>(m);
  }
}

// The gradient of a row of windows: each window's four elements (rows g0, g1) get
// 0 + grad_out at the window's argmax (ATen accumulates into zeros: -0.0 becomes +0.0)
// and 0 elsewhere.
template <typename scalar_t>
void backward_row(const scalar_t* __restrict__ r0, const scalar_t* __restrict__ r1,
                  const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ g0, scalar_t* __restrict__ g1,
                  int64_t wo) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t zero = 0;
  for (int64_t j = 0; j < wo; ++j) {
    opmath_t m = r0[2 * j];
    int k = 0;
    const opmath_t b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
    if ((b > m) | (b != b)) {
      m = b;
      k = 1;
    }
    if ((c > m) | (c != c)) {
      m = c;
      k = 2;
    }
    if ((d > m) | (d != d)) {
      k = 3;
    }
    const opmath_t g = zero + static_cast<opmath_t>(grad_out[j]);
    g0[2 * j] = static_cast<scalar_t>(k == 0 ? g : zero);
    g0[2 * j + 1] = static_cast<scalar_t>(k == 1 ? g : zero);
    g1[2 * j] = static_cast<scalar_t>(k == 2 ? g : zero);
    g1[2 * j + 1] = static_cast<scalar_t>(k == 3 ? g : zero);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// float32 with AVX2 intrinsics: the rows of dnr's CNNs are short (14, 7, 3 windows), too
// short for GCC's vectorised loops, whose scalar remainders then take most windows. Here
// a row is covered by blocks of 8 windows (4 for rows of 4-7) whose last block ends at
// the row's end, overlapping the one before: it rewrites the same values, which both
// passes allow (each output depends on its own window only). Rows under 4 windows use
// masked loads and stores.
#define DNR_AVX2 __attribute__((target("avx2,fma,f16c")))

// isnan(v) | (v > m): take v as the new maximum (the rule above), as a lane mask
DNR_AVX2 inline __m256 take8(__m256 v, __m256 m) {
  return _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
DNR_AVX2 inline __m128 take4(__m128 v, __m128 m) {
  return _mm_or_ps(_mm_cmpgt_ps(v, m), _mm_cmpunord_ps(v, v));
}

// 8 windows from column 0 of r0 / r1 (16 floats each). shuffle_ps splits even and odd
// columns within each 128-bit lane, leaving the windows in the order 0 1 4 5 2 3 6 7;
// every vector shares that order, and the result is put back with one 64-bit permute.
struct Windows8 {
  __m256 a, b, c, d;
};
DNR_AVX2 inline Windows8 load8(const float* r0, const float* r1) {
  const __m256 x0 = _mm256_loadu_ps(r0), x1 = _mm256_loadu_ps(r0 + 8);
  const __m256 y0 = _mm256_loadu_ps(r1), y1 = _mm256_loadu_ps(r1 + 8);
  return {_mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)),
          _mm256_shuffle_ps(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(y0, y1, _MM_SHUFFLE(3, 1, 3, 1))};
}
// windows 0 1 4 5 2 3 6 7 <-> 0 1 2 3 4 5 6 7 (its own inverse)
DNR_AVX2 inline __m256 swap_middle(__m256 v) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), _MM_SHUFFLE(3, 1, 2, 0)));
}

DNR_AVX2 inline void forward8(const float* r0, const float* r1, float* out) {
  const Windows8 w = load8(r0, r1);
  __m256 m = _mm256_blendv_ps(w.a, w.b, take8(w.b, w.a));
  m = _mm256_blendv_ps(m, w.c, take8(w.c, m));
  m = _mm256_blendv_ps(m, w.d, take8(w.d, m));
  _mm256_storeu_ps(out, swap_middle(m));
}

// Lanes [0, n) of a 4-float vector, as a mask for maskload / maskstore (n may exceed 4).
DNR_AVX2 inline __m128i first_lanes(int64_t n) {
  return _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(std::min<int64_t>(n, 4))), _mm_setr_epi32(0, 1, 2, 3));
}

// Windows [0, n) of 4 (n <= 4): loads and stores are masked to the row (masked-out
// lanes read 0 and are never stored), so rows of 1-3 windows need no bounds care.
struct Windows4 {
  __m128 a, b, c, d;
};
DNR_AVX2 inline Windows4 load4(const float* r0, const float* r1, int64_t n) {
  const __m128i lo = first_lanes(2 * n), hi = first_lanes(2 * n - 4);
  const __m128 x0 = _mm_maskload_ps(r0, lo), x1 = _mm_maskload_ps(r0 + 4, hi);
  const __m128 y0 = _mm_maskload_ps(r1, lo), y1 = _mm_maskload_ps(r1 + 4, hi);
  return {_mm_shuffle_ps(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)), _mm_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)),
          _mm_shuffle_ps(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)), _mm_shuffle_ps(y0, y1, _MM_SHUFFLE(3, 1, 3, 1))};
}

DNR_AVX2 inline void forward4(const float* r0, const float* r1, float* out, int64_t n) {
  const Windows4 w = load4(r0, r1, n);
  __m128 m = _mm_blendv_ps(w.a, w.b, take4(w.b, w.a));
  m = _mm_blendv_ps(m, w.c, take4(w.c, m));
  m = _mm_blendv_ps(m, w.d, take4(w.d, m));
  _mm_maskstore_ps(out, first_lanes(n), m);
}

// The argmax as four disjoint lane masks (window positions 0..3): position p is chosen
// when its take-mask is set and no later position's is.
DNR_AVX2 inline void backward8(const float* r0, const float* r1, const float* grad_out, float* g0, float* g1) {
  const Windows8 w = load8(r0, r1);
  const __m256 t1 = take8(w.b, w.a);
  __m256 m = _mm256_blendv_ps(w.a, w.b, t1);
  const __m256 t2 = take8(w.c, m);
  m = _mm256_blendv_ps(m, w.c, t2);
  const __m256 t3 = take8(w.d, m);
  // 0 + g (see backward_row), in the windows' shuffled order
  const __m256 g = swap_middle(_mm256_add_ps(_mm256_setzero_ps(), _mm256_loadu_ps(grad_out)));
  const __m256 e3 = _mm256_and_ps(t3, g);
  const __m256 e2 = _mm256_andnot_ps(t3, _mm256_and_ps(t2, g));
  const __m256 e1 = _mm256_andnot_ps(_mm256_or_ps(t2, t3), _mm256_and_ps(t1, g));
  const __m256 e0 = _mm256_andnot_ps(_mm256_or_ps(t1, _mm256_or_ps(t2, t3)), g);
  // unpack interleaves per 128-bit lane: lo = windows 0 1 | 2 3, hi = 4 5 | 6 7
  _mm256_storeu_ps(g0, _mm256_unpacklo_ps(e0, e1));
  _mm256_storeu_ps(g0 + 8, _mm256_unpackhi_ps(e0, e1));
  _mm256_storeu_ps(g1, _mm256_unpacklo_ps(e2, e3));
  _mm256_storeu_ps(g1 + 8, _mm256_unpackhi_ps(e2, e3));
}

DNR_AVX2 inline void backward4(const float* r0, const float* r1, const float* grad_out, float* g0, float* g1,
                               int64_t n) {
  const Windows4 w = load4(r0, r1, n);
  const __m128 t1 = take4(w.b, w.a);
  __m128 m = _mm_blendv_ps(w.a, w.b, t1);
  const __m128 t2 = take4(w.c, m);
  m = _mm_blendv_ps(m, w.c, t2);
  const __m128 t3 = take4(w.d, m);
  const __m128 g = _mm_add_ps(_mm_setzero_ps(), _mm_maskload_ps(grad_out, first_lanes(n)));
  const __m128 e3 = _mm_and_ps(t3, g);
  const __m128 e2 = _mm_andnot_ps(t3, _mm_and_ps(t2, g));
  const __m128 e1 = _mm_andnot_ps(_mm_or_ps(t2, t3), _mm_and_ps(t1, g));
  const __m128 e0 = _mm_andnot_ps(_mm_or_ps(t1, _mm_or_ps(t2, t3)), g);
  const __m128i lo = first_lanes(2 * n), hi = first_lanes(2 * n - 4);
  _mm_maskstore_ps(g0, lo, _mm_unpacklo_ps(e0, e1));
  _mm_maskstore_ps(g0 + 4, hi, _mm_unpackhi_ps(e0, e1));
  _mm_maskstore_ps(g1, lo, _mm_unpacklo_ps(e2, e3));
  _mm_maskstore_ps(g1 + 4, hi, _mm_unpackhi_ps(e2, e3));
}

DNR_AVX2 void forward_row_avx2(const float* r0, const float* r1, float* out, int64_t wo) {
  if (wo >= 8) {
    for (int64_t j = 0;; j += 8) {
      j = std::min(j, wo - 8);  // the last block ends at the row's end
      forward8(r0 + 2 * j, r1 + 2 * j, out + j);
      if (j == wo - 8) {
        break;
      }
    }
  } else if (wo >= 4) {
    forward4(r0, r1, out, 4);
    forward4(r0 + 2 * (wo - 4), r1 + 2 * (wo - 4), out + wo - 4, 4);
  } else {
    forward4(r0, r1, out, wo);
  }
}

DNR_AVX2 void backward_row_avx2(const float* r0, const float* r1, const float* go, float* g0, float* g1,
                                int64_t wo) {
  if (wo >= 8) {
    for (int64_t j = 0;; j += 8) {
      j = std::min(j, wo - 8);
      backward8(r0 + 2 * j, r1 + 2 * j, go + j, g0 + 2 * j, g1 + 2 * j);
      if (j == wo - 8) {
        break;
      }
    }
  } else if (wo >= 4) {
    const int64_t j = wo - 4;
    backward4(r0, r1, go, g0, g1, 4);
    backward4(r0 + 2 * j, r1 + 2 * j, go + j, g0 + 2 * j, g1 + 2 * j, 4);
  } else {
    backward4(r0, r1, go, g0, g1, wo);
  }
}
#undef DNR_AVX2
#endif

// Output rows [begin, end) of [B*C*H/2, W/2] from the contiguous input [B*C, H, W].
template <typename scalar_t>
void forward_rows(const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, int64_t ho, int64_t h,
                  int64_t w) {
  const int64_t wo = w / 2;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* r0 = in + (r / ho) * h * w + 2 * (r % ho) * w;
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (cpu_has_avx2_fma_f16c()) {
        forward_row_avx2(r0, r0 + w, out + r * wo, wo);
        continue;
      }
    }
#endif
    forward_row(r0, r0 + w, out + r * wo, wo);
  }
}

// The same rows' windows of grad_input [B*C, H, W].
template <typename scalar_t>
void backward_rows(const scalar_t* in, const scalar_t* grad_out, scalar_t* grad_in, int64_t begin, int64_t end,
                   int64_t ho, int64_t h, int64_t w) {
  const int64_t wo = w / 2;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t offset = (r / ho) * h * w + 2 * (r % ho) * w;
    const scalar_t* r0 = in + offset;
    scalar_t* g0 = grad_in + offset;
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (cpu_has_avx2_fma_f16c()) {
        backward_row_avx2(r0, r0 + w, grad_out + r * wo, g0, g0 + w, wo);
        continue;
      }
    }
#endif
    backward_row(r0, r0 + w, grad_out + r * wo, g0, g0 + w, wo);
  }
}

void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "dnr::", op, " (CPU kernel): input is on ", input.device());
  TORCH_CHECK(input.dim() == 4 && input.size(2) >= 2 && input.size(3) >= 2, "dnr::", op,
              ": input must be [B, C, H, W] with H, W >= 2, got shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "dnr::", op, ": input must be floating point, got ",
              input.scalar_type());
}

// Rows of output [B*C*ho): a task gets whole rows, about kGrainSize input elements.
int64_t row_grain(int64_t w) {
  return std::max<int64_t>(1, kGrainSize / (2 * w));
}

at::Tensor max_pool2x2_cpu(const at::Tensor& input) {
  check_input("max_pool2x2", input);
  const at::Tensor x = input.contiguous();
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = h / 2, wo = w / 2;
  at::Tensor out = at::empty({b, c, ho, wo}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dnr::max_pool2x2", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, b * c * ho, row_grain(w), [&](int64_t begin, int64_t end) {
      forward_rows(in, o, begin, end, ho, h, w);
    });
  });
  return out;
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input) {
  check_input("max_pool2x2_backward", input);
  const at::Tensor x = input.contiguous();
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = h / 2, wo = w / 2;
  TORCH_CHECK(grad_output.device() == x.device() && grad_output.scalar_type() == x.scalar_type(),
              "dnr::max_pool2x2_backward: grad_output must have input's dtype and device (", x.scalar_type(),
              ", ", x.device(), "), got ", grad_output.scalar_type(), ", ", grad_output.device());
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({b, c, ho, wo}),
              "dnr::max_pool2x2_backward: grad_output must have shape ", at::IntArrayRef({b, c, ho, wo}),
              ", got ", grad_output.sizes());
  const at::Tensor go = grad_output.contiguous();
  // A trailing odd row / column is outside every window: its gradient is 0. Only then is a
  // zeroed buffer needed; otherwise every element is written once below.
  at::Tensor grad_input = (h % 2 || w % 2) ? at::zeros_like(x) : at::empty_like(x);
  if (grad_output.numel() == 0) {
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dnr::max_pool2x2_backward", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* g = go.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, b * c * ho, row_grain(w), [&](int64_t begin, int64_t end) {
      backward_rows(in, g, gi, begin, end, ho, h, w);
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(dnr, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace dnr
