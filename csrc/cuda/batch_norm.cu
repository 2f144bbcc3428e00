// BatchNorm (+ residual) (+ ReLU) on the GPU: statistics by a deterministic two-level
// Welford reduction, a 128-bit vectorised apply (also the fused epilogue after a cuDNN
// convolution), running statistics updated on the device, and the fused backward.
//
// Level one: a block of 32 x 8 threads owns 32 channels and a fixed chunk of rows; each
// thread runs Welford over its rows, then the 8 partial triples are merged in a fixed
// order. Level two: one thread per channel merges the chunks in order. The chunking is a
// function of the shape only, so the bits never depend on scheduling; no atomics.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <utility>

#include "../fastres.h"
#include "../layout.h"
#include "common.cuh"

namespace fastres {

namespace {

using cuda::acc_t;
using cuda::channel_of;
using cuda::offset_of;
using cuda::Pack;

constexpr int kChannelsPerBlock = 32;
constexpr int kRowThreads = 8;

struct Chunking {
  int64_t rows_per_chunk, chunks;
};

Chunking chunking(const Layout& lay) {
  const int64_t channel_blocks = (lay.c + kChannelsPerBlock - 1) / kChannelsPerBlock;
  const int64_t target_chunks = std::max<int64_t>(1, 1024 / channel_blocks);
  int64_t rows = (lay.rows() + target_chunks - 1) / target_chunks;
  rows = std::max<int64_t>(rows, 64);
  return {rows, (lay.rows() + rows - 1) / rows};
}

// Chan et al.: merge (n_b, mean_b, m2_b) into (n, mean, m2).
template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A n_b, A mean_b, A m2_b) {
  const A total = n + n_b;
  if (total <= 0) return;
  const A delta = mean_b - mean;
  mean += delta * (n_b / total);
  m2 += m2_b + delta * delta * (n * n_b / total);
  n = total;
}

template <typename T, typename A>
__global__ void stats_partial_kernel(const T* __restrict__ x, A* __restrict__ part, int64_t R, int64_t C, int64_t L,
                                     bool channels_last, int64_t rows_per_chunk, int64_t chunks) {
  __shared__ A sh[3][kRowThreads][kChannelsPerBlock];
  const int64_t c = blockIdx.y * (int64_t)kChannelsPerBlock + threadIdx.x;
  const int64_t start = blockIdx.x * rows_per_chunk;
  const int64_t stop = start + rows_per_chunk < R ? start + rows_per_chunk : R;
  A n = 0, mean = 0, m2 = 0;
  if (c < C) {
    for (int64_t r = start + threadIdx.y; r < stop; r += kRowThreads) {
      const A v = static_cast<A>(x[offset_of(r, c, C, L, channels_last)]);
      n += 1;
      const A delta = v - mean;
      mean += delta / n;
      m2 += delta * (v - mean);
    }
  }
  sh[0][threadIdx.y][threadIdx.x] = n;
  sh[1][threadIdx.y][threadIdx.x] = mean;
  sh[2][threadIdx.y][threadIdx.x] = m2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int k = 1; k < kRowThreads; ++k)  // fixed order
      chan_merge(n, mean, m2, sh[0][k][threadIdx.x], sh[1][k][threadIdx.x], sh[2][k][threadIdx.x]);
    part[(0 * chunks + blockIdx.x) * C + c] = n;
    part[(1 * chunks + blockIdx.x) * C + c] = mean;
    part[(2 * chunks + blockIdx.x) * C + c] = m2;
  }
}

template <typename A, typename R_T>
__global__ void stats_finalize_kernel(const A* __restrict__ part, int64_t chunks, int64_t C, A* __restrict__ mean_out,
                                      A* __restrict__ invstd_out, R_T* running_mean, R_T* running_var,
                                      double momentum, double eps) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  A n = 0, mean = 0, m2 = 0;
  for (int64_t k = 0; k < chunks; ++k)  // fixed order: deterministic
    chan_merge(n, mean, m2, part[(0 * chunks + k) * C + c], part[(1 * chunks + k) * C + c],
               part[(2 * chunks + k) * C + c]);
  mean_out[c] = mean;
  invstd_out[c] = static_cast<A>(1) / sqrt(m2 / n + static_cast<A>(eps));
  if (running_mean != nullptr) {
    const A m = static_cast<A>(momentum);
    running_mean[c] = static_cast<R_T>((1 - m) * static_cast<A>(running_mean[c]) + m * mean);
    running_var[c] = static_cast<R_T>((1 - m) * static_cast<A>(running_var[c]) + m * m2 / (n - 1));
  }
}

template <typename T, typename A, int VEC>
__global__ void apply_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                             const A* __restrict__ scale, const A* __restrict__ shift, int64_t n, int64_t C, int64_t L,
                             bool channels_last, bool relu) {
  const int64_t packs = n / VEC;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < packs; p += (int64_t)gridDim.x * blockDim.x) {
    const Pack<T, VEC> px = reinterpret_cast<const Pack<T, VEC>*>(x)[p];
    Pack<T, VEC> pr;
    if (res != nullptr) pr = reinterpret_cast<const Pack<T, VEC>*>(res)[p];
    Pack<T, VEC> py;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = channel_of(p * VEC + k, C, L, channels_last);
      A v = static_cast<A>(px.v[k]) * scale[c] + shift[c];
      if (res != nullptr) v += static_cast<A>(pr.v[k]);
      py.v[k] = static_cast<T>(relu && v < 0 ? A(0) : v);
    }
    reinterpret_cast<Pack<T, VEC>*>(y)[p] = py;
  }
}

template <typename T, typename A>
__global__ void backward_partial_kernel(const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
                                        const A* __restrict__ mean, const A* __restrict__ invstd, A* __restrict__ part,
                                        int64_t R, int64_t C, int64_t L, bool channels_last, bool relu,
                                        int64_t rows_per_chunk, int64_t chunks) {
  __shared__ A sh[2][kRowThreads][kChannelsPerBlock];
  const int64_t c = blockIdx.y * (int64_t)kChannelsPerBlock + threadIdx.x;
  const int64_t start = blockIdx.x * rows_per_chunk;
  const int64_t stop = start + rows_per_chunk < R ? start + rows_per_chunk : R;
  A sum_g = 0, sum_gx = 0;
  if (c < C) {
    const A mu = mean[c], is = invstd[c];
    for (int64_t r = start + threadIdx.y; r < stop; r += kRowThreads) {
      const int64_t i = offset_of(r, c, C, L, channels_last);
      const A g = (!relu || static_cast<A>(y[i]) > 0) ? static_cast<A>(dy[i]) : A(0);
      sum_g += g;
      sum_gx += g * (static_cast<A>(x[i]) - mu) * is;
    }
  }
  sh[0][threadIdx.y][threadIdx.x] = sum_g;
  sh[1][threadIdx.y][threadIdx.x] = sum_gx;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int k = 1; k < kRowThreads; ++k) {  // fixed order
      sum_g += sh[0][k][threadIdx.x];
      sum_gx += sh[1][k][threadIdx.x];
    }
    part[(0 * chunks + blockIdx.x) * C + c] = sum_g;
    part[(1 * chunks + blockIdx.x) * C + c] = sum_gx;
  }
}

template <typename A>
__global__ void backward_finalize_kernel(const A* __restrict__ part, int64_t chunks, int64_t C, A* __restrict__ sum_g,
                                         A* __restrict__ sum_gx) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  double g = 0, gx = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    g += part[(0 * chunks + k) * C + c];
    gx += part[(1 * chunks + k) * C + c];
  }
  sum_g[c] = static_cast<A>(g);
  sum_gx[c] = static_cast<A>(gx);
}

template <typename T, typename A, int VEC>
__global__ void backward_apply_kernel(const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
                                      const A* __restrict__ mean, const A* __restrict__ invstd,
                                      const A* __restrict__ scale, const A* __restrict__ sum_g,
                                      const A* __restrict__ sum_gx, T* __restrict__ dx, T* __restrict__ dres,
                                      int64_t n, int64_t R, int64_t C, int64_t L, bool channels_last, bool relu,
                                      bool training) {
  const int64_t packs = n / VEC;
  const A inv_rows = static_cast<A>(1) / static_cast<A>(R);
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < packs; p += (int64_t)gridDim.x * blockDim.x) {
    const Pack<T, VEC> pdy = reinterpret_cast<const Pack<T, VEC>*>(dy)[p];
    const Pack<T, VEC> py = reinterpret_cast<const Pack<T, VEC>*>(y)[p];
    const Pack<T, VEC> px = reinterpret_cast<const Pack<T, VEC>*>(x)[p];
    Pack<T, VEC> pdx, pdres;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = channel_of(p * VEC + k, C, L, channels_last);
      const A g = (!relu || static_cast<A>(py.v[k]) > 0) ? static_cast<A>(pdy.v[k]) : A(0);
      pdres.v[k] = static_cast<T>(g);
      A d = scale[c] * g;
      if (training) {
        const A xhat = (static_cast<A>(px.v[k]) - mean[c]) * invstd[c];
        d = scale[c] * (g - sum_g[c] * inv_rows - xhat * sum_gx[c] * inv_rows);
      }
      pdx.v[k] = static_cast<T>(d);
    }
    reinterpret_cast<Pack<T, VEC>*>(dx)[p] = pdx;
    if (dres != nullptr) reinterpret_cast<Pack<T, VEC>*>(dres)[p] = pdres;
  }
}

at::ScalarType stats_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The per-channel affine of y = x * scale + shift, in the statistics' dtype.
std::pair<at::Tensor, at::Tensor> scale_shift(const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
                                              const at::Tensor& invstd) {
  at::Tensor scale = weight.has_value() && weight->defined() ? invstd * weight->to(invstd.scalar_type()) : invstd;
  at::Tensor shift = -mean * scale;
  if (bias.has_value() && bias->defined()) shift = shift + bias->to(invstd.scalar_type());
  return {scale.contiguous(), shift.contiguous()};
}

constexpr int kThreads = 256;

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& x_in, const OptTensor& running_mean,
                                                         const OptTensor& running_var, double momentum, double eps) {
  const Layout lay = layout_of(x_in);
  TORCH_CHECK(lay.rows() > 1, "batch_norm_stats: expected more than 1 value per channel");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense(x_in, format_of(x_in));
  const auto opts = x.options().dtype(stats_dtype(x));
  at::Tensor mean = at::empty({lay.c}, opts), invstd = at::empty({lay.c}, opts);
  const Chunking ch = chunking(lay);
  at::Tensor part = at::empty({3, ch.chunks, lay.c}, opts);
  const bool update = running_mean.has_value() && running_mean->defined();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_bn_stats_cuda", [&] {
    using A = acc_t<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ch.chunks), static_cast<unsigned>((lay.c + kChannelsPerBlock - 1) /
                                                                            kChannelsPerBlock));
    stats_partial_kernel<scalar_t, A><<<grid, dim3(kChannelsPerBlock, kRowThreads), 0, stream>>>(
        x.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), lay.rows(), lay.c, lay.l, lay.channels_last,
        ch.rows_per_chunk, ch.chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::ScalarType running_type = update ? running_mean->scalar_type() : x.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_type, "fastres_bn_finalize_cuda", [&] {
      stats_finalize_kernel<A, scalar_t><<<cuda::blocks_for(lay.c, 128), 128, 0, stream>>>(
          part.const_data_ptr<A>(), ch.chunks, lay.c, mean.mutable_data_ptr<A>(), invstd.mutable_data_ptr<A>(),
          update ? running_mean->mutable_data_ptr<scalar_t>() : nullptr,
          update ? running_var->mutable_data_ptr<scalar_t>() : nullptr, momentum, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {mean, invstd};
}

at::Tensor batch_norm_apply_cuda(const at::Tensor& x_in, const OptTensor& weight, const OptTensor& bias,
                                 const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& residual,
                                 bool /*training*/, bool relu) {
  const Layout lay = layout_of(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = format_of(x_in);
  const at::Tensor x = dense(x_in, format);
  const bool has_residual = residual.has_value() && residual->defined();
  const at::Tensor res = has_residual ? dense(residual->to(x.scalar_type()), format) : at::Tensor();
  const auto [scale, shift] = scale_shift(weight, bias, mean.to(stats_dtype(x)), invstd.to(stats_dtype(x)));
  at::Tensor y = at::empty_like(x, x.options(), format);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_bn_apply_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int VEC = cuda::vec_size<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pr = has_residual ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    const A* s = scale.const_data_ptr<A>();
    const A* t = shift.const_data_ptr<A>();
    if (cuda::can_vectorize<scalar_t>(n, {px, pr, py})) {
      apply_kernel<scalar_t, A, VEC><<<cuda::blocks_for(n / VEC, kThreads), kThreads, 0, stream>>>(
          px, pr, py, s, t, n, lay.c, lay.l, lay.channels_last, relu);
    } else {
      apply_kernel<scalar_t, A, 1><<<cuda::blocks_for(n, kThreads), kThreads, 0, stream>>>(
          px, pr, py, s, t, n, lay.c, lay.l, lay.channels_last, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& y_in, const at::Tensor& x_in, const OptTensor& weight,
    const at::Tensor& mean_in, const at::Tensor& invstd_in, bool training, bool relu, bool need_residual_grad,
    bool need_param_grads) {
  const Layout lay = layout_of(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = format_of(x_in);
  const at::Tensor x = dense(x_in, format), y = dense(y_in, format);
  const at::Tensor grad = dense(grad_in.to(x.scalar_type()), format);
  const auto opts = x.options().dtype(stats_dtype(x));
  const at::Tensor mean = mean_in.to(stats_dtype(x)).contiguous(), invstd = invstd_in.to(stats_dtype(x)).contiguous();
  const at::Tensor scale = scale_shift(weight, c10::nullopt, mean, invstd).first;
  at::Tensor dx = at::empty_like(x, x.options(), format);
  at::Tensor dres = need_residual_grad ? at::empty_like(x, x.options(), format) : at::empty({0}, x.options());
  at::Tensor sum_g = at::zeros_like(mean), sum_gx = at::zeros_like(mean);
  const int64_t n = x.numel();
  if (n == 0) return {dx, dres, sum_gx, sum_g};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_bn_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    if (training || need_param_grads) {
      const Chunking ch = chunking(lay);
      at::Tensor part = at::empty({2, ch.chunks, lay.c}, opts);
      const dim3 grid(static_cast<unsigned>(ch.chunks), static_cast<unsigned>((lay.c + kChannelsPerBlock - 1) /
                                                                              kChannelsPerBlock));
      backward_partial_kernel<scalar_t, A><<<grid, dim3(kChannelsPerBlock, kRowThreads), 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(), part.mutable_data_ptr<A>(), lay.rows(), lay.c, lay.l,
          lay.channels_last, relu, ch.rows_per_chunk, ch.chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_finalize_kernel<A><<<cuda::blocks_for(lay.c, 128), 128, 0, stream>>>(
          part.const_data_ptr<A>(), ch.chunks, lay.c, sum_g.mutable_data_ptr<A>(), sum_gx.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    constexpr int VEC = cuda::vec_size<scalar_t>();
    const scalar_t* pdy = grad.const_data_ptr<scalar_t>();
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    scalar_t* pdres = need_residual_grad ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      backward_apply_kernel<scalar_t, A, V><<<cuda::blocks_for(n / V, kThreads), kThreads, 0, stream>>>(
          pdy, py, px, mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(), scale.const_data_ptr<A>(),
          sum_g.const_data_ptr<A>(), sum_gx.const_data_ptr<A>(), pdx, pdres, n, lay.rows(), lay.c, lay.l,
          lay.channels_last, relu, training);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cuda::can_vectorize<scalar_t>(n, {pdy, py, px, pdx, pdres})) {
      launch(std::integral_constant<int, VEC>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {dx, dres, sum_gx, sum_g};
}

}  // namespace fastres
