// How the kernels address a 4-D activation: as (N, C, L = H*W), dense in one of two orders.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastres {

struct Layout {
  int64_t n, c, l;
  bool channels_last;  // offset = (n*L + l)*C + c; else offset = (n*C + c)*L + l
  int64_t rows() const { return n * l; }
  int64_t numel() const { return n * c * l; }
};

inline at::MemoryFormat format_of(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                      : at::MemoryFormat::Contiguous;
}

inline Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fastres: expected a 4-D (N, C, H, W) tensor; got ", x.dim(), "-D");
  return Layout{x.size(0), x.size(1), x.size(2) * x.size(3), format_of(x) == at::MemoryFormat::ChannelsLast};
}

// `t` dense in `format` (a no-op when it already is).
inline at::Tensor dense(const at::Tensor& t, at::MemoryFormat format) { return t.contiguous(format); }

}  // namespace fastres
