// The dnr operator library: every schema is declared here, once.
// Kernels register themselves per device in csrc/cpu/<op>.cpp and
// csrc/cuda/*.cu (the list ops share csrc/cuda/multi_tensor_kernels.cu: fewer
// slow translation units); masked_conv2d is device-generic ATen code in
// csrc/masked_conv2d.cpp; fake (meta) kernels and autograd are registered from
// Python in python/dnr/ops/_registry.py. An op without a kernel for a device runs
// its PyTorch reference (python/dnr/reference.py) there.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import dnr._C` only has to load this shared library so that the static
// registrations run; the Python module itself is empty (no pybind11, so the
// library builds against the stable ABI).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",    // name
      nullptr, // docstring
      -1,      // no per-module state
      nullptr, // no methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dnr, m) {
  // value == conv2d(input, weight * mask, bias, ...); the weight gradient is the
  // dense one (wrt weight * mask) when dense_weight_grad, else that times mask.
  m.def(
      "masked_conv2d(Tensor input, Tensor weight, Tensor mask, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool dense_weight_grad) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradients of masked_conv2d wrt (input, weight, bias); an entry whose
  // output_mask is false is not computed (returned undefined, None in Python).
  m.def(
      "masked_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor mask, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool dense_weight_grad, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // One PGD step, in place: d = clamp(delta + alpha*sign(grad), -eps, eps);
  // x_adv = clamp(x + d, lo, hi); delta = x_adv - x. eps, alpha: [] or [B].
  m.def(
      "pgd_step_(Tensor(a!) delta, Tensor(b!) x_adv, Tensor x, Tensor grad, "
      "Tensor eps, Tensor alpha, float lo, float hi) -> ()",
      {at::Tag::pt2_compliant_tag});
  // float64 [L, 2]: row l = (sum |momenta[l]| where masks[l], count of masks[l]).
  m.def(
      "momentum_stats(Tensor[] momenta, Tensor[] masks) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // float32 [sum_l tensors[l].size(0)]: the L2 norm of every output channel
  // (row of tensors[l].reshape(size(0), -1)) of every tensor, concatenated.
  m.def("channel_norms(Tensor[] tensors) -> Tensor", {at::Tag::pt2_compliant_tag});
  // torch.optim.SGD's update (dense momentum buffers), then params *= masks.
  m.def(
      "masked_sgd_step_(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, Tensor[] masks, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool first_step) -> ()",
      {at::Tag::pt2_compliant_tag});
}
