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
using cuda::ChannelCursor;
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

// The statistics-style kernels: blocks of kChannelsPerBlock x kRowThreads threads, one row chunk by
// kChannelsPerBlock * V channels each, V channels per thread (a 128-bit vector, or 1).
inline dim3 chunk_grid(const Chunking& ch, int64_t channels, int v) {
  const int64_t per_block = kChannelsPerBlock * v;
  return dim3(static_cast<unsigned>(ch.chunks), static_cast<unsigned>((channels + per_block - 1) / per_block));
}

// launch(std::integral_constant<int, V>{}) with V = scalar_t's 128-bit vector width where `vectorize`
// (channels_last rows whose pointers and channel count allow it), else V = 1.
template <typename scalar_t, typename Launch>
void launch_by_vector_width(bool vectorize, Launch&& launch) {
  if (vectorize) {
    launch(std::integral_constant<int, cuda::vec_size<scalar_t>()>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// The elementwise kernels: launch(width, index) with the vector width as above and the index type
// (uint32_t where n elements fit 32 bits, else int64_t).
template <typename scalar_t, typename Launch>
void launch_by_width_and_index(bool vectorize, int64_t n, Launch&& launch) {
  launch_by_vector_width<scalar_t>(vectorize, [&](auto vec) {
    if (cuda::fits_32bit(n)) {
      launch(vec, uint32_t{});
    } else {
      launch(vec, int64_t{});
    }
  });
}

// Shared memory for `arrays` per-channel arrays of A staged once per block; 0 where they do not fit
// (the kernel then reads them from global memory).
template <typename A>
size_t staged_bytes(int64_t channels, int arrays) {
  const int64_t bytes = arrays * channels * static_cast<int64_t>(sizeof(A));
  return bytes <= cuda::kStagingBytes ? static_cast<size_t>(bytes) : 0;
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

// VEC > 1 (channels_last, C % VEC == 0, x 16-byte aligned): thread x owns VEC adjacent channels
// and reads them as one 128-bit load per row. Each channel sees the same rows in the same order
// and the same merges as with VEC = 1 (the chunking does not depend on VEC either): still a
// function of the shape only, deterministic.
template <typename T, typename A, int VEC>
__global__ void batch_norm_act_stats_kernel(const T* __restrict__ x, A* __restrict__ part, int64_t R, int64_t C, int64_t L,
                                     bool channels_last, int64_t rows_per_chunk, int64_t chunks) {
  __shared__ A sh[3][kRowThreads][kChannelsPerBlock * VEC];
  const int64_t c0 = (blockIdx.y * (int64_t)kChannelsPerBlock + threadIdx.x) * VEC;
  const int64_t start = blockIdx.x * rows_per_chunk;
  const int64_t stop = start + rows_per_chunk < R ? start + rows_per_chunk : R;
  A n = 0, mean[VEC], m2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) mean[k] = m2[k] = 0;
  if (c0 < C) {
    for (int64_t r = start + threadIdx.y; r < stop; r += kRowThreads) {
      Pack<T, VEC> px;
      if constexpr (VEC > 1) {
        px = *reinterpret_cast<const Pack<T, VEC>*>(x + r * C + c0);
      } else {
        px.v[0] = x[offset_of(r, c0, C, L, channels_last)];
      }
      n += 1;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A v = static_cast<A>(px.v[k]);
        const A delta = v - mean[k];
        mean[k] += delta / n;
        m2[k] += delta * (v - mean[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sh[0][threadIdx.y][threadIdx.x * VEC + k] = n;
    sh[1][threadIdx.y][threadIdx.x * VEC + k] = mean[k];
    sh[2][threadIdx.y][threadIdx.x * VEC + k] = m2[k];
  }
  __syncthreads();
  if (threadIdx.y == 0 && c0 < C) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = threadIdx.x * VEC + k;
      A nk = n, mk = mean[k], m2k = m2[k];
      for (int t = 1; t < kRowThreads; ++t)  // fixed order
        chan_merge(nk, mk, m2k, sh[0][t][j], sh[1][t][j], sh[2][t][j]);
      part[(0 * chunks + blockIdx.x) * C + c0 + k] = nk;
      part[(1 * chunks + blockIdx.x) * C + c0 + k] = mk;
      part[(2 * chunks + blockIdx.x) * C + c0 + k] = m2k;
    }
  }
}

template <typename A, typename R_T>
__global__ void batch_norm_act_finalize_kernel(const A* __restrict__ part, int64_t chunks, int64_t C, A* __restrict__ mean_out,
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

// Per-channel parameters are staged once per block in shared memory (when they fit: `stage`).
template <typename T, typename A, int VEC, typename I>
__global__ void batch_norm_act_apply_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                             const A* __restrict__ scale, const A* __restrict__ shift, I n, I C, I L,
                             bool channels_last, bool relu, bool stage) {
  extern __shared__ __align__(16) unsigned char smem[];
  const A* s = scale;
  const A* t = shift;
  if (stage) {
    A* sh = reinterpret_cast<A*>(smem);
    for (I c = threadIdx.x; c < C; c += blockDim.x) {
      sh[c] = scale[c];
      sh[C + c] = shift[c];
    }
    __syncthreads();
    s = sh;
    t = sh + C;
  }
  const I packs = n / VEC;
  for (I p = blockIdx.x * blockDim.x + threadIdx.x; p < packs; p += gridDim.x * blockDim.x) {
    const Pack<T, VEC> px = reinterpret_cast<const Pack<T, VEC>*>(x)[p];
    Pack<T, VEC> pr;
    if (res != nullptr) pr = reinterpret_cast<const Pack<T, VEC>*>(res)[p];
    Pack<T, VEC> py;
    ChannelCursor<I> cur(p * VEC, C, L, channels_last);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const I c = cur.c;
      A v = static_cast<A>(px.v[k]) * s[c] + t[c];
      if (res != nullptr) v += static_cast<A>(pr.v[k]);
      py.v[k] = static_cast<T>(relu && v < 0 ? A(0) : v);
      cur.next(C, L, channels_last);
    }
    reinterpret_cast<Pack<T, VEC>*>(y)[p] = py;
  }
}

// VEC > 1 as in batch_norm_act_stats_kernel: 128-bit loads of dy, y and x, the same sums per channel.
template <typename T, typename A, int VEC>
__global__ void batch_norm_act_backward_reduce_kernel(const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
                                        const A* __restrict__ mean, const A* __restrict__ invstd, A* __restrict__ part,
                                        int64_t R, int64_t C, int64_t L, bool channels_last, bool relu,
                                        int64_t rows_per_chunk, int64_t chunks) {
  __shared__ A sh[2][kRowThreads][kChannelsPerBlock * VEC];
  const int64_t c0 = (blockIdx.y * (int64_t)kChannelsPerBlock + threadIdx.x) * VEC;
  const int64_t start = blockIdx.x * rows_per_chunk;
  const int64_t stop = start + rows_per_chunk < R ? start + rows_per_chunk : R;
  A sum_g[VEC], sum_gx[VEC], mu[VEC], is[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sum_g[k] = sum_gx[k] = 0;
    mu[k] = c0 < C ? mean[c0 + k] : A(0);
    is[k] = c0 < C ? invstd[c0 + k] : A(0);
  }
  if (c0 < C) {
    for (int64_t r = start + threadIdx.y; r < stop; r += kRowThreads) {
      Pack<T, VEC> pdy, py, px;
      if constexpr (VEC > 1) {
        const int64_t i = r * C + c0;
        pdy = *reinterpret_cast<const Pack<T, VEC>*>(dy + i);
        py = *reinterpret_cast<const Pack<T, VEC>*>(y + i);
        px = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
      } else {
        const int64_t i = offset_of(r, c0, C, L, channels_last);
        pdy.v[0] = dy[i];
        py.v[0] = y[i];
        px.v[0] = x[i];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A g = (!relu || static_cast<A>(py.v[k]) > 0) ? static_cast<A>(pdy.v[k]) : A(0);
        sum_g[k] += g;
        sum_gx[k] += g * (static_cast<A>(px.v[k]) - mu[k]) * is[k];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sh[0][threadIdx.y][threadIdx.x * VEC + k] = sum_g[k];
    sh[1][threadIdx.y][threadIdx.x * VEC + k] = sum_gx[k];
  }
  __syncthreads();
  if (threadIdx.y == 0 && c0 < C) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = threadIdx.x * VEC + k;
      A g = sum_g[k], gx = sum_gx[k];
      for (int t = 1; t < kRowThreads; ++t) {  // fixed order
        g += sh[0][t][j];
        gx += sh[1][t][j];
      }
      part[(0 * chunks + blockIdx.x) * C + c0 + k] = g;
      part[(1 * chunks + blockIdx.x) * C + c0 + k] = gx;
    }
  }
}

template <typename A>
__global__ void batch_norm_act_backward_finalize_kernel(const A* __restrict__ part, int64_t chunks, int64_t C, A* __restrict__ sum_g,
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

// dx = scale * (g - sum_g / R - xhat * sum_gx / R) in training, scale * g in eval; the five
// per-channel arrays are staged once per block in shared memory when they fit (`stage`).
template <typename T, typename A, int VEC, typename I>
__global__ void batch_norm_act_backward_apply_kernel(const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
                                      const A* __restrict__ mean_g, const A* __restrict__ invstd_g,
                                      const A* __restrict__ scale_g, const A* __restrict__ sum_g_g,
                                      const A* __restrict__ sum_gx_g, T* __restrict__ dx, T* __restrict__ dres,
                                      I n, int64_t R, I C, I L, bool channels_last, bool relu, bool training,
                                      bool stage) {
  extern __shared__ __align__(16) unsigned char smem[];
  const A *mean = mean_g, *invstd = invstd_g, *scale = scale_g, *sum_g = sum_g_g, *sum_gx = sum_gx_g;
  if (stage) {
    A* sh = reinterpret_cast<A*>(smem);
    for (I c = threadIdx.x; c < C; c += blockDim.x) {
      sh[c] = mean_g[c];
      sh[C + c] = invstd_g[c];
      sh[2 * C + c] = scale_g[c];
      sh[3 * C + c] = sum_g_g[c];
      sh[4 * C + c] = sum_gx_g[c];
    }
    __syncthreads();
    mean = sh;
    invstd = sh + C;
    scale = sh + 2 * C;
    sum_g = sh + 3 * C;
    sum_gx = sh + 4 * C;
  }
  const I packs = n / VEC;
  const A inv_rows = static_cast<A>(1) / static_cast<A>(R);
  for (I p = blockIdx.x * blockDim.x + threadIdx.x; p < packs; p += gridDim.x * blockDim.x) {
    const Pack<T, VEC> pdy = reinterpret_cast<const Pack<T, VEC>*>(dy)[p];
    const Pack<T, VEC> py = reinterpret_cast<const Pack<T, VEC>*>(y)[p];
    const Pack<T, VEC> px = reinterpret_cast<const Pack<T, VEC>*>(x)[p];
    Pack<T, VEC> pdx, pdres;
    ChannelCursor<I> cur(p * VEC, C, L, channels_last);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const I c = cur.c;
      const A g = (!relu || static_cast<A>(py.v[k]) > 0) ? static_cast<A>(pdy.v[k]) : A(0);
      pdres.v[k] = static_cast<T>(g);
      A d = scale[c] * g;
      if (training) {
        const A xhat = (static_cast<A>(px.v[k]) - mean[c]) * invstd[c];
        d = scale[c] * (g - sum_g[c] * inv_rows - xhat * sum_gx[c] * inv_rows);
      }
      pdx.v[k] = static_cast<T>(d);
      cur.next(C, L, channels_last);
    }
    reinterpret_cast<Pack<T, VEC>*>(dx)[p] = pdx;
    if (dres != nullptr) reinterpret_cast<Pack<T, VEC>*>(dres)[p] = pdres;
  }
}

// batch_norm_finalize: one thread per channel, in double (sum-of-squares variance cancels).
template <typename A, typename S, typename R_T>
__global__ void batch_norm_finalize_kernel(const S* __restrict__ sum, const S* __restrict__ sqsum, int64_t C, double count,
                                     const A* __restrict__ weight, const A* __restrict__ bias, A* __restrict__ mean_out,
                                     A* __restrict__ invstd_out, A* __restrict__ scale_out, A* __restrict__ shift_out,
                                     R_T* running_mean, R_T* running_var, double momentum, double eps) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double mean = static_cast<double>(sum[c]) / count;
  double var = static_cast<double>(sqsum[c]) / count - mean * mean;
  var = var > 0 ? var : 0.0;
  const double invstd = 1.0 / sqrt(var + eps);
  const double scale = weight != nullptr ? invstd * static_cast<double>(weight[c]) : invstd;
  const double shift = (bias != nullptr ? static_cast<double>(bias[c]) : 0.0) - mean * scale;
  mean_out[c] = static_cast<A>(mean);
  invstd_out[c] = static_cast<A>(invstd);
  scale_out[c] = static_cast<A>(scale);
  shift_out[c] = static_cast<A>(shift);
  if (running_mean != nullptr) {
    running_mean[c] = static_cast<R_T>((1 - momentum) * static_cast<double>(running_mean[c]) + momentum * mean);
    running_var[c] = static_cast<R_T>((1 - momentum) * static_cast<double>(running_var[c]) +
                                      momentum * var * count / (count - 1));
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

std::tuple<at::Tensor, at::Tensor> batch_norm_act_stats_cuda(const at::Tensor& x_in, const OptTensor& running_mean,
                                                         const OptTensor& running_var, double momentum, double eps) {
  const Layout lay = layout_of(x_in);
  TORCH_CHECK(lay.rows() > 1, "batch_norm_act_stats: expected more than 1 value per channel");
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
    const bool vectorize = lay.channels_last && cuda::can_vectorize<scalar_t>(lay.c, {x.const_data_ptr()});
    launch_by_vector_width<scalar_t>(vectorize, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      batch_norm_act_stats_kernel<scalar_t, A, V><<<chunk_grid(ch, lay.c, V), dim3(kChannelsPerBlock, kRowThreads),
                                                    0, stream>>>(
          x.const_data_ptr<scalar_t>(), part.mutable_data_ptr<A>(), lay.rows(), lay.c, lay.l, lay.channels_last,
          ch.rows_per_chunk, ch.chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::ScalarType running_type = update ? running_mean->scalar_type() : x.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_type, "fastres_bn_finalize_cuda", [&] {
      batch_norm_act_finalize_kernel<A, scalar_t><<<cuda::blocks_for(lay.c, 128), 128, 0, stream>>>(
          part.const_data_ptr<A>(), ch.chunks, lay.c, mean.mutable_data_ptr<A>(), invstd.mutable_data_ptr<A>(),
          update ? running_mean->mutable_data_ptr<scalar_t>() : nullptr,
          update ? running_var->mutable_data_ptr<scalar_t>() : nullptr, momentum, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {mean, invstd};
}

at::Tensor batch_norm_act_apply_cuda(const at::Tensor& x_in, const OptTensor& weight, const OptTensor& bias,
                                 const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& residual,
                                 bool /*training*/, bool relu) {
  const Layout lay = layout_of(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto format = format_of(x_in);
  const at::Tensor x = dense(x_in, format);
  const bool has_residual = residual.has_value() && residual->defined();
  const at::Tensor res = has_residual ? dense(residual->to(x.scalar_type()), format) : at::Tensor();
  // A pair, not a structured binding: the lambda below captures it (capturing bindings is C++20).
  const std::pair<at::Tensor, at::Tensor> affine =
      scale_shift(weight, bias, mean.to(stats_dtype(x)), invstd.to(stats_dtype(x)));
  const at::Tensor& scale = affine.first;
  const at::Tensor& shift = affine.second;
  at::Tensor y = at::empty_like(x, x.options(), format);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_bn_apply_cuda", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pr = has_residual ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    const A* s = scale.const_data_ptr<A>();
    const A* t = shift.const_data_ptr<A>();
    const size_t smem = staged_bytes<A>(lay.c, 2);  // scale, shift
    const bool stage = smem > 0;
    auto launch = [&](auto vec, auto index) {
      constexpr int V = decltype(vec)::value;
      using I = decltype(index);
      batch_norm_act_apply_kernel<scalar_t, A, V, I><<<cuda::blocks_for(n / V, kThreads), kThreads, smem, stream>>>(
          px, pr, py, s, t, static_cast<I>(n), static_cast<I>(lay.c), static_cast<I>(lay.l), lay.channels_last, relu,
          stage);
    };
    launch_by_width_and_index<scalar_t>(cuda::can_vectorize<scalar_t>(n, {px, pr, py}), n, launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cuda(
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
      const bool vectorize = lay.channels_last && cuda::can_vectorize<scalar_t>(
                                                      lay.c, {grad.const_data_ptr(), y.const_data_ptr(),
                                                              x.const_data_ptr()});
      launch_by_vector_width<scalar_t>(vectorize, [&](auto vec) {
        constexpr int V = decltype(vec)::value;
        batch_norm_act_backward_reduce_kernel<scalar_t, A, V>
            <<<chunk_grid(ch, lay.c, V), dim3(kChannelsPerBlock, kRowThreads), 0, stream>>>(
                grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(), part.mutable_data_ptr<A>(), lay.rows(), lay.c,
                lay.l, lay.channels_last, relu, ch.rows_per_chunk, ch.chunks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      batch_norm_act_backward_finalize_kernel<A><<<cuda::blocks_for(lay.c, 128), 128, 0, stream>>>(
          part.const_data_ptr<A>(), ch.chunks, lay.c, sum_g.mutable_data_ptr<A>(), sum_gx.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const scalar_t* pdy = grad.const_data_ptr<scalar_t>();
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    scalar_t* pdres = need_residual_grad ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    const size_t smem = staged_bytes<A>(lay.c, 5);  // mean, invstd, scale, sum_g, sum_gx
    const bool stage = smem > 0;
    auto launch = [&](auto vec, auto index) {
      constexpr int V = decltype(vec)::value;
      using I = decltype(index);
      batch_norm_act_backward_apply_kernel<scalar_t, A, V, I><<<cuda::blocks_for(n / V, kThreads), kThreads, smem, stream>>>(
          pdy, py, px, mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(), scale.const_data_ptr<A>(),
          sum_g.const_data_ptr<A>(), sum_gx.const_data_ptr<A>(), pdx, pdres, static_cast<I>(n), lay.rows(),
          static_cast<I>(lay.c), static_cast<I>(lay.l), lay.channels_last, relu, training, stage);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch_by_width_and_index<scalar_t>(cuda::can_vectorize<scalar_t>(n, {pdy, py, px, pdx, pdres}), n, launch);
  });
  return {dx, dres, sum_gx, sum_g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_finalize_cuda(
    const at::Tensor& sum_in, const at::Tensor& sqsum_in, int64_t count, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var, double momentum,
    double eps) {
  TORCH_CHECK(count > 1, "batch_norm_finalize: expected more than 1 value per channel");
  TORCH_CHECK(sum_in.dim() == 1 && sqsum_in.sizes() == sum_in.sizes(),
              "batch_norm_finalize: sum and sqsum must be 1-D of C");
  const c10::cuda::CUDAGuard guard(sum_in.device());
  const auto dtype = sum_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor sum = sum_in.to(dtype).contiguous(), sqsum = sqsum_in.to(dtype).contiguous();
  const int64_t C = sum.numel();
  const auto opts = sum.options();
  at::Tensor mean = at::empty({C}, opts), invstd = at::empty({C}, opts), scale = at::empty({C}, opts),
             shift = at::empty({C}, opts);
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  const at::Tensor w = has_w ? weight->to(dtype).contiguous() : at::Tensor();
  const at::Tensor b = has_b ? bias->to(dtype).contiguous() : at::Tensor();
  const bool update = running_mean.has_value() && running_mean->defined();
  TORCH_CHECK(!update || (running_var.has_value() && running_var->defined() && running_mean->is_contiguous() &&
                          running_var->is_contiguous() && running_mean->numel() == C && running_var->numel() == C),
              "batch_norm_finalize: running_mean and running_var must both be given, contiguous, of C entries");
  if (C == 0) return {mean, invstd, scale, shift};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastres_bn_finalize_sums", [&] {
    using A = scalar_t;
    const at::ScalarType running_type = update ? running_mean->scalar_type() : dtype;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_type, "fastres_bn_finalize_running", [&] {
      batch_norm_finalize_kernel<A, A, scalar_t><<<cuda::blocks_for(C, 128), 128, 0, stream>>>(
          sum.const_data_ptr<A>(), sqsum.const_data_ptr<A>(), C, static_cast<double>(count),
          has_w ? w.const_data_ptr<A>() : nullptr, has_b ? b.const_data_ptr<A>() : nullptr,
          mean.mutable_data_ptr<A>(), invstd.mutable_data_ptr<A>(), scale.mutable_data_ptr<A>(),
          shift.mutable_data_ptr<A>(), update ? running_mean->mutable_data_ptr<scalar_t>() : nullptr,
          update ? running_var->mutable_data_ptr<scalar_t>() : nullptr, momentum, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {mean, invstd, scale, shift};
}

}  // namespace fastres
