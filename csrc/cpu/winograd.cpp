// 3x3 convolution (stride 1, padding 1) by Winograd F(MxM, 3x3), M = 2 or 4, on x86-64 CPUs with
// AVX-512 or AVX2 + FMA, with the epilogue (bias, residual add, ReLU) fused into the output
// transform. This file is the operator: argument checks, the choice of instruction set, and the
// split of the tiles into blocks over the threads. The kernel is winograd_kernel.h, compiled for
// each instruction set by winograd_isas.cpp.
//
// Why: oneDNN's direct convolution runs near the fp32 peak with AVX-512 (and below it with AVX2),
// so the only way left to make a ResNet's 3x3 convolutions faster is fewer multiplies. F(MxM, 3x3) makes
// each MxM output tile from an (M+2)x(M+2) input tile with (M+2)^2 multiplies per channel pair
// instead of 9 M^2: 2.25x fewer for M = 2 (whose transforms only add and subtract, so fp32
// results stay within a few ulps of the direct sum), 4x fewer for M = 4 (about 20x the
// rounding error). fastres/ops/winograd.py picks M per layer and packs the transformed weights
// U as [alpha][cout/32][cin][32].
//
// Activations are channels_last float32 (N, H, W, C in memory); Cin % 16 == 0 and
// Cout % 32 == 0.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../fastres.h"
#include "winograd.h"

namespace fastres {

namespace {

using winograd::BlockFn;
using winograd::kPanel;
using winograd::kRows;

bool cpu_supports(const std::string& isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == "avx512") return __builtin_cpu_supports("avx512f");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return false;
}

// "auto": the widest instruction set this CPU and build have.
BlockFn block_function(std::string isa, int tile) {
  if (isa == "auto") isa = cpu_supports("avx512") ? "avx512" : "avx2";
  TORCH_CHECK(isa == "avx512" || isa == "avx2",
              "conv3x3_winograd: isa must be \"auto\", \"avx512\" or \"avx2\", got \"", isa, "\"");
  const BlockFn block = isa == "avx512" ? winograd::avx512_block(tile) : winograd::avx2_block(tile);
  TORCH_CHECK(block != nullptr && cpu_supports(isa), "conv3x3_winograd: this CPU or build has no ", isa,
              " kernel (it needs an x86-64 CPU with ", isa == "avx512" ? "AVX-512" : "AVX2 and FMA", ")");
  return block;
}

// Blocks of at most kMaxBlock tiles, a multiple of the thread count so no core idles at the end.
template <int M>
void run_blocks(const winograd::Problem& p, BlockFn block) {
  using T = winograd::Transform<M>;
  constexpr int64_t kAlphas = T::kA * T::kA;
  const int64_t tiles = p.g.tiles(), threads = at::get_num_threads();
  int64_t blocks = (tiles + T::kMaxBlock - 1) / T::kMaxBlock;
  blocks = (blocks + threads - 1) / threads * threads;
  const int64_t per_block = (tiles + blocks - 1) / blocks;
  blocks = (tiles + per_block - 1) / per_block;
  const int64_t block_rows = (per_block + kRows - 1) / kRows * kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(kAlphas * block_rows * p.g.cin), m(kAlphas * block_rows * p.g.cout);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * per_block, count = std::min(per_block, tiles - first);
      block(p, first, count, block_rows, v.data(), m.data());
    }
  });
}

}  // namespace

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const OptTensor& bias,
                                const OptTensor& residual, bool relu, std::string isa) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "conv3x3_winograd: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "conv3x3_winograd: x must be channels_last");
  TORCH_CHECK(packed_weight.dim() == 4 && (packed_weight.size(0) == 16 || packed_weight.size(0) == 36) &&
                  packed_weight.size(3) == kPanel && packed_weight.scalar_type() == at::kFloat &&
                  packed_weight.is_contiguous(),
              "conv3x3_winograd: packed_weight must be ((M+2)^2 for M = 2 or 4, Cout/32, Cin, 32) float32, from "
              "fastres.ops.winograd.pack_weight");
  const int tile = packed_weight.size(0) == 16 ? 2 : 4;
  const BlockFn block = block_function(std::move(isa), tile);
  const winograd::Geometry g{x.size(0), x.size(2), x.size(3), x.size(1), packed_weight.size(1) * kPanel,
                             (x.size(2) + tile - 1) / tile, (x.size(3) + tile - 1) / tile};
  TORCH_CHECK(packed_weight.size(2) == g.cin && g.cin % 16 == 0,
              "conv3x3_winograd: packed_weight has ", packed_weight.size(2), " input channels, x has ", g.cin,
              " (must be a multiple of 16)");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == g.cout && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous(),
                "conv3x3_winograd: bias must be a contiguous float32 vector of ", g.cout, " values");
    bias_data = bias->const_data_ptr<float>();
  }
  at::Tensor y = at::empty({g.n, g.cout, g.h, g.w}, x.options(), at::MemoryFormat::ChannelsLast);
  const float* residual_data = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->scalar_type() == at::kFloat &&
                    residual->is_contiguous(at::MemoryFormat::ChannelsLast),
                "conv3x3_winograd: residual must be a channels_last float32 tensor of shape ", y.sizes());
    residual_data = residual->const_data_ptr<float>();
  }
  if (g.tiles() == 0) return y;
  const winograd::Problem problem{x.const_data_ptr<float>(), packed_weight.const_data_ptr<float>(), bias_data,
                                  residual_data, relu, y.mutable_data_ptr<float>(), g};
  if (tile == 2) {
    run_blocks<2>(problem, block);
  } else {
    run_blocks<4>(problem, block);
  }
  return y;
}

}  // namespace fastres
