// Declarations shared by the registration file and the kernel files of fastres._C.
//
// Every op takes 4-D activations in NCHW or channels_last and returns them in x's memory
// format; per-channel statistics are fp32; math is fp32 (double for double tensors).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastres {

using OptTensor = c10::optional<at::Tensor>;

// relu(x + residual).
at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& residual);
// grad where y > 0, else 0.
at::Tensor relu_backward_cpu(const at::Tensor& grad, const at::Tensor& y);
// (mean, invstd) of x over N, H, W per channel; updates the running buffers (unbiased variance).
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x, const OptTensor& running_mean,
                                                        const OptTensor& running_var, double momentum, double eps);
// relu((x - mean) * invstd * weight + bias + residual): BatchNorm's apply and the fused conv epilogue.
at::Tensor batch_norm_apply_cpu(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& residual,
                                bool training, bool relu);
// (d x, d residual or an empty tensor, d weight, d bias) of batch_norm_apply.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const OptTensor& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, bool relu, bool need_residual_grad,
    bool need_param_grads);

#ifdef FASTRES_WITH_CUDA
at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& residual);
at::Tensor relu_backward_cuda(const at::Tensor& grad, const at::Tensor& y);
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& x, const OptTensor& running_mean,
                                                         const OptTensor& running_var, double momentum, double eps);
at::Tensor batch_norm_apply_cuda(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                 const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& residual,
                                 bool training, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const OptTensor& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, bool relu, bool need_residual_grad,
    bool need_param_grads);
#endif

}  // namespace fastres
