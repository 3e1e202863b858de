// The fused step on the CPU: one pass over memory per network evaluation (DESIGN.md's stage).
#include "edmrt_core.hpp"

namespace edmrt {

void fused_step(const StepArgs& p) {
  const double* r = p.row;
  const float c_skip = static_cast<float>(r[C_SKIP]), c_out = static_cast<float>(r[C_OUT]);
  const float alpha = static_cast<float>(r[ALPHA]), beta = static_cast<float>(r[BETA]);
  const float a = static_cast<float>(r[A]), e = static_cast<float>(r[E]);
  const float n = static_cast<float>(r[N]), c_in_next = static_cast<float>(r[C_IN_NEXT]);
  const bool commit = r[COMMIT] != 0.0;
  const int64_t total = p.batch * p.per_sample;
  const int K = p.K;
  // History entries Y[s - k] that exist (k <= s), with their weights; slot (s - k) mod K.
  float bk[16];
  const float* yk[16];
  int terms = 0;
  for (int k = 1; k < K && k <= p.stage; ++k) {
    bk[terms] = static_cast<float>(r[B0 + k]);
    yk[terms] = p.Y + static_cast<int64_t>((p.stage - k) % K) * total;
    ++terms;
  }
  const float b0 = static_cast<float>(r[B0]);
  float* __restrict__ y0 = p.Y + static_cast<int64_t>(p.stage % K) * total;
  float* __restrict__ x = p.x;
  float* __restrict__ xe = p.x_eval;
  float* __restrict__ xin = p.x_in;
  const float* __restrict__ F = p.F;
  const float* __restrict__ Fc = p.guidance ? p.F + total : nullptr;
  const float w = p.w;
  const bool noisy = n != 0.0f;
  const bool twice = p.x_in_twice;
  const uint32_t stream = static_cast<uint32_t>(p.stage + 2);

#pragma omp parallel for schedule(static) if (total > (1 << 15))
  for (int64_t i = 0; i < total; ++i) {
    float f = F[i];
    if (Fc) f = f + w * (Fc[i] - f);
    const float xev = xe[i];
    const float D = c_skip * xev + c_out * f;
    const float y = alpha * xev + beta * D;
    y0[i] = y;
    float acc = a * x[i] + e * xev + b0 * y;
    for (int t = 0; t < terms; ++t) acc += bk[t] * yk[t][i];
    if (noisy) {
      const uint64_t seed = static_cast<uint64_t>(p.seeds[i / p.per_sample]);
      uint32_t c[4] = {static_cast<uint32_t>(i % p.per_sample), stream, 0u, 0u};
      philox4x32(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      acc += n * normal_from_words(c[0], c[1]);
    }
    xe[i] = acc;
    if (commit) x[i] = acc;
    const float in = c_in_next * acc;
    xin[i] = in;
    if (twice) xin[total + i] = in;
  }
  const int64_t nsig = twice ? 2 * p.batch : p.batch;
  for (int64_t b = 0; b < nsig; ++b) p.sigma_in[b] = static_cast<float>(r[C_NOISE_NEXT]);
}

void init_state(const double* row0, double t0, double n_init, int64_t batch, int64_t per_sample, const int64_t* seeds,
                float* x, float* x_eval, float* x_in, bool x_in_twice, float* sigma_in) {
  const int64_t total = batch * per_sample;
  randn(seeds, batch, per_sample, 0u, x);
  if (n_init != 0.0) {
    std::vector<float> z(static_cast<std::size_t>(total));
    randn(seeds, batch, per_sample, 1u, z.data());
    for (int64_t i = 0; i < total; ++i) x[i] = static_cast<float>(t0) * x[i] + static_cast<float>(n_init) * z[i];
  } else {
    for (int64_t i = 0; i < total; ++i) x[i] = static_cast<float>(t0) * x[i];
  }
  const float c_in = static_cast<float>(row0[C_IN]);
  for (int64_t i = 0; i < total; ++i) {
    x_eval[i] = x[i];
    x_in[i] = c_in * x[i];
    if (x_in_twice) x_in[total + i] = c_in * x[i];
  }
  const int64_t nsig = x_in_twice ? 2 * batch : batch;
  for (int64_t b = 0; b < nsig; ++b) sigma_in[b] = static_cast<float>(row0[C_NOISE]);
}

}  // namespace edmrt
