// dnr::masked_conv2d and its backward, for CPU and CUDA alike: the GEMM work is
// ATen's convolution (cuDNN / oneDNN), this file only adds what those cannot do:
// the mask, the dense or masked weight gradient, and, when whole output channels
// are pruned (channel mode), a gather of the live filters so that the
// convolution runs on those alone and its cost falls with channel density.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

namespace dnr {
namespace {

// Live output channels of a mask: (indices int64 [K], K). It is recomputed at every
// call, not cached: no cache key sees every write of a mask (writes through `.data`,
// e.g. a broadcast, leave the version counter alone). Only CPU tensors take this path
// (see may_gather).
std::pair<at::Tensor, int64_t> live_channels(const at::Tensor& mask) {
  const at::Tensor alive = mask.reshape({mask.size(0), -1}).any(1);
  const at::Tensor index = alive.nonzero().squeeze(1);
  return {index, index.size(0)};
}

// Strictly channels_last: a tensor whose strides are both (e.g. [B, 1, H, W]) counts
// as contiguous. python/dnr/ops/_registry.py's fakes apply the same rule.
bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// The layout of every output and gradient: channels_last when input or weight is,
// as cuDNN and oneDNN choose, but decided here so that it does not depend on the
// backend, the dtype or the mask's values (the gathered path builds its own output).
at::MemoryFormat conv_layout(const at::Tensor& input, const at::Tensor& weight) {
  return is_channels_last(input) || is_channels_last(weight) ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous;
}

void check_conv_args(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    int64_t groups) {
  TORCH_CHECK(
      input.dim() == 4, "dnr::masked_conv2d: input must be [B, C, H, W], got shape ",
      input.sizes());
  TORCH_CHECK(
      weight.dim() == 4, "dnr::masked_conv2d: weight must be [O, C/groups, kH, kW], got shape ",
      weight.sizes());
  TORCH_CHECK(
      mask.scalar_type() == at::kBool, "dnr::masked_conv2d: mask must be torch.bool, got ",
      mask.scalar_type());
  TORCH_CHECK(
      mask.sizes() == weight.sizes(), "dnr::masked_conv2d: mask has shape ", mask.sizes(),
      " but weight has shape ", weight.sizes());
  TORCH_CHECK(
      mask.device() == weight.device() && input.device() == weight.device(),
      "dnr::masked_conv2d: input (", input.device(), "), weight (", weight.device(),
      ") and mask (", mask.device(), ") must be on one device");
  TORCH_CHECK(groups >= 1, "dnr::masked_conv2d: groups must be >= 1, got ", groups);
}

// Whether to look for pruned output channels at all: on the CPU only, and only with
// groups == 1 (with groups > 1 the filters of a group are tied to its input
// channels). On CUDA the
// live count K is a host sync (nonzero) per layer and call, which leaves the GPU idle
// while the host launches what follows; on an H200 that cost more than the gather
// saved (benchmarks/README.md, GPU section: with it, the masked convolution took
// 1.8-3.1x the dense one's forward + backward and a sparse ResNet-18 PGD-7 training
// step 1.7x the plain masked step's). On CUDA the zero filters are convolved instead;
// channel mode's FLOP saving there comes from export (dnr.export.compact_model).
bool may_gather(const at::Tensor& weight, int64_t groups) {
  return groups == 1 && weight.is_cpu();
}

// Where may_gather holds, the gathered path pays off only when some output channel
// is entirely pruned. (With no live channel at all the plain convolution of the
// all-zero weight runs: ATen rejects zero filters.)
bool gather_channels(const at::Tensor& weight, int64_t live) {
  return live > 0 && live < weight.size(0);
}

at::Tensor masked_conv2d(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool dense_weight_grad) {
  check_conv_args(input, weight, mask, groups);
  const at::Tensor w = weight * mask;
  const std::vector<int64_t> no_output_padding{0, 0};
  const at::MemoryFormat layout = conv_layout(input, weight);
  if (may_gather(weight, groups)) {
    auto [index, live] = live_channels(mask);
    if (gather_channels(weight, live)) {
      const std::optional<at::Tensor> bias_live =
          bias.has_value() && bias->defined() ? std::optional<at::Tensor>(bias->index_select(0, index))
                                              : std::nullopt;
      const at::Tensor part = at::convolution(
          input, w.index_select(0, index), bias_live, stride, padding, dilation,
          false, no_output_padding, groups);
      std::vector<int64_t> shape = part.sizes().vec();
      shape[1] = weight.size(0);
      // A pruned channel's output is its bias (zero without one).
      at::Tensor out = at::empty(shape, part.options().memory_format(layout));
      if (bias.has_value() && bias->defined()) {
        out.copy_(bias->view({1, -1, 1, 1}).expand(shape));
      } else {
        out.zero_();
      }
      return out.index_copy_(1, index, part);
    }
  }
  return at::convolution(input, w, bias, stride, padding, dilation, false, no_output_padding, groups)
      .contiguous(layout);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool dense_weight_grad,
    std::array<bool, 3> output_mask) {
  check_conv_args(input, weight, mask, groups);
  const at::Tensor w = weight * mask;
  const std::vector<int64_t> no_output_padding{0, 0};
  const std::vector<int64_t> bias_sizes{weight.size(0)};
  at::Tensor grad_input, grad_weight, grad_bias;
  std::optional<std::pair<at::Tensor, int64_t>> live;
  if (may_gather(weight, groups)) {
    live = live_channels(mask);
  }
  if (live && gather_channels(weight, live->second)) {
    const at::Tensor& index = live->first;
    // Pruned channels have zero filters: they add nothing to grad_input, and
    // their masked weight gradient is zero.
    const bool masked_w = output_mask[1] && !dense_weight_grad;
    if (output_mask[0] || masked_w) {
      auto [gi, gw, unused] = at::convolution_backward(
          grad_output.index_select(1, index), input, w.index_select(0, index),
          std::nullopt, stride, padding, dilation, false, no_output_padding, groups,
          {output_mask[0], masked_w, false});
      grad_input = gi;
      if (masked_w) {
        grad_weight = at::zeros_like(weight).index_copy_(0, index, gw).mul_(mask);
      }
    }
    if (output_mask[1] && dense_weight_grad) {  // every filter, pruned ones included
      grad_weight = std::get<1>(at::convolution_backward(
          grad_output, input, w, std::nullopt, stride, padding, dilation, false,
          no_output_padding, groups, {false, true, false}));
    }
    if (output_mask[2]) {
      grad_bias = grad_output.sum({0, 2, 3});
    }
  } else {
    std::tie(grad_input, grad_weight, grad_bias) = at::convolution_backward(
        grad_output, input, w, bias_sizes, stride, padding, dilation, false,
        no_output_padding, groups, output_mask);
    if (grad_weight.defined() && !dense_weight_grad) {
      grad_weight.mul_(mask);
    }
  }
  // Only what was asked for (some backends fill unrequested entries anyway), in the
  // forward's layout (a no-op where the backend already chose it).
  const at::MemoryFormat layout = conv_layout(input, weight);
  return {
      output_mask[0] ? grad_input.contiguous(layout) : at::Tensor(),
      output_mask[1] ? grad_weight.contiguous(layout) : at::Tensor(),
      output_mask[2] ? grad_bias : at::Tensor()};
}

}  // namespace

// ATen's convolution dispatches on the device itself: one implementation serves both.
TORCH_LIBRARY_IMPL(dnr, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward);
}

TORCH_LIBRARY_IMPL(dnr, CUDA, m) {
  m.impl("masked_conv2d", &masked_conv2d);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward);
}

}  // namespace dnr
