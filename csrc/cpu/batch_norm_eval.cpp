// CPU kernels of dnr::batch_norm_eval and dnr::batch_norm_eval_backward (schemas and
// semantics: csrc/dnr.cpp).
//
// Why: in eval mode BatchNorm is a fixed affine map per channel, and its input
// gradient is grad_output * invstd * weight. The attacks of adversarial training
// and of evaluation (PGD, APGD, AutoAttack) run the model in eval mode with frozen
// parameters, so 7 of the 9 BatchNorm backwards of a PGD-7 training step are of
// this kind. ATen's CPU backward (aten/src/ATen/native/cpu/batch_norm_kernel.cpp)
// first sweeps input and grad_output for the per-channel sums that only the weight
// and bias gradients need, also when neither is asked for: on one core its
// backward was 18% of a small_cnn PGD-7 training step. The backward here reads
// grad_output once and writes grad_input once.
//
// Bit for bit ATen's eval-mode input gradient: invstd = 1 / sqrt(running_var + eps)
// computed in double and rounded to the parameter dtype, then
// grad_input = (grad_output * invstd) * weight, two roundings in that order (not
// grad_output * (invstd * weight), which rounds differently). The forward is ATen's
// own native_batch_norm in eval mode, so its values are F.batch_norm's by
// construction.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/native_batch_norm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace dnr {
namespace {

constexpr int64_t kGrainSize = 32768;  // elements per task, as ATen's elementwise ops

// A per-channel parameter (weight, running_mean, running_var): 1-D, C elements,
// the input's dtype and device.
void check_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& input) {
  TORCH_CHECK(p.dim() == 1 && p.size(0) == input.size(1), "dnr::", op, ": ", name, " must have shape [",
              input.size(1), "] (the input's channels), got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == input.scalar_type() && p.device() == input.device(), "dnr::", op, ": ", name,
              " must have the input's dtype and device (", input.scalar_type(), ", ", input.device(), "), got ",
              p.scalar_type(), ", ", p.device());
}

void check_input(const char* op, const char* name, const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), "dnr::", op, " (CPU kernel): ", name, " is on ", input.device());
  TORCH_CHECK(input.dim() >= 2, "dnr::", op, ": ", name, " must be [N, C, *], got shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, "dnr::", op, ": ", name,
              " must be float32 or float64, got ", input.scalar_type());
}

bool strictly_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

at::Tensor batch_norm_eval_cpu(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                               const at::Tensor& running_var, double eps) {
  check_input("batch_norm_eval", "input", input);
  if (weight.has_value()) check_param("batch_norm_eval", "weight", *weight, input);
  if (bias.has_value()) check_param("batch_norm_eval", "bias", *bias, input);
  check_param("batch_norm_eval", "running_mean", running_mean, input);
  check_param("batch_norm_eval", "running_var", running_var, input);
  // training=false: normalise with the running statistics and leave them alone
  // (momentum is not read).
  return std::get<0>(at::native_batch_norm(input, weight, bias, running_mean, running_var, /*training=*/false,
                                           /*momentum=*/0.0, eps));
}

at::Tensor batch_norm_eval_backward_cpu(const at::Tensor& grad_output, const std::optional<at::Tensor>& weight,
                                        const at::Tensor& running_var, double eps) {
  check_input("batch_norm_eval_backward", "grad_output", grad_output);
  if (weight.has_value()) check_param("batch_norm_eval_backward", "weight", *weight, grad_output);
  check_param("batch_norm_eval_backward", "running_var", running_var, grad_output);
  // channels_last stays channels_last (the channel is the fastest dimension);
  // any other layout is made contiguous NCHW.
  const bool channels_last = strictly_channels_last(grad_output);
  const at::Tensor go = channels_last ? grad_output : grad_output.contiguous();
  at::Tensor grad_input =
      at::empty_like(go, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t numel = go.numel();
  if (numel == 0) {
    return grad_input;
  }
  const int64_t n_channel = go.size(1);
  const at::Tensor var = running_var.contiguous();
  const std::optional<at::Tensor> w = weight.has_value() ? std::optional<at::Tensor>(weight->contiguous())
                                                         : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "dnr::batch_norm_eval_backward", [&] {
    // Per channel: invstd as ATen computes it (in double: param + eps is a double
    // expression), rounded once to scalar_t; the weight, 1 without one.
    std::vector<scalar_t> invstd(n_channel), scale(n_channel, scalar_t(1));
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < n_channel; ++c) {
      invstd[c] = static_cast<scalar_t>(1 / std::sqrt(static_cast<double>(v[c]) + eps));
      if (w.has_value()) scale[c] = w->const_data_ptr<scalar_t>()[c];
    }
    const scalar_t* dy = go.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    if (channels_last) {
      // [N*H*W rows of C]
      const int64_t rows = numel / n_channel;
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainSize / n_channel), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* in = dy + r * n_channel;
          scalar_t* out = dx + r * n_channel;
          for (int64_t c = 0; c < n_channel; ++c) {
            out[c] = (in[c] * invstd[c]) * scale[c];
          }
        }
      });
    } else {
      // [N*C planes of S = H*W (or the product of the trailing dims)]
      const int64_t plane = numel / (go.size(0) * n_channel);
      at::parallel_for(0, numel / plane, std::max<int64_t>(1, kGrainSize / plane), [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const scalar_t k = invstd[p % n_channel], s = scale[p % n_channel];
          const scalar_t* in = dy + p * plane;
          scalar_t* out = dx + p * plane;
          for (int64_t i = 0; i < plane; ++i) {
            out[i] = (in[i] * k) * s;
          }
        }
      });
    }
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(dnr, CPU, m) {
  m.impl("batch_norm_eval", &batch_norm_eval_cpu);
  m.impl("batch_norm_eval_backward", &batch_norm_eval_backward_cpu);
}

}  // namespace dnr
