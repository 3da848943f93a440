// Checks the vector conversions of cpu/vec.h against the scalar ones of cpu/half_types.h (themselves
// checked against exact references by test_half_types.cpp): widening all 65536 bit patterns of bfloat16 and
// float16, and narrowing floats that cover every exponent, the rounding midpoints around them, subnormals,
// overflow, signed zeros, infinities and NaN. Lane for lane the results must have the same bits (a widened NaN only
// needs to stay a NaN; a narrowed one must be the scalar conversion's quiet NaN). Also float and double round
// trips, and 16-bit loads and stores at every element offset (rows of 16-bit values start anywhere). Returns
// non-zero on failure.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/half_types.h"
#include "cpu/vec.h"

namespace {

namespace cpu = spark_kernels::cpu;

int failures = 0;

void fail(const char* what, uint32_t input, uint32_t got, uint32_t want) {
  if (++failures <= 10) std::printf("FAIL %s: input 0x%08x got 0x%08x want 0x%08x\n", what, input, got, want);
}


template <typename Bits>
void check_widen(const char* what) {
  for (uint32_t e = 0; e < 65536; e += 8) {
    Bits in[8];
    for (int v = 0; v < 8; ++v) in[v].bits = static_cast<uint16_t>(e + v);
    float out[8];
    cpu::store_vec(out, cpu::load_vec(in));
    for (int v = 0; v < 8; ++v) {
      const float want = in[v];
      if (std::isnan(want) ? !std::isnan(out[v]) : cpu::bits_of(out[v]) != cpu::bits_of(want))
        fail(what, e + v, cpu::bits_of(out[v]), cpu::bits_of(want));
    }
  }
}

template <typename Bits>
void check_narrow(const char* what, const std::vector<float>& values) {
  for (size_t i = 0; i + 8 <= values.size(); i += 8) {
    Bits out[8];
    cpu::store_vec(out, cpu::load_vec(&values[i]));
    for (int v = 0; v < 8; ++v) {
      const Bits want(values[i + v]);
      if (out[v].bits != want.bits) fail(what, cpu::bits_of(values[i + v]), out[v].bits, want.bits);
    }
  }
}

std::vector<float> narrowing_inputs() {
  std::vector<float> values;
  // Every exponent, with mantissas near the 13- and 16-bit rounding boundaries, both signs.
  for (uint32_t exponent = 0; exponent < 256; ++exponent)
    for (uint32_t low : {0u, 1u, 0xfffu, 0x1000u, 0x1001u, 0x2fffu, 0x3000u, 0x7fffu, 0x8000u, 0x8001u, 0x18000u,
                         0x7fffffu, 0x400000u, 0x3fffffu})
      for (uint32_t sign : {0u, 0x80000000u}) values.push_back(cpu::float_from_bits(sign | exponent << 23 | low));
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) values.push_back(cpu::float_from_bits(bits(rng)));
  values.resize(values.size() / 8 * 8);
  return values;
}

// load_vec / store_vec of 16-bit values at element offsets 0-15 of an aligned buffer (addresses 2 mod 4, 6 mod 8, ...):
// the same values as the scalar conversions, the neighbours untouched.
template <typename Bits>
void check_unaligned(const char* what) {
  alignas(64) Bits row[32];
  float in[8];
  for (int v = 0; v < 8; ++v) in[v] = 1.0f + 0.3f * static_cast<float>(v) - 0.01f * static_cast<float>(v * v);
  for (int offset = 0; offset < 16; ++offset) {
    for (Bits& b : row) b.bits = 0xABCDu;
    cpu::store_vec(row + offset, cpu::load_vec(in));
    float out[8];
    cpu::store_vec(out, cpu::load_vec(row + offset));
    for (int i = 0; i < 32; ++i) {
      const bool inside = i >= offset && i < offset + 8;
      const uint16_t want = inside ? Bits(in[i - offset]).bits : uint16_t{0xABCDu};
      if (row[i].bits != want) fail(what, static_cast<uint32_t>(i), row[i].bits, want);
      if (inside && cpu::bits_of(out[i - offset]) != cpu::bits_of(static_cast<float>(row[i])))
        fail(what, static_cast<uint32_t>(i), cpu::bits_of(out[i - offset]), cpu::bits_of(static_cast<float>(row[i])));
    }
  }
}

void check_wide_round_trips() {
  float f[8] = {0.f, -0.f, 1.5f, -2.25f, 3e38f, -1e-45f, std::numeric_limits<float>::infinity(), 7.f};
  float fo[8];
  cpu::store_vec(fo, cpu::load_vec(f) * 1.0f);
  for (int v = 0; v < 8; ++v)
    if (cpu::bits_of(fo[v]) != cpu::bits_of(f[v])) fail("float round trip", v, cpu::bits_of(fo[v]), cpu::bits_of(f[v]));
  double d[4] = {1.0, -0.0, 1e300, 5e-324};
  double dout[4];
  cpu::store_vec(dout, cpu::load_vec(d) + 0.0);
  for (int v = 0; v < 4; ++v)
    if (dout[v] != d[v]) fail("double round trip", v, 0, 0);
  const cpu::f32x8 b = cpu::broadcast(2.5f);
  for (int v = 0; v < 8; ++v)
    if (b[v] != 2.5f) fail("broadcast", v, cpu::bits_of(b[v]), cpu::bits_of(2.5f));
}

// Streaming copies and zeroing write exactly the bytes a plain copy would, aligned or not, whole blocks or not.
void check_streaming() {
  alignas(32) unsigned char src[160], dst[160];
  for (int i = 0; i < 160; ++i) src[i] = static_cast<unsigned char>(i * 7 + 1);
  for (int offset : {0, 4, 32}) {
    for (int bytes : {0, 32, 64, 100, 128}) {
      std::memset(dst, 0xAB, sizeof dst);
      cpu::stream_copy(dst + offset, src, bytes);
      cpu::stream_fence();
      for (int i = 0; i < 160; ++i) {
        const int want = i >= offset && i < offset + bytes ? src[i - offset] : 0xAB;
        if (dst[i] != want) fail("stream_copy", i, dst[i], want);
      }
      cpu::stream_zero(dst + offset, bytes);
      cpu::stream_fence();
      for (int i = offset; i < offset + bytes; ++i)
        if (dst[i] != 0) fail("stream_zero", i, dst[i], 0);
    }
  }
}

// transpose8x8 between strided blocks, for both element sizes; the elements around the block stay untouched.
template <typename E>
void check_transpose(const char* what) {
  constexpr int kSrcStride = 11, kDstStride = 13;
  E in[8 * kSrcStride], out[8 * kDstStride + 2];
  for (int i = 0; i < 8 * kSrcStride; ++i) in[i] = static_cast<E>(i * 7 + 3);
  for (E& e : out) e = static_cast<E>(0xAB);
  cpu::transpose8x8(in + 1, kSrcStride, out + 2, kDstStride);
  for (int i = 0; i < 8 * kDstStride + 2; ++i) {
    const int row = (i - 2) / kDstStride, lane = (i - 2) % kDstStride;
    const bool in_block = i >= 2 && lane < 8;
    const E want = in_block ? in[1 + lane * kSrcStride + row] : static_cast<E>(0xAB);
    if (out[i] != want) fail(what, i, out[i], want);
  }
}

}  // namespace

int main() {
  check_widen<cpu::BFloat16Bits>("bfloat16 -> float");
  check_widen<cpu::Float16Bits>("float16 -> float");
  const std::vector<float> values = narrowing_inputs();
  check_narrow<cpu::BFloat16Bits>("float -> bfloat16", values);
  check_narrow<cpu::Float16Bits>("float -> float16", values);
  check_unaligned<cpu::BFloat16Bits>("bfloat16 at an offset");
  check_unaligned<cpu::Float16Bits>("float16 at an offset");
  check_wide_round_trips();
  check_streaming();
  check_transpose<uint32_t>("transpose8x8 32-bit");
  check_transpose<uint16_t>("transpose8x8 16-bit");
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
