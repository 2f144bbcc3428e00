// relu(x + residual) and its backward (dy where y > 0) on the GPU: flat, 128-bit vectorised,
// grid-stride loops over the common dense storage order of the operands.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>

#include "../fastres.h"
#include "../layout.h"
#include "common.cuh"

namespace fastres {

namespace {

using cuda::acc_t;
using cuda::Pack;

template <typename T, int VEC, bool BACKWARD>
__global__ void add_relu_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n) {
  const int64_t packs = n / VEC;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < packs; p += (int64_t)gridDim.x * blockDim.x) {
    const Pack<T, VEC> pa = reinterpret_cast<const Pack<T, VEC>*>(a)[p];
    const Pack<T, VEC> pb = reinterpret_cast<const Pack<T, VEC>*>(b)[p];
    Pack<T, VEC> po;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if constexpr (BACKWARD) {  // a = dy, b = y
        po.v[k] = static_cast<acc_t<T>>(pb.v[k]) > 0 ? pa.v[k] : T(0);
      } else {
        const acc_t<T> s = static_cast<acc_t<T>>(pa.v[k]) + static_cast<acc_t<T>>(pb.v[k]);
        po.v[k] = static_cast<T>(s < 0 ? acc_t<T>(0) : s);  // NaN stays NaN, as in torch.relu
      }
    }
    reinterpret_cast<Pack<T, VEC>*>(out)[p] = po;
  }
}

template <bool BACKWARD>
at::Tensor launch(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& like) {
  TORCH_CHECK(a_in.sizes() == b_in.sizes(), "fastres: operands must have the same shape; got ", a_in.sizes(),
              " and ", b_in.sizes());
  const c10::cuda::CUDAGuard guard(like.device());
  const auto format = like.dim() == 4 ? format_of(like) : at::MemoryFormat::Contiguous;
  const at::Tensor a = a_in.to(like.scalar_type()).contiguous(format);
  const at::Tensor b = b_in.to(like.scalar_type()).contiguous(format);
  at::Tensor out = at::empty_like(a, a.options(), format);
  const int64_t n = a.numel();
  if (n == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "fastres_add_relu_cuda", [&] {
    constexpr int threads = 256;
    constexpr int VEC = cuda::vec_size<scalar_t>();
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (cuda::can_vectorize<scalar_t>(n, {pa, pb, po})) {
      add_relu_kernel<scalar_t, VEC, BACKWARD><<<cuda::blocks_for(n / VEC, threads), threads, 0, stream>>>(pa, pb, po, n);
    } else {
      add_relu_kernel<scalar_t, 1, BACKWARD><<<cuda::blocks_for(n, threads), threads, 0, stream>>>(pa, pb, po, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& residual) { return launch<false>(x, residual, x); }

at::Tensor relu_backward_cuda(const at::Tensor& grad, const at::Tensor& y) { return launch<true>(grad, y, y); }

}  // namespace fastres

namespace fastres {

std::vector<int> cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

}  // namespace fastres
