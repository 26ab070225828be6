// Vectorisable float math for the CPU kernels.  The project compiles for the baseline x86-64
// ISA; the hot elementwise loops are therefore compiled several times (AVX-512, AVX2+FMA,
// baseline) and the best clone is picked at load time (GCC target_clones / ifunc).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FLUX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FLUX_CLONES
#endif

namespace flux_cpu {

// exp(x) without a libm call (so loops over it vectorise): Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, the Cephes degree-6 polynomial for e^r, and 2^n written into the
// exponent bits.  About 1-2 ulp on [-87.3, 88.3]; below it returns 0 (no denormals: exp(-87.5)
// gives 0 instead of 1e-38), above it +inf; NaN stays NaN.
static inline __attribute__((always_inline)) float fast_exp(float in) {
  float x = in < -87.3f ? -87.3f : in;
  x = x > 88.3f ? 88.3f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504088896341f + magic;
  float n = t - magic;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, 4);
  int32_t ni = t_bits - 0x4B400000;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t s_bits = (ni + 127) << 23;
  float s;
  std::memcpy(&s, &s_bits, 4);
  float out = p * s;
  out = in < -87.3f ? 0.f : out;
  return in > 88.3f ? __builtin_inff() : out;
}

}  // namespace flux_cpu
