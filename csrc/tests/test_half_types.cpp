// Checks the 16-bit float conversions of cpu/half_types.h against exact references: widening every one
// of the 65536 bit patterns of bfloat16 and float16, and narrowing every representable value, every
// midpoint between neighbours (ties to even), the floats next to each midpoint, overflow, underflow,
// signed zeros, infinities and NaN. The conversions run in loops over arrays, as in the kernels, so the
// vectorized code the compiler makes of them is what is checked. Returns non-zero on failure.
#include <cmath>
#include <cstdio>
#include <vector>

#include "cpu/half_types.h"

namespace {

namespace cpu = spark_kernels::cpu;

int failures = 0;

// A 16-bit format: exponent bits, mantissa bits; encodings of positive values ascend with the value.
struct Format {
  const char* name;
  int exponent_bits, mantissa_bits;
  uint16_t infinity() const { return static_cast<uint16_t>(((1u << exponent_bits) - 1) << mantissa_bits); }
  int bias() const { return (1 << (exponent_bits - 1)) - 1; }
  // Exact value of a positive encoding; the infinity encoding counts as the next power of two
  // (where round to nearest overflows).
  double value(uint32_t e) const {
    const uint32_t exponent = e >> mantissa_bits, mantissa = e & ((1u << mantissa_bits) - 1);
    if (exponent == 0) return std::ldexp(static_cast<double>(mantissa), 1 - bias() - mantissa_bits);
    return std::ldexp(static_cast<double>(mantissa + (1u << mantissa_bits)), static_cast<int>(exponent) - bias() -
                                                                                  mantissa_bits);
  }
  // Nearest encoding of a finite float, ties to the even encoding.
  uint16_t round(float f) const {
    const double a = std::fabs(static_cast<double>(f));
    const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
    uint32_t lo = 0, hi = infinity();
    if (a >= value(hi)) return sign | hi;
    while (hi - lo > 1) {  // value(lo) <= a < value(hi)
      const uint32_t mid = (lo + hi) / 2;
      (value(mid) <= a ? lo : hi) = mid;
    }
    const double below = a - value(lo), above = value(hi) - a;
    const uint32_t e = below < above ? lo : above < below ? hi : (lo % 2 == 0 ? lo : hi);
    return static_cast<uint16_t>(sign | e);
  }
};

const Format kBf16{"bfloat16", 8, 7};
const Format kFp16{"float16", 5, 10};

template <typename Bits>
void check_widen(const Format& fmt) {
  std::vector<Bits> in(65536);
  std::vector<float> out(65536);
  for (uint32_t e = 0; e < 65536; ++e) in[e].bits = static_cast<uint16_t>(e);
  for (size_t i = 0; i < in.size(); ++i) out[i] = in[i];
  for (uint32_t e = 0; e < 65536; ++e) {
    const uint32_t magnitude = e & 0x7fffu;
    const bool negative = e & 0x8000u;
    const float got = out[e];
    bool ok;
    if (magnitude > fmt.infinity()) {
      ok = std::isnan(got);
    } else if (magnitude == fmt.infinity()) {
      ok = std::isinf(got) && std::signbit(got) == negative;
    } else {
      ok = static_cast<double>(got) == (negative ? -fmt.value(magnitude) : fmt.value(magnitude)) &&
           std::signbit(got) == negative;
    }
    if (!ok && failures++ < 20) std::printf("FAIL widen %s 0x%04x: got %.9g\n", fmt.name, e, got);
  }
}

template <typename Bits>
void check_narrow(const Format& fmt) {
  std::vector<float> in;
  for (uint32_t e = 0; e < fmt.infinity(); ++e) {
    const double v = fmt.value(e), next = fmt.value(e + 1);
    const float mid = static_cast<float>((v + next) / 2);  // exact: at most mantissa_bits + 2 significant bits
    for (float f : {static_cast<float>(v), mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
      in.push_back(f);
      in.push_back(-f);
    }
  }
  for (float f : {0.0f, -0.0f, 1e-45f, 3e38f, 1e30f, INFINITY, -INFINITY, 70000.0f, 65519.99f, 65520.0f})
    in.push_back(f);
  std::vector<Bits> out(in.size());
  for (size_t i = 0; i < in.size(); ++i) out[i] = Bits(in[i]);
  for (size_t i = 0; i < in.size(); ++i) {
    const uint16_t want = fmt.round(in[i]);
    if (out[i].bits != want && failures++ < 20)
      std::printf("FAIL narrow %s %.9g: got 0x%04x, want 0x%04x\n", fmt.name, in[i], out[i].bits, want);
  }
  std::vector<float> nans = {NAN, -NAN, cpu::float_from_bits(0x7f800001u), cpu::float_from_bits(0xffc12345u)};
  std::vector<Bits> nan_out(nans.size());
  for (size_t i = 0; i < nans.size(); ++i) nan_out[i] = Bits(nans[i]);
  for (const Bits& b : nan_out) {
    if ((b.bits & 0x7fffu) <= fmt.infinity() && failures++ < 20)
      std::printf("FAIL narrow %s NaN: got 0x%04x, not a NaN\n", fmt.name, b.bits);
  }
}

}  // namespace

int main() {
  check_widen<cpu::BFloat16Bits>(kBf16);
  check_widen<cpu::Float16Bits>(kFp16);
  check_narrow<cpu::BFloat16Bits>(kBf16);
  check_narrow<cpu::Float16Bits>(kFp16);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("half types: all conversions exact\n");
  return 0;
}
