// Declarations shared by the registration file and the kernel files of fastres._C.
//
// Every op takes 4-D activations in NCHW or channels_last and returns them in x's memory
// format; per-channel statistics are fp32; math is fp32 (double for double tensors).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace fastres {

using OptTensor = c10::optional<at::Tensor>;

// One kernel set per device, SUFFIX = cpu or cuda (same signatures, so one declaration):
//   add_relu:            relu(x + residual)
//   relu_backward:       grad where y > 0, else 0
//   batch_norm_stats:    (mean, invstd) over N, H, W per channel; updates the running buffers
//                        (unbiased variance)
//   batch_norm_apply:    relu((x - mean) * invstd * weight + bias + residual): BatchNorm's apply
//                        and the fused epilogue after a convolution
//   batch_norm_backward: (d x, d residual or an empty tensor, d weight, d bias) of batch_norm_apply
#define FASTRES_DECLARE_KERNELS(SUFFIX)                                                                       \
  at::Tensor add_relu_##SUFFIX(const at::Tensor& x, const at::Tensor& residual);                            \
  at::Tensor relu_backward_##SUFFIX(const at::Tensor& grad, const at::Tensor& y);                           \
  std::tuple<at::Tensor, at::Tensor> batch_norm_stats_##SUFFIX(                                             \
      const at::Tensor& x, const OptTensor& running_mean, const OptTensor& running_var, double momentum,    \
      double eps);                                                                                          \
  at::Tensor batch_norm_apply_##SUFFIX(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, \
                                       const at::Tensor& mean, const at::Tensor& invstd,                    \
                                       const OptTensor& residual, bool training, bool relu);                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_##SUFFIX(                  \
      const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const OptTensor& weight,            \
      const at::Tensor& mean, const at::Tensor& invstd, bool training, bool relu, bool need_residual_grad,  \
      bool need_param_grads);

FASTRES_DECLARE_KERNELS(cpu)

// CPU only (x86-64, AVX-512 or AVX2 + FMA): relu(conv3x3(x, W) + bias + residual), stride 1,
// padding 1, by Winograd F(2x2, 3x3) or F(4x4, 3x3) (told by packed_weight's first dimension, 16
// or 36); x and residual channels_last float32, W pre-transformed by fastres/ops/winograd.py;
// isa = "auto" (the widest the CPU has), "avx512" or "avx2" (see csrc/cpu/winograd.cpp).
at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const OptTensor& bias,
                                const OptTensor& residual, bool relu, std::string isa);
#ifdef FASTRES_WITH_CUDA
FASTRES_DECLARE_KERNELS(cuda)
#endif

}  // namespace fastres
