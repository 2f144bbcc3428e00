// Helpers shared by the CUDA kernel files: launch shapes, vector packs, per-channel indexing.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

namespace fastres {
namespace cuda {

// fp32 math for half types, fp64 for double.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// VEC elements moved as one 128-bit (or narrower) load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
constexpr int vec_size() {
  return 16 / sizeof(T) > 0 ? static_cast<int>(16 / sizeof(T)) : 1;
}

// Whether every pointer is aligned for 128-bit accesses and n splits into whole packs.
template <typename T>
inline bool can_vectorize(int64_t n, std::initializer_list<const void*> pointers) {
  if (n % vec_size<T>() != 0) return false;
  for (const void* p : pointers)
    if (p != nullptr && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Walks the channel of consecutive flat elements of a dense (N, C, L) tensor: the divisions run
// once, where the walk starts (once per pack, not per element), in the index type I (32-bit
// where the tensor allows, see fits_32bit); each next() is a compare and an increment.
template <typename I>
struct ChannelCursor {
  I c, l;  // channel; position in the H*W plane (NCHW only)
  __device__ __forceinline__ ChannelCursor(I i, I C, I L, bool channels_last) {
    if (channels_last) {
      c = i % C;
      l = 0;
    } else {
      const I q = i / L;
      l = i - q * L;
      c = q % C;
    }
  }
  __device__ __forceinline__ void next(I C, I L, bool channels_last) {
    if (channels_last) {
      if (++c == C) c = 0;
    } else if (++l == L) {
      l = 0;
      if (++c == C) c = 0;
    }
  }
};

// Whether 32-bit unsigned indices cover n elements and a grid-stride step past the end.
inline bool fits_32bit(int64_t n) { return n < (int64_t(1) << 31); }

// Bytes of dynamic shared memory a kernel may take without opting in.
constexpr int64_t kStagingBytes = 48 * 1024;

// Offset of (row r = n*L + l, channel c).
__device__ __forceinline__ int64_t offset_of(int64_t r, int64_t c, int64_t C, int64_t L, bool channels_last) {
  return channels_last ? r * C + c : ((r / L) * C + c) * L + (r % L);
}

inline unsigned int blocks_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace cuda
}  // namespace fastres
