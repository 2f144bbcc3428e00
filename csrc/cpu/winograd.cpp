// 3x3 convolution (stride 1, padding 1) by Winograd F(MxM, 3x3), M = 2 or 4, on AVX-512 CPUs,
// with the epilogue (bias, residual add, ReLU) fused into the output transform.
//
// Why: on the CPU, oneDNN's direct convolution already runs near the fp32 peak, so the only
// way left to make a ResNet's 3x3 convolutions faster is fewer multiplies. F(MxM, 3x3) makes
// each MxM output tile from an (M+2)x(M+2) input tile with (M+2)^2 multiplies per channel pair
// instead of 9 M^2: 2.25x fewer for M = 2 (whose transforms only add and subtract, so fp32
// results stay within a few ulps of the direct sum), 4x fewer for M = 4 (about 20x the
// rounding error). fastres/ops/winograd.py picks M per layer.
//
// How: tiles are processed in blocks, one block per task. For a block, the input transform
// writes V[alpha][tile][cin] (alpha = the (M+2)^2 transform points), one GEMM per alpha
// multiplies it by the pre-transformed weights U[alpha] (packed by fastres/ops/winograd.py as
// [alpha][cout/32][cin][32]), and the output transform turns the products of each tile back
// into MxM outputs. A block's V and M stay in this core's cache, so no transformed tensor ever
// goes to memory (a whole-layer transform would move several times the activations through
// DRAM and lose the gain).
//
// Activations are channels_last float32 (N, H, W, C in memory); Cin % 16 == 0 and
// Cout % 32 == 0. The kernel functions carry the avx512f target attribute themselves (the
// rest of the library builds for the baseline ISA); the op refuses to run on a CPU without
// AVX-512, and fastres/ops/winograd.py only calls it where torch reports AVX-512.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <immintrin.h>

#include "../fastres.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTRES_HAS_AVX512_KERNEL 1
#define FASTRES_AVX512 __attribute__((target("avx512f,fma")))
#else
#define FASTRES_HAS_AVX512_KERNEL 0
#endif

namespace fastres {

namespace {

constexpr int64_t kPanel = 32;  // output channels per GEMM panel (two 16-float vectors)
constexpr int64_t kRows = 6;    // tiles per GEMM micro-kernel call: 12 accumulators

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
  int64_t tile;  // M
  int64_t tiles_h, tiles_w;
  int64_t tiles() const { return n * tiles_h * tiles_w; }
};

#if FASTRES_HAS_AVX512_KERNEL

// sum_k coef[k] * v[k * stride]: zero coefficients skipped, +-1 as additions (the loops are
// unrolled over constant tables, so this folds to the few operations each row needs).
template <int N>
FASTRES_AVX512 inline __m512 combine(const float (&coef)[N], const __m512* v, int stride) {
  __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int k = 0; k < N; ++k) {
    const float c = coef[k];
    if (c == 1.0f) {
      acc = _mm512_add_ps(acc, v[k * stride]);
    } else if (c == -1.0f) {
      acc = _mm512_sub_ps(acc, v[k * stride]);
    } else if (c != 0.0f) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(c), v[k * stride], acc);
    }
  }
  return acc;
}

// V[alpha][row][c..c+16] = (B^T d B)[alpha] for the input tile of one output tile; zero outside
// the image (the convolution's padding).
template <int M>
FASTRES_AVX512 void input_transform(const float* x, const Geometry& g, int64_t tile, float* v, int64_t row,
                                    int64_t block_rows) {
  using T = Transform<M>;
  constexpr int A = T::kA;
  const int64_t tx = tile % g.tiles_w, ty = (tile / g.tiles_w) % g.tiles_h, n = tile / (g.tiles_w * g.tiles_h);
  const int64_t y0 = M * ty - 1, x0 = M * tx - 1;
  const float* image = x + n * g.h * g.w * g.cin;
  const int64_t alpha_stride = block_rows * g.cin;
  for (int64_t c = 0; c < g.cin; c += 16) {
    __m512 d[A][A];
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i) {
      const int64_t yy = y0 + i;
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) {
        const int64_t xx = x0 + j;
        d[i][j] = (yy >= 0 && yy < g.h && xx >= 0 && xx < g.w) ? _mm512_loadu_ps(image + (yy * g.w + xx) * g.cin + c)
                                                                 : _mm512_setzero_ps();
      }
    }
    __m512 t[A][A];  // B^T d
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) t[i][j] = combine(T::BT[i], &d[0][j], A);
    float* out = v + row * g.cin + c;
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i)  // (B^T d) B
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) _mm512_storeu_ps(out + (i * A + j) * alpha_stride, combine(T::BT[j], &t[i][0], 1));
  }
}

// m[r][0..32] = sum_k a[r][k] * b[k][0..32] for kRows rows: a has row stride lda, b is one
// packed panel (k-major, 32 floats per k), m has row stride ldm.
FASTRES_AVX512 void gemm_rows(const float* a, int64_t lda, const float* b, int64_t k_count, float* m,
                              int64_t ldm) {
  __m512 acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_count; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kPanel);
    const __m512 b1 = _mm512_loadu_ps(b + k * kPanel + 16);
    for (int r = 0; r < kRows; ++r) {
      const __m512 a_rk = _mm512_set1_ps(a[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(a_rk, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a_rk, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(m + r * ldm, acc[r][0]);
    _mm512_storeu_ps(m + r * ldm + 16, acc[r][1]);
  }
}

// The MxM outputs of one tile from its (M+2)^2 products, plus bias and residual, then ReLU.
template <int M>
FASTRES_AVX512 void output_transform(const float* m, int64_t row, int64_t block_rows, const Geometry& g,
                                     int64_t tile, const float* bias, const float* residual, bool relu,
                                     float* y) {
  using T = Transform<M>;
  constexpr int A = T::kA;
  const int64_t tx = tile % g.tiles_w, ty = (tile / g.tiles_w) % g.tiles_h, n = tile / (g.tiles_w * g.tiles_h);
  const int64_t alpha_stride = block_rows * g.cout;
  const int64_t rows_here = std::min<int64_t>(M, g.h - M * ty), cols_here = std::min<int64_t>(M, g.w - M * tx);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t c = 0; c < g.cout; c += 16) {
    const float* in = m + row * g.cout + c;
    __m512 p[A][A];
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) p[i][j] = _mm512_loadu_ps(in + (i * A + j) * alpha_stride);
    __m512 s[M][A];  // A^T p
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) s[i][j] = combine(T::AT[i], &p[0][j], A);
    const __m512 b = bias ? _mm512_loadu_ps(bias + c) : zero;
    for (int i = 0; i < rows_here; ++i) {
      for (int j = 0; j < cols_here; ++j) {
        const int64_t offset = ((n * g.h + M * ty + i) * g.w + M * tx + j) * g.cout + c;
        __m512 value = _mm512_add_ps(combine(T::AT[j], &s[i][0], 1), b);  // (A^T p) A
        if (residual) value = _mm512_add_ps(value, _mm512_loadu_ps(residual + offset));
        // max(0, value) returns its second operand when either is NaN: NaN stays NaN, as in torch.relu.
        if (relu) value = _mm512_max_ps(zero, value);
        _mm512_storeu_ps(y + offset, value);
      }
    }
  }
}

// One block of tiles [first, first + count): input transform, (M+2)^2 GEMMs, output transform.
// v and m are this task's scratch, block_rows (count rounded up to kRows) rows per alpha.
template <int M>
FASTRES_AVX512 void winograd_block(const float* x, const float* u, const float* bias, const float* residual,
                                   bool relu, float* y, const Geometry& g, int64_t first, int64_t count,
                                   int64_t block_rows, float* v, float* m) {
  constexpr int64_t kAlphas = Transform<M>::kA * Transform<M>::kA;
  for (int64_t r = 0; r < count; ++r) input_transform<M>(x, g, first + r, v, r, block_rows);
  for (int64_t alpha = 0; alpha < kAlphas; ++alpha)  // rows past `count` only need to be finite
    for (int64_t r = count; r < block_rows; ++r)
      std::fill_n(v + (alpha * block_rows + r) * g.cin, g.cin, 0.0f);
  const int64_t panels = g.cout / kPanel;
  for (int64_t alpha = 0; alpha < kAlphas; ++alpha) {
    const float* a = v + alpha * block_rows * g.cin;
    float* product = m + alpha * block_rows * g.cout;
    for (int64_t panel = 0; panel < panels; ++panel) {
      const float* b = u + (alpha * panels + panel) * g.cin * kPanel;
      for (int64_t r = 0; r < block_rows; r += kRows)
        gemm_rows(a + r * g.cin, g.cin, b, g.cin, product + r * g.cout + panel * kPanel, g.cout);
    }
  }
  for (int64_t r = 0; r < count; ++r) output_transform<M>(m, r, block_rows, g, first + r, bias, residual, relu, y);
}

// Blocks of at most kMaxBlock tiles, a multiple of the thread count so no core idles at the end.
template <int M>
void winograd_conv(const float* x, const float* u, const float* bias, const float* residual, bool relu, float* y,
                   const Geometry& g) {
  constexpr int64_t kAlphas = Transform<M>::kA * Transform<M>::kA, kMaxBlock = Transform<M>::kMaxBlock;
  const int64_t threads = at::get_num_threads();
  int64_t blocks = (g.tiles() + kMaxBlock - 1) / kMaxBlock;
  blocks = (blocks + threads - 1) / threads * threads;
  const int64_t per_block = (g.tiles() + blocks - 1) / blocks;
  blocks = (g.tiles() + per_block - 1) / per_block;
  const int64_t block_rows = (per_block + kRows - 1) / kRows * kRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(kAlphas * block_rows * g.cin), m(kAlphas * block_rows * g.cout);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * per_block, count = std::min(per_block, g.tiles() - first);
      winograd_block<M>(x, u, bias, residual, relu, y, g, first, count, block_rows, v.data(), m.data());
    }
  });
}

#endif  // FASTRES_HAS_AVX512_KERNEL

bool cpu_has_avx512() {
#if FASTRES_HAS_AVX512_KERNEL
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

}  // namespace

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const OptTensor& bias,
                                const OptTensor& residual, bool relu) {
  TORCH_CHECK(cpu_has_avx512(), "conv3x3_winograd: this CPU has no AVX-512");
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "conv3x3_winograd: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "conv3x3_winograd: x must be channels_last");
  TORCH_CHECK(packed_weight.dim() == 4 && (packed_weight.size(0) == 16 || packed_weight.size(0) == 36) &&
                  packed_weight.size(3) == kPanel && packed_weight.scalar_type() == at::kFloat &&
                  packed_weight.is_contiguous(),
              "conv3x3_winograd: packed_weight must be ((M+2)^2 for M = 2 or 4, Cout/32, Cin, 32) float32, from "
              "fastres.ops.winograd.pack_weight");
  const int64_t tile = packed_weight.size(0) == 16 ? 2 : 4;
  const Geometry g{x.size(0), x.size(2), x.size(3), x.size(1), packed_weight.size(1) * kPanel, tile,
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
#if FASTRES_HAS_AVX512_KERNEL
  const float* x_data = x.const_data_ptr<float>();
  const float* u_data = packed_weight.const_data_ptr<float>();
  float* y_data = y.mutable_data_ptr<float>();
  if (tile == 2) {
    winograd_conv<2>(x_data, u_data, bias_data, residual_data, relu, y_data, g);
  } else {
    winograd_conv<4>(x_data, u_data, bias_data, residual_data, relu, y_data, g);
  }
#endif
  return y;
}

}  // namespace fastres
