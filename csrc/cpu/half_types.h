// Storage types of the CPU kernels' 16-bit floats: bfloat16 and IEEE float16 as 16 bits, with
// conversions to and from float written as branch-free integer and float arithmetic. The compiler
// vectorizes loops over them at whatever width it targets (AVX-512 under -march=native on a CPU that has
// it, AVX2, or the SSE2 of a SPARK_KERNELS_PORTABLE=1 build), and every build rounds identically: the
// results are bit-identical to c10::BFloat16 / c10::Half for every non-NaN value (round to nearest
// even; a NaN stays a NaN),
// checked exhaustively by csrc/tests/test_half_types.cpp. (c10::Half converts one value at a time with
// F16C instructions, which compilers do not vectorize.)
//
// The kernels read these as their storage type T and compute in float (their accumulation type);
// the arithmetic assumes the default floating-point environment (round to nearest, no flush-to-zero).
// No torch includes, so the C++ tests build without torch.
#pragma once
#include <cstdint>
#include <cstring>

namespace spark_kernels::cpu {

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// `when ? a : b` as bit operations: compilers keep ?: on floats as a branch (the float arithmetic of
// the arms could trap), which stops vectorization.
inline uint32_t select(bool when, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(when);
  return (a & mask) | (b & ~mask);
}

// bfloat16 is the top half of a float32.
inline float bf16_to_float(uint16_t h) { return float_from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // to nearest, ties to even
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);  // NaN -> quiet NaN
}

// float16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t magnitude = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent and mantissa in float's place
  // Scaling by 2^(127 - 15) rebiases the exponent; it is exact, and turns a float16 subnormal (a float32
  // subnormal here) into the right normal float32.
  const uint32_t finite = bits_of(float_from_bits(magnitude) * 0x1p112f);
  const uint32_t special = magnitude | 0x7f800000u;  // infinity, or NaN with its payload
  return float_from_bits(sign | select((h & 0x7c00u) == 0x7c00u, special, finite));
}

inline uint16_t float_to_fp16(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal range: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  const uint32_t normal = (a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14: adding 0.5 rounds |f| to a multiple of 2^-24 (0.5's ulp) in hardware; the low bits of
  // the sum are the float16 subnormal (or the smallest normal, when it rounds up to it).
  const uint32_t subnormal = bits_of(float_from_bits(a) + 0.5f) - bits_of(0.5f);
  uint32_t out = select(a < 0x38800000u, subnormal, normal);
  out = select(a >= 0x477ff000u, 0x7c00u, out);  // rounds to 65536 or more: infinity
  out = select(a > 0x7f800000u, 0x7e00u, out);   // NaN -> quiet NaN
  return static_cast<uint16_t>(sign | out);
}

struct BFloat16Bits {
  uint16_t bits;
  BFloat16Bits() = default;
  explicit BFloat16Bits(float f) : bits(float_to_bf16(f)) {}
  operator float() const { return bf16_to_float(bits); }
};

struct Float16Bits {
  uint16_t bits;
  Float16Bits() = default;
  explicit Float16Bits(float f) : bits(float_to_fp16(f)) {}
  operator float() const { return fp16_to_float(bits); }
};

static_assert(sizeof(BFloat16Bits) == 2 && sizeof(Float16Bits) == 2, "16-bit storage types must be 2 bytes");

}  // namespace spark_kernels::cpu
