// The one place where fastres._C declares its operator schemas and binds kernels to them.
// Fake (meta) implementations and autograd formulas are registered from Python, in
// fastres/ops/registry.py, next to those of the Triton operators.
#include <Python.h>
#include <torch/library.h>

#include "fastres.h"

// A plain CPython module, so `import fastres._C` loads the library (and runs the
// registrations below) without pulling pybind11 into the build.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastres compiled kernels (torch.ops.fastres)", -1,
                               nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fastres, m) {
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor");
  m.def("relu_backward(Tensor grad, Tensor y) -> Tensor");
  m.def("batch_norm_stats(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
        "float eps) -> (Tensor, Tensor)");
  m.def("batch_norm_apply(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, Tensor? residual, "
        "bool training, bool relu) -> Tensor");
  m.def("batch_norm_backward(Tensor grad, Tensor y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, "
        "bool training, bool relu, bool need_residual_grad, bool need_param_grads) -> (Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("conv3x3_winograd(Tensor x, Tensor packed_weight, Tensor? bias, Tensor? residual, bool relu, "
        "str isa=\"auto\") -> Tensor");
}

#define FASTRES_BIND_KERNELS(m, SUFFIX)                                   \
  m.impl("add_relu", &fastres::add_relu_##SUFFIX);                        \
  m.impl("relu_backward", &fastres::relu_backward_##SUFFIX);              \
  m.impl("batch_norm_stats", &fastres::batch_norm_stats_##SUFFIX);        \
  m.impl("batch_norm_apply", &fastres::batch_norm_apply_##SUFFIX);        \
  m.impl("batch_norm_backward", &fastres::batch_norm_backward_##SUFFIX);

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  FASTRES_BIND_KERNELS(m, cpu)
  m.impl("conv3x3_winograd", &fastres::conv3x3_winograd_cpu);  // CPU inference only
}

#ifdef FASTRES_WITH_CUDA
TORCH_LIBRARY_IMPL(fastres, CUDA, m) { FASTRES_BIND_KERNELS(m, cuda) }
#endif
