// The fused step on the CPU: one pass over memory per network evaluation (kernels/reference.py's stage).
#include <algorithm>
#include <type_traits>

#include "edmrt_core.hpp"

namespace edmrt {

namespace {

// The update without noise, specialised so that the element loop has no branches and vectorises:
// CFG (guidance halves), COMMIT (x = x_new), TWICE (x_in holds two copies), TERMS older history entries,
// HAS_X (a != 0: read x; plans set a = 0 wherever x == x_eval), WRITE_Y (K > 1: a later stage reads Y[s]).
template <bool CFG, bool COMMIT, bool TWICE, bool HAS_X, bool WRITE_Y, int TERMS>
void update(const StepArgs& p, const float (&c)[8], const float* bk, const float* const* yk) {
  const int64_t total = p.batch * p.per_sample;
  const int K = p.K;
  float* __restrict__ y0 = p.Y + static_cast<int64_t>(p.stage % K) * total;
  float* __restrict__ x = p.x;
  float* __restrict__ xe = p.x_eval;
  float* __restrict__ xin = p.x_in;
  const float* __restrict__ F = p.F;
  const float* __restrict__ Fc = CFG ? p.F + total : p.F;
  const float* __restrict__ y1 = TERMS > 0 ? yk[0] : nullptr;
  const float* __restrict__ y2 = TERMS > 1 ? yk[1] : nullptr;
  const float* __restrict__ y3 = TERMS > 2 ? yk[2] : nullptr;
  const float c_skip = c[0], c_out = c[1], alpha = c[2], beta = c[3], a = c[4], e = c[5], b0 = c[6], c_in = c[7];
  const float w = p.w;
  const float b1 = TERMS > 0 ? bk[0] : 0.0f, b2 = TERMS > 1 ? bk[1] : 0.0f, b3 = TERMS > 2 ? bk[2] : 0.0f;
#pragma omp parallel for simd schedule(static) if (total > (1 << 15))
  for (int64_t i = 0; i < total; ++i) {
    float f = F[i];
    if (CFG) f = f + w * (Fc[i] - f);
    const float xev = xe[i];
    const float D = c_skip * xev + c_out * f;
    const float y = alpha * xev + beta * D;
    if (WRITE_Y) y0[i] = y;
    float acc = HAS_X ? a * x[i] + e * xev + b0 * y : e * xev + b0 * y;
    if (TERMS > 0) acc += b1 * y1[i];
    if (TERMS > 1) acc += b2 * y2[i];
    if (TERMS > 2) acc += b3 * y3[i];
    xe[i] = acc;
    if (COMMIT) x[i] = acc;
    xin[i] = c_in * acc;
    if (TWICE) xin[total + i] = c_in * acc;
  }
}

template <bool CFG, bool COMMIT, bool TWICE, bool HAS_X, bool WRITE_Y>
void update_terms(int terms, const StepArgs& p, const float (&c)[8], const float* bk, const float* const* yk) {
  switch (terms) {
    case 0: return update<CFG, COMMIT, TWICE, HAS_X, WRITE_Y, 0>(p, c, bk, yk);
    case 1: return update<CFG, COMMIT, TWICE, HAS_X, WRITE_Y, 1>(p, c, bk, yk);
    case 2: return update<CFG, COMMIT, TWICE, HAS_X, WRITE_Y, 2>(p, c, bk, yk);
    default: return update<CFG, COMMIT, TWICE, HAS_X, WRITE_Y, 3>(p, c, bk, yk);
  }
}

// Calls f(std::true_type) or f(std::false_type): a runtime flag turned into a template argument.
template <typename Fn>
void with_flag(bool flag, Fn&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Older history entries beyond three are folded into Y-term groups of three by repeated passes:
// rare (K > 4 is not produced by any solver here), kept correct rather than fast.
void extra_terms(const StepArgs& p, int from, int terms, const float* bk, const float* const* yk, float c_in) {
  const int64_t total = p.batch * p.per_sample;
  for (int t = from; t < terms; ++t) {
    for (int64_t i = 0; i < total; ++i) {
      const float acc = p.x_eval[i] + bk[t] * yk[t][i];
      p.x_eval[i] = acc;
      p.x_in[i] = c_in * acc;
      if (p.x_in_twice) p.x_in[total + i] = c_in * acc;
    }
  }
  if (terms > from && p.row[COMMIT] != 0.0) std::copy(p.x_eval, p.x_eval + total, p.x);
}

// A stochastic stage in one pass: the update of update<> (every flag at run time), then x_eval += n z with z the
// Philox normal keyed by (sample seed, stage's stream, element), then the stores.  The same float operations in the
// same order as the deterministic update followed by a noise pass, so the result is the same bit for bit; the
// second read and write of x_eval, x and x_in is gone.  Philox dominates here, so the loop is not specialised.
void update_noisy(const StepArgs& p, const float (&c)[8], float n, bool commit, int terms, const float* bk,
                  const float* const* yk) {
  const int64_t total = p.batch * p.per_sample;
  float* __restrict__ y0 = p.Y + static_cast<int64_t>(p.stage % p.K) * total;
  float* __restrict__ x = p.x;
  float* __restrict__ xe = p.x_eval;
  float* __restrict__ xin = p.x_in;
  const float* __restrict__ F = p.F;
  const bool cfg = p.guidance, twice = p.x_in_twice, write_y = p.K > 1, has_x = c[4] != 0.0f;
  const float* __restrict__ Fc = cfg ? p.F + total : p.F;
  const float c_skip = c[0], c_out = c[1], alpha = c[2], beta = c[3], a = c[4], e = c[5], b0 = c[6], c_in = c[7];
  const float w = p.w;
  const uint32_t stream = kStage0Stream + static_cast<uint32_t>(p.stage);
#pragma omp parallel for schedule(static) if (total > (1 << 14))
  for (int64_t b = 0; b < p.batch; ++b) {
    const uint64_t seed = static_cast<uint64_t>(p.seeds[b]);
    for (int64_t j = 0; j < p.per_sample; ++j) {
      const int64_t i = b * p.per_sample + j;
      float f = F[i];
      if (cfg) f = f + w * (Fc[i] - f);
      const float xev = xe[i];
      const float D = c_skip * xev + c_out * f;
      const float y = alpha * xev + beta * D;
      if (write_y) y0[i] = y;
      float acc = has_x ? a * x[i] + e * xev + b0 * y : e * xev + b0 * y;
      for (int t = 0; t < terms; ++t) acc += bk[t] * yk[t][i];
      uint32_t ctr[4] = {static_cast<uint32_t>(j), stream, 0u, 0u};
      philox4x32(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
      acc = acc + n * normal_from_words(ctr[0], ctr[1]);
      xe[i] = acc;
      if (commit) x[i] = acc;
      xin[i] = c_in * acc;
      if (twice) xin[total + i] = c_in * acc;
    }
  }
}

}  // namespace

void fused_step(const StepArgs& p) {
  const double* r = p.row;
  const float c[8] = {static_cast<float>(r[C_SKIP]), static_cast<float>(r[C_OUT]), static_cast<float>(r[ALPHA]),
                      static_cast<float>(r[BETA]),   static_cast<float>(r[A]),     static_cast<float>(r[E]),
                      static_cast<float>(r[B0]),     static_cast<float>(r[C_IN_NEXT])};
  const float n = static_cast<float>(r[N]);
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
  if (n != 0.0f) {
    update_noisy(p, c, n, commit, terms, bk, yk);   // a stochastic stage: noise drawn in the same pass
  } else {
    const int fused_terms = terms < 3 ? terms : 3;
    const bool has_x = c[4] != 0.0f, write_y = K > 1;
    with_flag(p.guidance, [&](auto cfg) {
      with_flag(commit, [&](auto cm) {
        with_flag(p.x_in_twice, [&](auto twice) {
          with_flag(has_x, [&](auto hx) {
            with_flag(write_y, [&](auto wy) {
              update_terms<decltype(cfg)::value, decltype(cm)::value, decltype(twice)::value, decltype(hx)::value,
                           decltype(wy)::value>(fused_terms, p, c, bk, yk);
            });
          });
        });
      });
    });
    extra_terms(p, fused_terms, terms, bk, yk, c[7]);
  }
  const int64_t nsig = p.x_in_twice ? 2 * p.batch : p.batch;
  for (int64_t b = 0; b < nsig; ++b) p.sigma_in[b] = static_cast<float>(r[C_NOISE_NEXT]);
}

void init_state(const double* row0, double t0, double n_init, int64_t batch, int64_t per_sample, const int64_t* seeds,
                const float* x0, float* x, float* x_eval, float* x_in, bool x_in_twice, float* sigma_in) {
  const int64_t total = batch * per_sample;
  // Initial point: the given x0, or t0 times the initial noise.
  if (x0 != nullptr) {
    if (x0 != x) std::copy(x0, x0 + total, x);
  } else {
    randn(seeds, batch, per_sample, kInitialStream, x);
    for (int64_t i = 0; i < total; ++i) x[i] = static_cast<float>(t0) * x[i];
  }
  // Churn before stage 0.
  if (n_init != 0.0) {
    std::vector<float> z(static_cast<std::size_t>(total));
    randn(seeds, batch, per_sample, kChurnStream, z.data());
    for (int64_t i = 0; i < total; ++i) x[i] = x[i] + static_cast<float>(n_init) * z[i];
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
