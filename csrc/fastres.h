// Declarations shared by the registration file and the kernel files of fastres._C.
//
// Every op takes 4-D activations in NCHW or channels_last and returns them in x's memory
// format; per-channel statistics are fp32; math is fp32 (double for double tensors).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>
#include <vector>

namespace fastres {

using OptTensor = c10::optional<at::Tensor>;

// One kernel set per device, SUFFIX = cpu or cuda (same signatures, so one declaration):
//   add_relu:            relu(x + residual)
//   relu_backward:       grad where y > 0, else 0
//   batch_norm_act_stats:    (mean, invstd) over N, H, W per channel; updates the running buffers
//                        (unbiased variance)
//   batch_norm_act_apply:    relu((x - mean) * invstd * weight + bias + residual): BatchNorm's apply
//                        and the fused epilogue after a convolution
//   batch_norm_act_backward: (d x, d residual or an empty tensor, d weight, d bias) of batch_norm_act_apply
#define FASTRES_DECLARE_KERNELS(SUFFIX)                                                                       \
  at::Tensor add_relu_##SUFFIX(const at::Tensor& x, const at::Tensor& residual);                            \
  at::Tensor relu_backward_##SUFFIX(const at::Tensor& grad, const at::Tensor& y);                           \
  std::tuple<at::Tensor, at::Tensor> batch_norm_act_stats_##SUFFIX(                                             \
      const at::Tensor& x, const OptTensor& running_mean, const OptTensor& running_var, double momentum,    \
      double eps);                                                                                          \
  at::Tensor batch_norm_act_apply_##SUFFIX(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, \
                                       const at::Tensor& mean, const at::Tensor& invstd,                    \
                                       const OptTensor& residual, bool training, bool relu);                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_##SUFFIX(                  \
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

// batch_norm_finalize: BatchNorm's statistics from per-channel sum and sum of squares over
// `count` values (the genstats outputs of a cuDNN conv): (mean, invstd, scale = weight * invstd,
// shift = bias - mean * scale), float32 (float64 for float64 sums); updates the running buffers
// as nn.BatchNorm2d does (momentum, unbiased variance), on the sums' device.
#define FASTRES_DECLARE_FINALIZE(SUFFIX)                                                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_finalize_##SUFFIX(                \
      const at::Tensor& sum, const at::Tensor& sqsum, int64_t count, const OptTensor& weight,             \
      const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var, double momentum, \
      double eps);
FASTRES_DECLARE_FINALIZE(cpu)
#ifdef FASTRES_WITH_CUDA
FASTRES_DECLARE_FINALIZE(cuda)
// The CUDA architectures the kernels were compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. 900).
std::vector<int> cuda_archs();
#endif

#ifdef FASTRES_WITH_CUDNN_GRAPHS
// cuDNN graphs (csrc/cuda/cudnn_graphs.cpp); see there. The _supported twins never throw for a
// well-formed call: false means "no cuDNN engine (or not a call the graphs take)".
bool cudnn_conv_bias_act_supported(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias,
                                   const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, bool relu);
at::Tensor cudnn_conv_bias_act(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias,
                               const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool relu);
bool cudnn_conv_genstats_supported(const at::Tensor& x, const at::Tensor& w, const OptTensor& scale,
                                   const OptTensor& shift, bool prologue_relu, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cudnn_conv_genstats(
    const at::Tensor& x, const at::Tensor& w, const OptTensor& scale, const OptTensor& shift, bool prologue_relu,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
bool cudnn_conv_wgrad_supported(const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef weight_size,
                                const OptTensor& scale, const OptTensor& shift, bool prologue_relu,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups);
at::Tensor cudnn_conv_wgrad(const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef weight_size,
                            const OptTensor& scale, const OptTensor& shift, bool prologue_relu, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
bool cudnn_conv_dgrad_drelu_supported(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& x,
                                      const at::Tensor& scale, const at::Tensor& shift, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cudnn_conv_dgrad_drelu(
    const at::Tensor& grad, const at::Tensor& w, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups);
std::string cudnn_frontend_version();
int64_t cudnn_compiled_version();
#endif

}  // namespace fastres
