// batch_norm_finalize on the CPU: the same formulas as the CUDA kernel, in ATen ops (a reference
// for the tests and for CPU tensors; the sums come from cuDNN's genstats on the GPU).
#include <ATen/ATen.h>

#include "../fastres.h"

namespace fastres {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_finalize_cpu(
    const at::Tensor& sum, const at::Tensor& sqsum, int64_t count, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
  TORCH_CHECK(count > 1, "batch_norm_finalize: expected more than 1 value per channel");
  TORCH_CHECK(sum.dim() == 1 && sqsum.sizes() == sum.sizes(), "batch_norm_finalize: sum and sqsum must be 1-D of C");
  const auto dtype = sum.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor s = sum.to(dtype), q = sqsum.to(dtype);
  const double n = static_cast<double>(count);
  at::Tensor mean = s / n;
  at::Tensor var = (q / n - mean * mean).clamp_min(0);  // biased: the normalisation's
  at::Tensor invstd = (var + eps).rsqrt();
  at::Tensor scale = weight.has_value() && weight->defined() ? invstd * weight->to(dtype) : invstd.clone();
  at::Tensor shift = -mean * scale;
  if (bias.has_value() && bias->defined()) shift = shift + bias->to(dtype);
  if (running_mean.has_value() && running_mean->defined()) {
    TORCH_CHECK(running_var.has_value() && running_var->defined(), "batch_norm_finalize: running_var missing");
    running_mean->copy_(running_mean->to(dtype) * (1 - momentum) + mean * momentum);
    running_var->copy_(running_var->to(dtype) * (1 - momentum) + var * (n / (n - 1)) * momentum);
  }
  return {mean, invstd, scale, shift};
}

}  // namespace fastres
