// Argument checks and layout preparation of dnr::pgd_step_, shared by the CPU and
// CUDA kernels so that both reject the same inputs with the same messages.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "layout.h"

namespace dnr {

// Everything a pgd_step_ kernel reads, laid out like `delta`: element i of
// delta, x_adv, x and grad sits at the same offset from each data pointer, and
// sample b owns offsets [b * per_sample, (b + 1) * per_sample).
struct PgdStepInputs {
  at::Tensor x;
  at::Tensor grad;
  at::Tensor eps;    // opmath dtype, contiguous, numel 1 or batch
  at::Tensor alpha;  // opmath dtype, contiguous, numel 1 or batch
  int64_t batch = 0;
  int64_t per_sample = 0;
};

inline at::Tensor per_sample_scalar(
    const at::Tensor& t, const char* name, const at::Tensor& delta) {
  const int64_t batch = delta.size(0);
  TORCH_CHECK(
      t.dim() == 0 || (t.dim() == 1 && t.size(0) == batch),
      "dnr::pgd_step_: ", name, " must have shape [] or [", batch,
      "] (one value per sample), got ", t.sizes());
  TORCH_CHECK(
      t.device() == delta.device() || (t.dim() == 0 && t.device().is_cpu()),
      "dnr::pgd_step_: ", name, " is on ", t.device(), " but delta is on ",
      delta.device());
  return t.to(delta.device(), at::toOpMathType(delta.scalar_type()))
      .contiguous();
}

inline PgdStepInputs prepare_pgd_step(
    const at::Tensor& delta, const at::Tensor& x_adv, const at::Tensor& x,
    const at::Tensor& grad, const at::Tensor& eps, const at::Tensor& alpha) {
  TORCH_CHECK(
      delta.dim() >= 1, "dnr::pgd_step_: delta must have a batch dimension, got shape ",
      delta.sizes());
  TORCH_CHECK(
      at::isFloatingType(delta.scalar_type()),
      "dnr::pgd_step_: delta must be a floating-point tensor, got ",
      delta.scalar_type());
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"x_adv", &x_adv}, {"x", &x}, {"grad", &grad}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(
        t->sizes() == delta.sizes(), "dnr::pgd_step_: ", name, " has shape ",
        t->sizes(), " but delta has shape ", delta.sizes());
    TORCH_CHECK(
        t->scalar_type() == delta.scalar_type(), "dnr::pgd_step_: ", name,
        " has dtype ", t->scalar_type(), " but delta has dtype ",
        delta.scalar_type());
    TORCH_CHECK(
        t->device() == delta.device(), "dnr::pgd_step_: ", name, " is on ",
        t->device(), " but delta is on ", delta.device());
  }
  // The outputs are written through raw pointers: they must be dense, share one
  // layout, and keep each sample in one block (contiguous or channels_last).
  TORCH_CHECK(
      delta.numel() == 0 ||
          (delta.is_non_overlapping_and_dense() &&
           (delta.size(0) == 1 || delta.stride(0) * delta.size(0) == delta.numel())),
      "dnr::pgd_step_: delta must be contiguous or channels_last (it is written "
      "in place), got strides ", delta.strides(), " for shape ", delta.sizes());
  TORCH_CHECK(
      same_layout(x_adv, delta),
      "dnr::pgd_step_: x_adv must have the same memory layout as delta (it is "
      "written in place), got strides ", x_adv.strides(), " and ",
      delta.strides());

  PgdStepInputs in;
  // Read-only inputs in another layout get one copy in delta's layout.
  in.x = same_layout(x, delta) ? x : at::empty_like(delta).copy_(x);
  in.grad = same_layout(grad, delta) ? grad : at::empty_like(delta).copy_(grad);
  in.eps = per_sample_scalar(eps, "eps", delta);
  in.alpha = per_sample_scalar(alpha, "alpha", delta);
  in.batch = delta.size(0);
  in.per_sample = in.batch == 0 ? 0 : delta.numel() / in.batch;
  return in;
}

}  // namespace dnr
