// 32-byte SIMD vectors of the accumulation type (8 floats or 4 doubles) through the GCC/Clang vector
// extensions, for kernels that keep a tile of vectors in registers: the compiler maps them to one AVX
// register each under -march=native on an AVX2 CPU, to two SSE registers in a portable (SSE2) build,
// with no run-time dispatch. load_vec / store_vec read and write one vector of a storage type
// (csrc/cpu/dtypes.h), converting 16-bit floats exactly as the scalar conversions of cpu/half_types.h do,
// lane for lane, NaN included (checked by csrc/tests/test_vec.cpp): with the branch-free integer and
// float arithmetic of half_types.h in general; where the compiler targets them, with AVX2 shuffles for the
// same bfloat16 rounding (fewer instructions than the compiler makes of the generic code), with F16C's
// conversion instructions for float16 (IEEE round to nearest even, as half_types.h), and with AVX512-BF16's
// vcvtneps2bf16 for bfloat16 (its rounding is half_types.h's except that it flushes float32 subnormals to
// zero: vectors holding one take the AVX2 path). No torch includes, so the C++ tests build without torch.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu/half_types.h"

// Passing a 32-byte vector by value without AVX changes the ABI; these functions are inline and never
// cross a library boundary, so GCC's note about it does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace spark_kernels::cpu {

using f32x8 = float __attribute__((vector_size(32)));
using f64x4 = double __attribute__((vector_size(32)));
using u32x8 = uint32_t __attribute__((vector_size(32)));
using u16x8 = uint16_t __attribute__((vector_size(16)));

template <typename Acc>
struct VecOf;
template <>
struct VecOf<float> {
  using type = f32x8;
};
template <>
struct VecOf<double> {
  using type = f64x4;
};

// The vector of accumulation type Acc and its lane count.
template <typename Acc>
using Vec = typename VecOf<Acc>::type;
template <typename Acc>
constexpr int kLanes = static_cast<int>(32 / sizeof(Acc));

template <typename Acc>
inline Vec<Acc> broadcast(Acc a) {
  return Vec<Acc>{} + a;
}

inline f32x8 load_vec(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f64x4 load_vec(const double* p) {
  f64x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The 8 16-bit values at p zero-extended to 32 bits, and the low 16 bits of 8 lanes (each below 2^16) stored at p
// (unaligned: rows of 16-bit values start anywhere).
inline u32x8 widen16(const void* p) {
#if defined(__AVX2__)
  return reinterpret_cast<u32x8>(_mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
#else
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, u32x8);
#endif
}

inline void narrow16(void* p, u32x8 u) {
  const u16x8 h = __builtin_convertvector(u, u16x8);
  std::memcpy(p, &h, sizeof h);
}

// Lanes of a where `when` (a comparison's all-ones / all-zeros lanes), else of b.
inline u32x8 select(u32x8 when, u32x8 a, u32x8 b) { return (a & when) | (b & ~when); }

inline f32x8 load_vec(const BFloat16Bits* p) { return reinterpret_cast<f32x8>(widen16(p) << 16); }

inline f32x8 load_vec(const Float16Bits* p) {  // fp16_to_float, lane-wise
#if defined(__F16C__)
  return reinterpret_cast<f32x8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  const u32x8 h = widen16(p);
  const u32x8 sign = (h & 0x8000u) << 16;
  const u32x8 magnitude = (h & 0x7fffu) << 13;
  const u32x8 finite = reinterpret_cast<u32x8>(reinterpret_cast<f32x8>(magnitude) * 0x1p112f);
  const u32x8 special = magnitude | 0x7f800000u;
  const u32x8 is_special = reinterpret_cast<u32x8>((h & 0x7c00u) == 0x7c00u);
  return reinterpret_cast<f32x8>(sign | select(is_special, special, finite));
#endif
}

inline void store_vec(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

inline void store_vec(double* p, f64x4 v) { std::memcpy(p, &v, sizeof v); }

inline void store_vec(BFloat16Bits* p, f32x8 v) {  // float_to_bf16, lane-wise
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  const __m256 f = reinterpret_cast<__m256>(v);
  if (_mm256_fpclass_ps_mask(f, 0x20) == 0) {  // no subnormal lane (class bit 5), which the instruction flushes
    const __m256 quieted = _mm256_mask_blend_ps(_mm256_fpclass_ps_mask(f, 0x81), f,  // NaNs (bits 0, 7) -> 0x7fc0
                                                _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(quieted)));
    return;
  }
#endif
#if defined(__AVX2__)
  const __m256i u = reinterpret_cast<__m256i>(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
  const __m256 nan = _mm256_cmp_ps(reinterpret_cast<__m256>(v), reinterpret_cast<__m256>(v), _CMP_UNORD_Q);
  const __m256i bits = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), nan));
  // The upper 16 bits of each lane: gathered into the low 8 bytes of each 128-bit half, then the halves' low
  // quadwords side by side.
  const __m256i upper = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                         2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bits, upper), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#else
  const u32x8 u = reinterpret_cast<u32x8>(v);
  const u32x8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const u32x8 nan = reinterpret_cast<u32x8>((u & 0x7fffffffu) > 0x7f800000u);
  narrow16(p, select(nan, u32x8{} + 0x7fc0u, rounded));
#endif
}

inline void store_vec(Float16Bits* p, f32x8 v) {  // float_to_fp16, lane-wise
#if defined(__F16C__)
  // NaNs first made what float_to_fp16 writes for them (their sign, quiet, no payload); the instruction keeps the
  // top of a payload.
  const __m256 f = reinterpret_cast<__m256>(v);
  const __m256 quiet_nan = _mm256_or_ps(_mm256_and_ps(f, _mm256_set1_ps(-0.0f)),
                                        _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)));
  const __m256 quieted = _mm256_blendv_ps(f, quiet_nan, _mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(quieted, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  const u32x8 u = reinterpret_cast<u32x8>(v);
  const u32x8 sign = (u >> 16) & 0x8000u;
  const u32x8 a = u & 0x7fffffffu;
  const u32x8 normal = (a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const u32x8 subnormal = reinterpret_cast<u32x8>(reinterpret_cast<f32x8>(a) + 0.5f) - bits_of(0.5f);
  u32x8 out = select(reinterpret_cast<u32x8>(a < 0x38800000u), subnormal, normal);
  out = select(reinterpret_cast<u32x8>(a >= 0x477ff000u), u32x8{} + 0x7c00u, out);
  out = select(reinterpret_cast<u32x8>(a > 0x7f800000u), u32x8{} + 0x7e00u, out);
  narrow16(p, sign | out);
#endif
}

// Transposes an 8 x 8 block of 32-bit or 16-bit elements (E: uint32_t or uint16_t, any same-sized type's bits):
// element i of row j of dst is element j of row i of src; rows are 8 contiguous elements, src_stride and
// dst_stride apart (in elements).
template <typename E>
inline void transpose8x8(const E* src, int64_t src_stride, E* dst, int64_t dst_stride) {
  static_assert(sizeof(E) == 4 || sizeof(E) == 2);
  using R = std::conditional_t<sizeof(E) == 4, u32x8, u16x8>;
  R r[8], t[8];
  // Unrolled: else GCC loads the rows in halves through the stack, and the NCHW grad_out copy of the depthwise
  // conv (dwconv.cpp's rows_grad_out) took 1.5-1.8x the time at 384@14 and 768@7 fp32.
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * src_stride, sizeof(R));
  if constexpr (sizeof(E) == 2) {
    // Three rounds of interleaving row i with row i + 4: each rotates an element's (row, column) bits by one place,
    // so three transpose the block. On 128-bit rows every round is unpack instructions only.
    for (int round = 0; round < 3; ++round) {
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = __builtin_shufflevector(r[i], r[i + 4], 0, 8, 1, 9, 2, 10, 3, 11);
        t[2 * i + 1] = __builtin_shufflevector(r[i], r[i + 4], 4, 12, 5, 13, 6, 14, 7, 15);
      }
      for (int i = 0; i < 8; ++i) r[i] = t[i];
    }
    for (int j = 0; j < 8; ++j) std::memcpy(dst + j * dst_stride, &r[j], sizeof(R));
  } else {
    // On 256-bit rows, interleaves within the 128-bit lanes (pairs of rows, then quads), then the lanes swapped
    // across: AVX2 has no single cross-lane unpack.
    R u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
      t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)
      for (int h = 0; h < 2; ++h) {
        u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
      }
    for (int j = 0; j < 4; ++j) {
      const R low = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
      const R high = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
      std::memcpy(dst + j * dst_stride, &low, sizeof(R));
      std::memcpy(dst + (j + 4) * dst_stride, &high, sizeof(R));
    }
  }
}

// Non-temporal ("streaming") writes of whole 32-byte blocks: the lines go to memory without being read first and
// without filling the cache, for outputs larger than the caches that the kernel itself never reads back. Where
// the destination or the length is not a multiple of 32 bytes, or without AVX, they are plain copies. Call
// stream_fence() before other threads read what a thread streamed.
// streams_output says which outputs a kernel writes whole with them (the norms' rows outputs): those of at least
// kStreamOutputBytes, by their actual size in any dtype. Streaming spares reading each line from memory before
// overwriting it, but leaves the output out of the caches for whoever reads it next. Measured on this project's
// 2-core EPYC (AVX2, 32 MiB L3; LayerNorm, BatchNorm and the 3x3 depthwise conv, fp32 and bf16 outputs of 0.6-16 MB,
// 1 and 2 threads), forward + backward with each output read right after, as the next layer does, streaming against
// plain stores: 0.8-1.0x the time at 0.6-1.2 MB, 0.96-1.06x at 2.4 MB, faster from 3.6 MB (1.03-1.1x; 1.1-1.3x at
// 9.6-16 MB); with nothing reading the outputs it wins from 1.2 MB (1.1-1.3x).
// streams_zero_rows says where the depthwise conv streams the zeros of its inactive rows (its active rows go through
// the caches): from kStreamZeroRowsBytes, since at 2.4 MB (bf16, ConvNeXt-T's 768@7) streaming them took 1.1-1.2x
// the time of plain stores for the 3x3 conv (the 7x7 conv even; `python -m bench.ops`, 3 alternating runs, idle).
constexpr int64_t kStreamOutputBytes = int64_t(2) << 20;
constexpr int64_t kStreamZeroRowsBytes = int64_t(4) << 20;

inline bool streams_output(int64_t bytes) { return bytes >= kStreamOutputBytes; }
inline bool streams_zero_rows(int64_t bytes) { return bytes >= kStreamZeroRowsBytes; }

inline bool streamable(const void* dst, int64_t bytes) {
#if defined(__AVX__)
  return reinterpret_cast<uintptr_t>(dst) % 32 == 0 && bytes % 32 == 0;
#else
  (void)dst, (void)bytes;
  return false;
#endif
}

inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(__AVX__)
  if (streamable(dst, bytes)) {
    auto* out = static_cast<__m256i*>(dst);
    const auto* in = static_cast<const char*>(src);
    for (int64_t i = 0; i < bytes / 32; ++i) {
      _mm256_stream_si256(out + i, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + 32 * i)));
    }
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

inline void stream_zero(void* dst, int64_t bytes) {
#if defined(__AVX__)
  if (streamable(dst, bytes)) {
    auto* out = static_cast<__m256i*>(dst);
    for (int64_t i = 0; i < bytes / 32; ++i) _mm256_stream_si256(out + i, _mm256_setzero_si256());
    return;
  }
#endif
  std::memset(dst, 0, bytes);
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

}  // namespace spark_kernels::cpu
