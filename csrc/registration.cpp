// The one place where fastres._C declares its operator schemas and binds kernels to them.
// Fake (meta) implementations and autograd formulas are registered from Python, in
// fastres/ops/registry.py, next to those of the Triton operators.
#include <Python.h>
#include <sstream>
#include <torch/library.h>

#include "fastres.h"

namespace {

// Whether this binary's libstdc++ is the process's: an int64 and a bool through an ostringstream
// (cuDNN's graph cache keys, TORCH_CHECK messages) come out as written. A private, exported copy of
// libstdc++ in _C breaks exactly this (setup.py, LINK_FLAGS).
bool iostreams_ok() {
  std::ostringstream s;
  s << static_cast<int64_t>(-1234567890123) << '|' << true;
  return s.str() == "-1234567890123|1";
}

// _C.build_info() -> dict: what this binary was compiled with (read by fastres.build_info()).
PyObject* build_info(PyObject*, PyObject*) {
  PyObject* info = PyDict_New();
  if (info == nullptr) return nullptr;
  auto set = [&](const char* key, PyObject* value) {
    if (value != nullptr) {
      PyDict_SetItemString(info, key, value);
      Py_DECREF(value);
    }
  };
#ifdef FASTRES_WITH_CUDA
  set("cuda_kernels", PyBool_FromLong(1));
  PyObject* archs = PyList_New(0);
  for (int arch : fastres::cuda_archs()) {  // 900 -> "sm_90"
    PyObject* name = PyUnicode_FromFormat("sm_%d", arch / 10);
    PyList_Append(archs, name);
    Py_DECREF(name);
  }
  set("archs", archs);
#else
  set("cuda_kernels", PyBool_FromLong(0));
  set("archs", PyList_New(0));
#endif
#ifdef FASTRES_WITH_CUDNN_GRAPHS
  set("cudnn_graphs", PyBool_FromLong(1));
  set("cudnn_frontend_version", PyUnicode_FromString(fastres::cudnn_frontend_version().c_str()));
  set("cudnn_compiled_version", PyLong_FromLongLong(fastres::cudnn_compiled_version()));
#else
  set("cudnn_graphs", PyBool_FromLong(0));
  Py_INCREF(Py_None);
  set("cudnn_frontend_version", Py_None);
  Py_INCREF(Py_None);
  set("cudnn_compiled_version", Py_None);
#endif
  set("iostreams_ok", PyBool_FromLong(iostreams_ok()));
  return info;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What fastres._C was compiled with (a dict)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// A plain CPython module, so `import fastres._C` loads the library (and runs the
// registrations below) without pulling pybind11 into the build.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastres compiled kernels (torch.ops.fastres)", -1,
                               methods};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fastres, m) {
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor");
  m.def("relu_backward(Tensor grad, Tensor y) -> Tensor");
  m.def("batch_norm_act_stats(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
        "float eps) -> (Tensor, Tensor)");
  m.def("batch_norm_act_apply(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, Tensor? residual, "
        "bool training, bool relu) -> Tensor");
  m.def("batch_norm_act_backward(Tensor grad, Tensor y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, "
        "bool training, bool relu, bool need_residual_grad, bool need_param_grads) -> (Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("conv3x3_winograd(Tensor x, Tensor packed_weight, Tensor? bias, Tensor? residual, bool relu, "
        "str isa=\"auto\") -> Tensor");
  m.def("batch_norm_finalize(Tensor sum, Tensor sqsum, int count, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor, "
        "Tensor)");
  // cuDNN graphs: declared in every build (so the schemas are stable); CUDA kernels only with
  // FASTRES_WITH_CUDNN_GRAPHS.
  m.def("cudnn_conv_bias_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  m.def("cudnn_conv_bias_act_supported(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool relu) -> bool");
  m.def("cudnn_conv_genstats(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, bool prologue_relu, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor, Tensor)");
  m.def("cudnn_conv_genstats_supported(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, bool prologue_relu, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups) -> bool");
  m.def("cudnn_conv_wgrad(Tensor grad, Tensor x, int[4] weight_size, Tensor? scale, Tensor? shift, "
        "bool prologue_relu, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def("cudnn_conv_wgrad_supported(Tensor grad, Tensor x, int[4] weight_size, Tensor? scale, Tensor? shift, "
        "bool prologue_relu, int[2] stride, int[2] padding, int[2] dilation, int groups) -> bool");
  m.def("cudnn_conv_dgrad_drelu(Tensor grad, Tensor weight, Tensor x, Tensor scale, Tensor shift, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor, Tensor)");
  m.def("cudnn_conv_dgrad_drelu_supported(Tensor grad, Tensor weight, Tensor x, Tensor scale, Tensor shift, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups) -> bool");
}

#define FASTRES_BIND_KERNELS(m, SUFFIX)                                   \
  m.impl("add_relu", &fastres::add_relu_##SUFFIX);                        \
  m.impl("relu_backward", &fastres::relu_backward_##SUFFIX);              \
  m.impl("batch_norm_act_stats", &fastres::batch_norm_act_stats_##SUFFIX);        \
  m.impl("batch_norm_act_apply", &fastres::batch_norm_act_apply_##SUFFIX);        \
  m.impl("batch_norm_act_backward", &fastres::batch_norm_act_backward_##SUFFIX);

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  FASTRES_BIND_KERNELS(m, cpu)
  m.impl("conv3x3_winograd", &fastres::conv3x3_winograd_cpu);  // CPU inference only
  m.impl("batch_norm_finalize", &fastres::batch_norm_finalize_cpu);
}

#ifdef FASTRES_WITH_CUDA
TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  FASTRES_BIND_KERNELS(m, cuda)
  m.impl("batch_norm_finalize", &fastres::batch_norm_finalize_cuda);
#ifdef FASTRES_WITH_CUDNN_GRAPHS
  m.impl("cudnn_conv_bias_act", &fastres::cudnn_conv_bias_act);
  m.impl("cudnn_conv_bias_act_supported", &fastres::cudnn_conv_bias_act_supported);
  m.impl("cudnn_conv_genstats", &fastres::cudnn_conv_genstats);
  m.impl("cudnn_conv_genstats_supported", &fastres::cudnn_conv_genstats_supported);
  m.impl("cudnn_conv_wgrad", &fastres::cudnn_conv_wgrad);
  m.impl("cudnn_conv_wgrad_supported", &fastres::cudnn_conv_wgrad_supported);
  m.impl("cudnn_conv_dgrad_drelu", &fastres::cudnn_conv_dgrad_drelu);
  m.impl("cudnn_conv_dgrad_drelu_supported", &fastres::cudnn_conv_dgrad_drelu_supported);
#endif
}
#endif
