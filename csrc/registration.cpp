// The one place where fastres._C declares its operator schemas and binds kernels to them.
// Python-side fake (meta) implementations and autograd live in fastres/ops.
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
}

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("add_relu", &fastres::add_relu_cpu);
}
