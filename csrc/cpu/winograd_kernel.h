// The Winograd F(MxM, 3x3) kernel, written once over a SIMD vector of kWidth floats and compiled
// once per instruction set by winograd_isas.cpp, which includes this file (no include guard: it
// is meant to be included more than once) inside a namespace per instruction set after defining
//   FASTRES_ISA        the function attribute that enables the instruction set
//   FASTRES_SIMD(op)   the intrinsic for op on a vector of floats (_mm512_add_ps for add, ...)
//   Vec, kWidth        the vector register type and its number of floats
// Everything here has internal linkage (an anonymous namespace around the include), so no
// function compiled for one instruction set can stand in for another's copy at link time.
//
// One block of tiles: the input transform writes V[alpha][tile][cin] (alpha = the (M+2)^2
// transform points), one GEMM per alpha multiplies it by the pre-transformed weights U[alpha],
// and the output transform turns each tile's products back into MxM outputs, adding bias and
// residual and applying ReLU. A block's V and M stay in this core's cache, so no transformed
// tensor ever goes to memory (a whole-layer transform would move several times the activations
// through DRAM and lose the gain).

FASTRES_ISA inline Vec zero() { return FASTRES_SIMD(setzero)(); }
FASTRES_ISA inline Vec load(const float* p) { return FASTRES_SIMD(loadu)(p); }
FASTRES_ISA inline void store(float* p, Vec v) { FASTRES_SIMD(storeu)(p, v); }
FASTRES_ISA inline Vec add(Vec a, Vec b) { return FASTRES_SIMD(add)(a, b); }
FASTRES_ISA inline Vec sub(Vec a, Vec b) { return FASTRES_SIMD(sub)(a, b); }
FASTRES_ISA inline Vec fmadd(Vec a, Vec b, Vec acc) { return FASTRES_SIMD(fmadd)(a, b, acc); }
FASTRES_ISA inline Vec broadcast(float c) { return FASTRES_SIMD(set1)(c); }
// max(0, v) returns its second operand when either is NaN: NaN stays NaN, as in torch.relu.
FASTRES_ISA inline Vec relu(Vec v) { return FASTRES_SIMD(max)(zero(), v); }

// sum_k coef[k] * v[k * stride]: zero coefficients skipped, +-1 as additions (the loops are
// unrolled over constant tables, so this folds to the few operations each row needs).
template <int N>
FASTRES_ISA inline Vec combine(const float (&coef)[N], const Vec* v, int stride) {
  Vec acc = zero();
#pragma GCC unroll 8
  for (int k = 0; k < N; ++k) {
    const float c = coef[k];
    if (c == 1.0f) {
      acc = add(acc, v[k * stride]);
    } else if (c == -1.0f) {
      acc = sub(acc, v[k * stride]);
    } else if (c != 0.0f) {
      acc = fmadd(broadcast(c), v[k * stride], acc);
    }
  }
  return acc;
}

// V[alpha][row][c..c+kWidth) = (B^T d B)[alpha] for the input tile of one output tile; zero
// outside the image (the convolution's padding).
template <int M>
FASTRES_ISA void input_transform(const Problem& p, int64_t tile, float* v, int64_t row, int64_t block_rows) {
  using T = Transform<M>;
  constexpr int A = T::kA;
  const Geometry& g = p.g;
  const int64_t tx = tile % g.tiles_w, ty = (tile / g.tiles_w) % g.tiles_h, n = tile / (g.tiles_w * g.tiles_h);
  const int64_t y0 = M * ty - 1, x0 = M * tx - 1;
  const float* image = p.x + n * g.h * g.w * g.cin;
  const int64_t alpha_stride = block_rows * g.cin;
  for (int64_t c = 0; c < g.cin; c += kWidth) {
    Vec d[A][A];
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i) {
      const int64_t yy = y0 + i;
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) {
        const int64_t xx = x0 + j;
        d[i][j] = (yy >= 0 && yy < g.h && xx >= 0 && xx < g.w) ? load(image + (yy * g.w + xx) * g.cin + c) : zero();
      }
    }
    Vec t[A][A];  // B^T d
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) t[i][j] = combine(T::BT[i], &d[0][j], A);
    float* out = v + row * g.cin + c;
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i)  // (B^T d) B
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) store(out + (i * A + j) * alpha_stride, combine(T::BT[j], &t[i][0], 1));
  }
}

// m[r][0..2 kWidth) = sum_k a[r][k] * b[k][0..2 kWidth) for kRows rows: a has row stride lda,
// b is (part of) one packed panel, kPanel floats per k; m has row stride ldm. 12 accumulators,
// two weight vectors and one broadcast: 15 registers, so it fits AVX2's 16 as well.
FASTRES_ISA void gemm_rows(const float* a, int64_t lda, const float* b, int64_t k_count, float* m, int64_t ldm) {
  Vec acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = zero();
  for (int64_t k = 0; k < k_count; ++k) {
    const Vec b0 = load(b + k * kPanel);
    const Vec b1 = load(b + k * kPanel + kWidth);
    for (int r = 0; r < kRows; ++r) {
      const Vec a_rk = broadcast(a[r * lda + k]);
      acc[r][0] = fmadd(a_rk, b0, acc[r][0]);
      acc[r][1] = fmadd(a_rk, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    store(m + r * ldm, acc[r][0]);
    store(m + r * ldm + kWidth, acc[r][1]);
  }
}

// The MxM outputs of one tile from its (M+2)^2 products, plus bias and residual, then ReLU.
template <int M>
FASTRES_ISA void output_transform(const Problem& p, const float* m, int64_t row, int64_t block_rows, int64_t tile) {
  using T = Transform<M>;
  constexpr int A = T::kA;
  const Geometry& g = p.g;
  const int64_t tx = tile % g.tiles_w, ty = (tile / g.tiles_w) % g.tiles_h, n = tile / (g.tiles_w * g.tiles_h);
  const int64_t alpha_stride = block_rows * g.cout;
  const int64_t rows_left = g.h - M * ty, cols_left = g.w - M * tx;  // partial tiles at the edges
  const int64_t rows_here = rows_left < M ? rows_left : M, cols_here = cols_left < M ? cols_left : M;
  for (int64_t c = 0; c < g.cout; c += kWidth) {
    const float* in = m + row * g.cout + c;
    Vec q[A][A];
#pragma GCC unroll 6
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) q[i][j] = load(in + (i * A + j) * alpha_stride);
    Vec s[M][A];  // A^T q
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 6
      for (int j = 0; j < A; ++j) s[i][j] = combine(T::AT[i], &q[0][j], A);
    const Vec b = p.bias ? load(p.bias + c) : zero();
    for (int64_t i = 0; i < rows_here; ++i) {
      for (int64_t j = 0; j < cols_here; ++j) {
        const int64_t offset = ((n * g.h + M * ty + i) * g.w + M * tx + j) * g.cout + c;
        Vec value = add(combine(T::AT[j], &s[i][0], 1), b);  // (A^T q) A
        if (p.residual) value = add(value, load(p.residual + offset));
        if (p.relu) value = relu(value);
        store(p.y + offset, value);
      }
    }
  }
}

template <int M>
FASTRES_ISA void winograd_block(const Problem& p, int64_t first, int64_t count, int64_t block_rows, float* v,
                                float* m) {
  constexpr int64_t kAlphas = Transform<M>::kA * Transform<M>::kA;
  const Geometry& g = p.g;
  for (int64_t r = 0; r < count; ++r) input_transform<M>(p, first + r, v, r, block_rows);
  for (int64_t alpha = 0; alpha < kAlphas; ++alpha)  // rows past `count` only need to be finite
    for (int64_t r = count; r < block_rows; ++r)
      for (int64_t c = 0; c < g.cin; ++c) v[(alpha * block_rows + r) * g.cin + c] = 0.0f;
  const int64_t panels = g.cout / kPanel;
  for (int64_t alpha = 0; alpha < kAlphas; ++alpha) {
    const float* a = v + alpha * block_rows * g.cin;
    float* product = m + alpha * block_rows * g.cout;
    for (int64_t panel = 0; panel < panels; ++panel) {
      const float* b = p.u + (alpha * panels + panel) * g.cin * kPanel;
      // A panel is kPanel / (2 kWidth) micro-kernel widths: 1 with AVX-512, 2 with AVX2.
      for (int64_t col = 0; col < kPanel; col += 2 * kWidth)
        for (int64_t r = 0; r < block_rows; r += kRows)
          gemm_rows(a + r * g.cin, g.cin, b + col, g.cin, product + r * g.cout + panel * kPanel + col, g.cout);
    }
  }
  for (int64_t r = 0; r < count; ++r) output_transform<M>(p, m, r, block_rows, first + r);
}
