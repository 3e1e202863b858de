// The fused step on the CPU: one pass over memory per network evaluation (kernels/src/reference.py's stage).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "edmrt_core.hpp"

// Runtime dispatch to an AVX2 build of the update uses GCC's target pragma and __builtin_cpu_supports, so it is built
// by GCC on x86-64 (Clang spells the pragma differently); elsewhere only the baseline build exists.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EDMRT_STEP_AVX2 1
#else
#define EDMRT_STEP_AVX2 0
#endif

namespace edmrt {

namespace {

// Calls f(std::true_type) or f(std::false_type): a runtime flag turned into a template argument.
template <typename Fn>
void with_flag(bool flag, Fn&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Below this many elements the step runs on the calling thread.
constexpr int64_t kParallelMin = int64_t{1} << 15;

struct Slice {
  int64_t lo, hi;
};
// This OpenMP thread's share of [0, total): contiguous, cut at multiples of 16 elements.
Slice thread_slice(int64_t total) {
#ifdef _OPENMP
  const int64_t n = omp_get_num_threads(), t = omp_get_thread_num();
#else
  const int64_t n = 1, t = 0;
#endif
  const int64_t chunk = ((total + n - 1) / n + 15) / 16 * 16;
  return {std::min(total, t * chunk), std::min(total, (t + 1) * chunk)};
}

// The deterministic update compiled twice: for the x86-64 baseline (SSE2) and for AVX2, chosen at run time.  AVX2
// without FMA: the same IEEE float operations, so the same bits, only twice as many per instruction (the loop is
// bound by loads and stores when the state is in cache).  No FMA is enabled in either, so no multiply-add is fused.
namespace baseline {
#include "step_update.inc"
}  // namespace baseline

#if EDMRT_STEP_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include "step_update.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

using DeterministicFn = void (*)(const StepArgs&, const float (&)[8], bool, int, const float*, const float* const*);

// The instruction set the step uses: AVX2 where the CPU has it, unless EDMRT_STEP_ISA=baseline (read once).
const char* choose_isa() {
#if EDMRT_STEP_AVX2
  const char* env = std::getenv("EDMRT_STEP_ISA");
  if (env != nullptr && std::strcmp(env, "baseline") == 0) return "baseline";
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "baseline";
}

DeterministicFn deterministic_for(const char* isa) {
#if EDMRT_STEP_AVX2
  if (std::strcmp(isa, "avx2") == 0) return avx2::deterministic;
#endif
  (void)isa;
  return baseline::deterministic;
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
// Philox normal keyed by (sample seed, stage's stream, element), or the given noise (StepArgs::noise: an inversion's
// noise map), then the stores.  The same float operations in the same order as the deterministic update followed by
// a noise pass, so the result is the same bit for bit; the second read and write of x_eval, x and x_in is gone.
// Philox dominates here, so the loop is not specialised.
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
  const float* __restrict__ given = p.noise;
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
      float z;
      if (given != nullptr) {
        z = given[i];
      } else {
        uint32_t ctr[4] = {static_cast<uint32_t>(j), stream, 0u, 0u};
        philox4x32(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
        z = normal_from_words(ctr[0], ctr[1]);
      }
      acc = acc + n * z;
      xe[i] = acc;
      if (commit) x[i] = acc;
      xin[i] = c_in * acc;
      if (twice) xin[total + i] = c_in * acc;
    }
  }
}

}  // namespace

const char* step_isa() {
  static const char* const isa = choose_isa();
  return isa;
}

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
    static const DeterministicFn run = deterministic_for(step_isa());
    run(p, c, commit, fused_terms, bk, yk);
    extra_terms(p, fused_terms, terms, bk, yk, c[7]);
  }
  const int64_t nsig = p.x_in_twice ? 2 * p.batch : p.batch;
  for (int64_t b = 0; b < nsig; ++b) p.sigma_in[b] = static_cast<float>(r[C_NOISE_NEXT]);
}

namespace {

// The last pass of init_state: v = SCALE ? t0 src : src, then v + n z (CHURN), stored to x, x_eval and x_in = c_in v
// (both halves when TWICE).  src may be x itself (element i is read before it is written).
template <bool SCALE, bool CHURN, bool TWICE>
void init_pass(int64_t total, const float* src, float t0, float n, const float* z, float c_in, float* x,
               float* __restrict__ x_eval, float* __restrict__ x_in) {
#pragma omp parallel for simd schedule(static) if (parallel : total >= kParallelMin)
  for (int64_t i = 0; i < total; ++i) {
    float v = SCALE ? t0 * src[i] : src[i];
    if (CHURN) v = v + n * z[i];
    x[i] = v;
    x_eval[i] = v;
    x_in[i] = c_in * v;
    if (TWICE) x_in[total + i] = c_in * v;
  }
}

}  // namespace

void init_state(const double* row0, double t0, double n_init, int64_t batch, int64_t per_sample, const int64_t* seeds,
                const float* x0, float* x, float* x_eval, float* x_in, bool x_in_twice, float* sigma_in) {
  const int64_t total = batch * per_sample;
  // Initial point: the given x0, or t0 times the initial noise (drawn into x, scaled in the pass below).
  const bool scale = x0 == nullptr;
  if (scale) randn(seeds, batch, per_sample, kInitialStream, x);
  // Churn before stage 0.
  std::vector<float> z;
  if (n_init != 0.0) {
    z.resize(static_cast<std::size_t>(total));
    randn(seeds, batch, per_sample, kChurnStream, z.data());
  }
  const float* src = scale ? x : x0;
  with_flag(scale, [&](auto sc) {
    with_flag(n_init != 0.0, [&](auto churn) {
      with_flag(x_in_twice, [&](auto twice) {
        init_pass<decltype(sc)::value, decltype(churn)::value, decltype(twice)::value>(
            total, src, static_cast<float>(t0), static_cast<float>(n_init), z.data(), static_cast<float>(row0[C_IN]),
            x, x_eval, x_in);
      });
    });
  });
  const int64_t nsig = x_in_twice ? 2 * batch : batch;
  for (int64_t b = 0; b < nsig; ++b) sigma_in[b] = static_cast<float>(row0[C_NOISE]);
}

}  // namespace edmrt
