// Counter-based Philox4x32-10 noise, the same stream as kernels/src/philox.py and Triton's tl.randn.
#include <cmath>

#include "edmrt_core.hpp"

namespace edmrt {

namespace {
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments

inline float uniform_from_word(uint32_t w) {
  // Triton's uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale in float32.
  int32_t x = static_cast<int32_t>(w);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}
}  // namespace

void philox4x32(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    k0 += kW0; k1 += kW1;
  }
}

float normal_from_words(uint32_t w0, uint32_t w1) {
  float u1 = uniform_from_word(w0);
  if (u1 < 1.0e-7f) u1 = 1.0e-7f;
  const float u2 = uniform_from_word(w1);
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.283185307179586f * u2);
}

void randn(const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t stream, float* out) {
  const int64_t n = batch * per_sample;
#pragma omp parallel for schedule(static) if (n > (1 << 14))
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t seed = static_cast<uint64_t>(seeds[i / per_sample]);
    uint32_t c[4] = {static_cast<uint32_t>(i % per_sample), stream, 0u, 0u};
    philox4x32(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    out[i] = normal_from_words(c[0], c[1]);
  }
}

}  // namespace edmrt
