// relu(x + residual) on the CPU: one pass, vectorised, parallel over the flat storage.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <type_traits>

#include "../fastres.h"

namespace fastres {

namespace {

template <typename scalar_t>
void add_relu_kernel(const scalar_t* x, const scalar_t* residual, scalar_t* out, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  // Grain: enough elements per task that thread start-up is amortised.
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    const Vec zero(scalar_t(0));
    for (; i + Vec::size() <= end; i += Vec::size()) {
      Vec sum = Vec::loadu(x + i) + Vec::loadu(residual + i);
      at::vec::maximum(sum, zero).store(out + i);  // at::vec::maximum propagates NaN
    }
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for (; i < end; ++i) {
      const acc_t sum = static_cast<acc_t>(x[i]) + static_cast<acc_t>(residual[i]);
      out[i] = static_cast<scalar_t>(sum < 0 ? acc_t(0) : sum);  // NaN stays NaN, as in torch.relu
    }
  });
}

}  // namespace

at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& residual) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_relu: residual must have x's shape ", x.sizes(), "; got ",
              residual.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), "add_relu: residual must have x's dtype ",
              x.scalar_type(), "; got ", residual.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && residual.device().is_cpu(), "add_relu: expected CPU tensors");
  // Walk both operands in x's memory format so one flat loop covers NCHW and channels_last alike.
  const auto format = x.suggest_memory_format();
  const at::Tensor a = x.contiguous(format);
  const at::Tensor b = residual.contiguous(format);
  at::Tensor out = at::empty_like(a, a.options(), format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "fastres_add_relu_cpu", [&] {
    add_relu_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>(), a.numel());
  });
  return out;
}

at::Tensor relu_backward_cpu(const at::Tensor& grad, const at::Tensor& y) {
  TORCH_CHECK(grad.sizes() == y.sizes(), "relu_backward: grad must have y's shape");
  const auto format = y.suggest_memory_format();
  const at::Tensor g = grad.to(y.scalar_type()).contiguous(format);
  const at::Tensor out_ref = y.contiguous(format);
  at::Tensor dx = at::empty_like(out_ref, out_ref.options(), format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fastres_relu_backward_cpu", [&] {
    const scalar_t* gd = g.const_data_ptr<scalar_t>();
    const scalar_t* yd = out_ref.const_data_ptr<scalar_t>();
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, y.numel(), 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = static_cast<double>(yd[i]) > 0.0 ? gd[i] : scalar_t(0);
    });
  });
  return dx;
}

}  // namespace fastres
