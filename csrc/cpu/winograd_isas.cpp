// The Winograd kernel (winograd_kernel.h) compiled once per x86-64 instruction set:
//   AVX-512:     16 floats a vector, 32 registers
//   AVX2 + FMA:   8 floats a vector, 16 registers (AMD Zen 1-3, Intel client cores since Haswell)
// Only these functions carry a target attribute (the library builds for the baseline ISA), and
// winograd.cpp calls each only where the CPU reports its instruction set. The two intrinsic
// families differ only in their prefix (_mm512_add_ps, _mm256_add_ps), so FASTRES_SIMD names
// them for the kernel.
#include "winograd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace fastres {
namespace winograd {

// GCC's avx512fintrin.h makes _mm512_undefined_ps() (inside _mm512_max_ps) from itself, and
// -Wall then reports it as maybe uninitialised at every inlined ReLU: a false alarm, silenced
// for the AVX-512 build only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define FASTRES_ISA __attribute__((target("avx512f,fma")))
#define FASTRES_SIMD(op) _mm512_##op##_ps
namespace avx512 {
namespace {
using Vec = __m512;
constexpr int64_t kWidth = 16;
#include "winograd_kernel.h"
}  // namespace
}  // namespace avx512
#undef FASTRES_ISA
#undef FASTRES_SIMD
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#define FASTRES_ISA __attribute__((target("avx2,fma")))
#define FASTRES_SIMD(op) _mm256_##op##_ps
namespace avx2 {
namespace {
using Vec = __m256;
constexpr int64_t kWidth = 8;
#include "winograd_kernel.h"
}  // namespace
}  // namespace avx2
#undef FASTRES_ISA
#undef FASTRES_SIMD

BlockFn avx512_block(int tile) { return tile == 2 ? &avx512::winograd_block<2> : &avx512::winograd_block<4>; }
BlockFn avx2_block(int tile) { return tile == 2 ? &avx2::winograd_block<2> : &avx2::winograd_block<4>; }

}  // namespace winograd
}  // namespace fastres

#else  // no x86-64 target attributes: no kernels (winograd.cpp then refuses every call)

namespace fastres {
namespace winograd {
BlockFn avx512_block(int) { return nullptr; }
BlockFn avx2_block(int) { return nullptr; }
}  // namespace winograd
}  // namespace fastres

#endif
