// Argument checks of the list ops (momentum_stats, masked_sgd_step_), shared by
// their CPU and CUDA kernels so that both reject the same inputs with the same messages. The Python wrappers in dnr.ops check
// first (with Python exception types); these guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "layout.h"

namespace dnr {

// Every tensor on one device: the list runs in one pass (one launch on CUDA).
inline void check_device(
    const char* op, const at::Tensor& t, const std::string& name,
    const at::Device& device) {
  TORCH_CHECK(
      t.device() == device, "dnr::", op, ": ", name, " is on ", t.device(),
      " but the first tensor is on ", device, "; all must be on one device");
}

inline void check_momentum_stats(at::TensorList momenta, at::TensorList masks) {
  TORCH_CHECK(
      momenta.size() == masks.size(), "dnr::momentum_stats: got ", momenta.size(),
      " momenta but ", masks.size(), " masks");
  for (size_t l = 0; l < momenta.size(); ++l) {
    const at::Tensor& m = momenta[l];
    const at::Tensor& k = masks[l];
    const std::string idx = "[" + std::to_string(l) + "]";
    check_device("momentum_stats", m, "momenta" + idx, momenta[0].device());
    check_device("momentum_stats", k, "masks" + idx, momenta[0].device());
    TORCH_CHECK(
        at::isFloatingType(m.scalar_type()), "dnr::momentum_stats: momenta", idx,
        " must be floating point, got ", m.scalar_type());
    TORCH_CHECK(
        k.scalar_type() == at::kBool, "dnr::momentum_stats: masks", idx,
        " must be torch.bool, got ", k.scalar_type());
    TORCH_CHECK(
        k.sizes() == m.sizes(), "dnr::momentum_stats: masks", idx, " has shape ",
        k.sizes(), " but momenta", idx, " has shape ", m.sizes());
  }
}

inline void check_masked_sgd_step(
    at::TensorList params, at::TensorList grads, at::TensorList bufs,
    at::TensorList masks, double momentum, double dampening, bool nesterov) {
  TORCH_CHECK(
      grads.size() == params.size() && bufs.size() == params.size() &&
          masks.size() == params.size(),
      "dnr::masked_sgd_step_: params, grads, momentum_buffers and masks must "
      "have one length, got ", params.size(), ", ", grads.size(), ", ",
      bufs.size(), " and ", masks.size());
  TORCH_CHECK(
      !nesterov || (momentum > 0 && dampening == 0),
      "dnr::masked_sgd_step_: nesterov needs momentum > 0 and dampening == 0, "
      "got momentum=", momentum, ", dampening=", dampening);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const std::string idx = "[" + std::to_string(i) + "]";
    TORCH_CHECK(
        at::isFloatingType(p.scalar_type()), "dnr::masked_sgd_step_: params", idx,
        " must be floating point, got ", p.scalar_type());
    // Written through raw pointers as one linear range: params must be dense (any
    // memory order, e.g. contiguous or channels_last) and buffers in the same order.
    TORCH_CHECK(
        p.is_non_overlapping_and_dense(), "dnr::masked_sgd_step_: params", idx,
        " must be dense, e.g. contiguous or channels_last (it is written in place), got sizes ",
        p.sizes(), " and strides ", p.strides());
    const std::pair<const char*, const at::Tensor*> same[] = {
        {"grads", &grads[i]}, {"momentum_buffers", &bufs[i]}, {"masks", &masks[i]}};
    for (const auto& [name, t] : same) {
      check_device("masked_sgd_step_", *t, name + idx, params[0].device());
      TORCH_CHECK(
          t->sizes() == p.sizes(), "dnr::masked_sgd_step_: ", name, idx,
          " has shape ", t->sizes(), " but params", idx, " has shape ", p.sizes());
      TORCH_CHECK(
          t->scalar_type() == (t == &masks[i] ? at::kBool : p.scalar_type()),
          "dnr::masked_sgd_step_: ", name, idx, " has dtype ", t->scalar_type(),
          " but must have ", (t == &masks[i] ? at::kBool : p.scalar_type()));
    }
    check_device("masked_sgd_step_", p, "params" + idx, params[0].device());
    TORCH_CHECK(
        same_layout(bufs[i], p), "dnr::masked_sgd_step_: momentum_buffers", idx,
        " must have the memory layout of params", idx, " (strides ", p.strides(),
        "; it is written in place), got strides ", bufs[i].strides());
  }
}

}  // namespace dnr
