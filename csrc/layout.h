// Memory-layout helpers shared by every kernel that walks tensors as one linear
// range (pgd_step_, masked_sgd_step_, momentum_stats): one definition, so the CPU
// and CUDA kernels of all ops agree on what "the same layout" means.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

namespace dnr {

// Whether a and b lay their elements out in one memory order: same sizes and equal
// strides in every dimension longer than 1 (a size-1 dimension's stride changes no
// element's offset, so e.g. a [O, C, 1, 1] weight is both contiguous and channels_last).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) {
    return false;
  }
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

// t in the memory order of the dense tensor p (t itself when it already is): the
// elementwise kernels walk p and t as one linear range.
inline at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& p) {
  if (same_layout(t, p)) {
    return t;
  }
  return at::empty_like(p, t.options()).copy_(t);
}

// Records an in-place write of t for autograd, as ATen's ADInplaceOrView kernels do
// for its own in-place ops (an op registered from C++ gets no such kernel): a graph
// that saved t's old value then raises at backward instead of using the new one.
// Inference tensors have no counter: outside inference mode this raises, as any
// in-place PyTorch op on them does.
inline void mark_written(const at::Tensor& t) {
  t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace dnr
