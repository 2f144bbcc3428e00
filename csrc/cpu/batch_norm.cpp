// BatchNorm (+ residual) (+ ReLU) on the CPU: statistics, apply (also the fused conv
// epilogue) and the fused backward. Reductions accumulate in double over a fixed chunking
// of the rows and merge the chunks in order, so results never depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>

#include <array>
#include <cmath>
#include <vector>

#include "../fastres.h"
#include "../layout.h"

namespace fastres {

namespace {

constexpr int64_t kRowsPerChunk = 256;

// Per-channel sums of K values produced by value(offset, c) for every element; K*C doubles.
template <int K, typename F>
std::vector<double> reduce_per_channel(const Layout& lay, const F& value) {
  std::vector<double> total(K * lay.c, 0.0);
  if (lay.channels_last) {
    const int64_t chunks = (lay.rows() + kRowsPerChunk - 1) / kRowsPerChunk;
    std::vector<double> partial(chunks * K * lay.c, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        double* acc = partial.data() + chunk * K * lay.c;
        const int64_t last = std::min(lay.rows(), (chunk + 1) * kRowsPerChunk);
        for (int64_t row = chunk * kRowsPerChunk; row < last; ++row) {
          for (int64_t c = 0; c < lay.c; ++c) {
            const std::array<double, K> v = value(row * lay.c + c, c);
            for (int k = 0; k < K; ++k) acc[k * lay.c + c] += v[k];
          }
        }
      }
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk)  // fixed order: deterministic
      for (int64_t i = 0; i < K * lay.c; ++i) total[i] += partial[chunk * K * lay.c + i];
  } else {
    at::parallel_for(0, lay.c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        std::array<double, K> acc{};
        for (int64_t n = 0; n < lay.n; ++n) {
          const int64_t base = (n * lay.c + c) * lay.l;
          for (int64_t l = 0; l < lay.l; ++l) {
            const std::array<double, K> v = value(base + l, c);
            for (int k = 0; k < K; ++k) acc[k] += v[k];
          }
        }
        for (int k = 0; k < K; ++k) total[k * lay.c + c] = acc[k];
      }
    });
  }
  return total;
}

// Calls fn(offset, c) for every element, in parallel.
template <typename F>
void for_each_element(const Layout& lay, const F& fn) {
  if (lay.channels_last) {
    at::parallel_for(0, lay.rows(), std::max<int64_t>(1, 16384 / std::max<int64_t>(lay.c, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t row = begin; row < end; ++row)
                         for (int64_t c = 0; c < lay.c; ++c) fn(row * lay.c + c, c);
                     });
  } else {
    at::parallel_for(0, lay.n * lay.c, std::max<int64_t>(1, 16384 / std::max<int64_t>(lay.l, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t plane = begin; plane < end; ++plane)
                         for (int64_t l = 0; l < lay.l; ++l) fn(plane * lay.l + l, plane % lay.c);
                     });
  }
}

// Per-channel values are held in double on the host; statistics tensors are fp32, or fp64 for
// fp64 activations (so float64 gradchecks see the exact math).
at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<double> double_vector(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

// An optional per-channel parameter, or `fill` when it is absent.
std::vector<double> channel_values(const OptTensor& t, int64_t c, double fill) {
  return t.has_value() && t->defined() ? double_vector(*t) : std::vector<double>(c, fill);
}

// The fp32 apply, vectorised with at::vec along the contiguous dimension: channels for
// channels_last rows (per-channel vectors of scale/shift), spatial positions for NCHW planes.
void apply_float(const Layout& lay, const float* in, const float* res, float* out, const std::vector<float>& scale,
                 const std::vector<float>& shift, bool relu) {
  using Vec = at::vec::Vectorized<float>;
  const Vec zero(0.f);
  auto run = [&](int64_t base, int64_t count, const float* s, const float* t, float s1, float t1) {
    int64_t i = 0;
    for (; i + Vec::size() <= count; i += Vec::size()) {
      const Vec vs = s ? Vec::loadu(s + i) : Vec(s1);
      const Vec vt = t ? Vec::loadu(t + i) : Vec(t1);
      Vec v = Vec::loadu(in + base + i) * vs + vt;
      if (res) v = v + Vec::loadu(res + base + i);
      if (relu) v = at::vec::maximum(v, zero);
      v.store(out + base + i);
    }
    for (; i < count; ++i) {
      float v = in[base + i] * (s ? s[i] : s1) + (t ? t[i] : t1);
      if (res) v += res[base + i];
      out[base + i] = relu && v < 0.f ? 0.f : v;
    }
  };
  if (lay.channels_last) {
    at::parallel_for(0, lay.rows(), std::max<int64_t>(1, 16384 / std::max<int64_t>(lay.c, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t row = begin; row < end; ++row)
                         run(row * lay.c, lay.c, scale.data(), shift.data(), 0.f, 0.f);
                     });
  } else {
    at::parallel_for(0, lay.n * lay.c, std::max<int64_t>(1, 16384 / std::max<int64_t>(lay.l, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t plane = begin; plane < end; ++plane) {
                         const int64_t c = plane % lay.c;
                         run(plane * lay.l, lay.l, nullptr, nullptr, scale[c], shift[c]);
                       }
                     });
  }
}

at::Tensor stats_tensor(const std::vector<double>& values, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(values.begin(), values.end(), out.mutable_data_ptr<double>());
  return out.to(dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_act_stats_cpu(const at::Tensor& x_in, const OptTensor& running_mean,
                                                        const OptTensor& running_var, double momentum, double eps) {
  const Layout lay = layout_of(x_in);
  TORCH_CHECK(lay.rows() > 1, "batch_norm_act_stats: expected more than 1 value per channel");
  const at::Tensor x = dense(x_in, format_of(x_in));
  std::vector<double> mean(lay.c), invstd(lay.c), unbiased(lay.c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_bn_stats_cpu", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    const auto sums = reduce_per_channel<1>(lay, [&](int64_t i, int64_t) {
      return std::array<double, 1>{static_cast<double>(data[i])};
    });
    std::vector<double> mu(lay.c);
    for (int64_t c = 0; c < lay.c; ++c) mu[c] = sums[c] / lay.rows();
    // Second pass around the mean: no cancellation, whatever the data's offset.
    const auto m2 = reduce_per_channel<1>(lay, [&](int64_t i, int64_t c) {
      const double d = static_cast<double>(data[i]) - mu[c];
      return std::array<double, 1>{d * d};
    });
    for (int64_t c = 0; c < lay.c; ++c) {
      mean[c] = mu[c];
      invstd[c] = 1.0 / std::sqrt(m2[c] / lay.rows() + eps);
      unbiased[c] = m2[c] / (lay.rows() - 1);
    }
  });
  at::Tensor mean_t = stats_tensor(mean, stats_dtype(x)), invstd_t = stats_tensor(invstd, stats_dtype(x));
  if (running_mean.has_value() && running_mean->defined()) {
    running_mean->mul_(1.0 - momentum).add_(mean_t.to(running_mean->scalar_type()), momentum);
  }
  if (running_var.has_value() && running_var->defined()) {
    running_var->mul_(1.0 - momentum).add_(stats_tensor(unbiased, running_var->scalar_type()), momentum);
  }
  return {mean_t, invstd_t};
}

at::Tensor batch_norm_act_apply_cpu(const at::Tensor& x_in, const OptTensor& weight, const OptTensor& bias,
                                const at::Tensor& mean_t, const at::Tensor& invstd_t, const OptTensor& residual,
                                bool /*training*/, bool relu) {
  const Layout lay = layout_of(x_in);
  const auto format = format_of(x_in);
  const at::Tensor x = dense(x_in, format);
  const bool has_residual = residual.has_value() && residual->defined();
  const at::Tensor res = has_residual ? dense(residual->to(x.scalar_type()), format) : at::Tensor();
  const auto mean = double_vector(mean_t), invstd = double_vector(invstd_t);
  const auto gamma = channel_values(weight, lay.c, 1.0), beta = channel_values(bias, lay.c, 0.0);
  std::vector<double> scale(lay.c), shift(lay.c);
  for (int64_t c = 0; c < lay.c; ++c) {
    scale[c] = invstd[c] * gamma[c];
    shift[c] = beta[c] - mean[c] * scale[c];
  }
  at::Tensor y = at::empty_like(x, x.options(), format);
  if (x.scalar_type() == at::kFloat) {
    const std::vector<float> scale_f(scale.begin(), scale.end()), shift_f(shift.begin(), shift.end());
    apply_float(lay, x.const_data_ptr<float>(), has_residual ? res.const_data_ptr<float>() : nullptr,
                y.mutable_data_ptr<float>(), scale_f, shift_f, relu);
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_bn_apply_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* r = has_residual ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    for_each_element(lay, [&](int64_t i, int64_t c) {
      acc_t v = static_cast<acc_t>(in[i]) * static_cast<acc_t>(scale[c]) + static_cast<acc_t>(shift[c]);
      if (r) v += static_cast<acc_t>(r[i]);
      out[i] = static_cast<scalar_t>(relu && v < 0 ? acc_t(0) : v);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& y_in, const at::Tensor& x_in, const OptTensor& weight,
    const at::Tensor& mean_t, const at::Tensor& invstd_t, bool training, bool relu, bool need_residual_grad,
    bool need_param_grads) {
  const Layout lay = layout_of(x_in);
  const auto format = format_of(x_in);
  const at::Tensor x = dense(x_in, format), grad = dense(grad_in.to(x.scalar_type()), format);
  const at::Tensor y = dense(y_in, format);
  const auto mean = double_vector(mean_t), invstd = double_vector(invstd_t);
  const auto gamma = channel_values(weight, lay.c, 1.0);
  at::Tensor dx = at::empty_like(x, x.options(), format);
  at::Tensor dres = need_residual_grad ? at::empty_like(x, x.options(), format) : at::empty({0}, x.options());
  std::vector<double> sum_g(lay.c, 0.0), sum_gx(lay.c, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastres_bn_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* g_in = grad.const_data_ptr<scalar_t>();
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    auto masked = [&](int64_t i) -> acc_t {
      return (!relu || static_cast<acc_t>(y_data[i]) > 0) ? static_cast<acc_t>(g_in[i]) : acc_t(0);
    };
    if (training || need_param_grads) {
      const auto sums = reduce_per_channel<2>(lay, [&](int64_t i, int64_t c) {
        const double g = masked(i);
        const double xhat = (static_cast<double>(x_data[i]) - mean[c]) * invstd[c];
        return std::array<double, 2>{g, g * xhat};
      });
      for (int64_t c = 0; c < lay.c; ++c) {
        sum_g[c] = sums[c];
        sum_gx[c] = sums[lay.c + c];
      }
    }
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    scalar_t* dres_data = need_residual_grad ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    const double rows = static_cast<double>(lay.rows());
    for_each_element(lay, [&](int64_t i, int64_t c) {
      const acc_t g = masked(i);
      if (dres_data) dres_data[i] = static_cast<scalar_t>(g);
      const acc_t scale = static_cast<acc_t>(invstd[c] * gamma[c]);
      acc_t d = scale * g;
      if (training) {
        const acc_t xhat = (static_cast<acc_t>(x_data[i]) - static_cast<acc_t>(mean[c])) * static_cast<acc_t>(invstd[c]);
        d = scale * (g - static_cast<acc_t>(sum_g[c] / rows) - xhat * static_cast<acc_t>(sum_gx[c] / rows));
      }
      dx_data[i] = static_cast<scalar_t>(d);
    });
  });
  return {dx, dres, stats_tensor(sum_gx, stats_dtype(x)), stats_tensor(sum_g, stats_dtype(x))};
}

}  // namespace fastres
