// What the Winograd op (winograd.cpp) and its kernels (winograd_kernel.h, compiled per instruction
// set by winograd_isas.cpp) share: the transform matrices, the
// problem geometry and the signature of one block's work. No code here, so nothing in this
// header is compiled for an instruction set the CPU may lack.
#pragma once

#include <cstdint>

namespace fastres {
namespace winograd {

constexpr int64_t kPanel = 32;  // output channels per packed weight panel (fastres/ops/winograd.py PANEL)
constexpr int64_t kRows = 6;    // tiles per GEMM micro-kernel call: 6 x 2 accumulator vectors

// F(MxM, 3x3): an (M+2)x(M+2) input tile d gives the MxM outputs A^T [(G g G^T) . (B^T d B)] A.
// M = 2: points 0, 1, -1 (only additions). M = 4: points 0, 1, -1, 2, -2 (Lavin and Gray's
// matrices; about 20x the rounding error of M = 2, still ~1e-5 relative).
template <int M>
struct Transform;
template <>
struct Transform<2> {
  static constexpr int kA = 4;
  static constexpr int64_t kMaxBlock = 96;  // tiles per block: V and M of a block stay in L2
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};
template <>
struct Transform<4> {
  static constexpr int kA = 6;
  static constexpr int64_t kMaxBlock = 48;
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

struct Geometry {
  int64_t n, h, w, cin, cout;
  int64_t tiles_h, tiles_w;  // output tiles of M x M per image
  int64_t tiles() const { return n * tiles_h * tiles_w; }
};

// One convolution's operands (channels_last float32; bias and residual may be null).
struct Problem {
  const float* x;
  const float* u;  // packed transformed weights: [(M+2)^2][cout / kPanel][cin][kPanel]
  const float* bias;
  const float* residual;
  bool relu;
  float* y;
  Geometry g;
};

// Tiles [first, first + count) of p: input transform into v, one GEMM per transform point into
// m, output transform with the epilogue into p.y. v and m are scratch of
// (M+2)^2 * block_rows * cin and (M+2)^2 * block_rows * cout floats, block_rows >= count a
// multiple of kRows.
using BlockFn = void (*)(const Problem& p, int64_t first, int64_t count, int64_t block_rows, float* v, float* m);

// The kernels winograd_isas.cpp defines: the function for output tile M (2 or 4), or null where the
// build has no such kernel (not x86-64, or a compiler without target attributes).
BlockFn avx512_block(int tile);
BlockFn avx2_block(int tile);

}  // namespace winograd
}  // namespace fastres
