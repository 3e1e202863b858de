// C ABI test host: run a plan (e.g. Heun) through include/edmrt.h with a closed-form Gaussian
// denoiser written here, D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) per element, and print
// the final state, one value per line.  Usage: heun_gaussian PLAN.json BATCH PER_SAMPLE MU S SEED...
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "edmrt.h"

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s PLAN.json BATCH PER_SAMPLE MU S SEED...\n", argv[0]);
    return 2;
  }
  char err[512] = {0};
  edmrt_plan* plan = edmrt_plan_load(argv[1], err, sizeof err);
  if (!plan) {
    std::fprintf(stderr, "edmrt_plan_load: %s\n", err);
    return 1;
  }
  const int64_t B = std::atoll(argv[2]), n = std::atoll(argv[3]);
  const double mu = std::atof(argv[4]), s = std::atof(argv[5]);
  if (B < 1 || n < 1) {
    std::fprintf(stderr, "BATCH and PER_SAMPLE must be >= 1\n");
    return 2;
  }
  if (argc != 6 + B) {
    std::fprintf(stderr, "need %lld seeds\n", static_cast<long long>(B));
    return 2;
  }
  std::vector<int64_t> seeds(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) seeds[static_cast<size_t>(b)] = std::atoll(argv[6 + b]);
  const size_t N = static_cast<size_t>(B * n);
  const int K = edmrt_plan_history(plan);
  std::vector<float> x(N), xe(N), xin(N), F(N), Y(static_cast<size_t>(K) * N), sig(static_cast<size_t>(B));
  int rc = edmrt_init(plan, seeds.data(), B, n, x.data(), xe.data(), xin.data(), sig.data());
  for (int st = 0; rc == EDMRT_OK && st < edmrt_plan_stages(plan); ++st) {
    // The plan of a D(x; sigma) denoiser (Identity preconditioning): x_in = x_eval, sigma_in = sigma.
    for (size_t i = 0; i < N; ++i) {
      const double sigma = sig[i / static_cast<size_t>(n)];
      F[i] = static_cast<float>(mu + s * s / (s * s + sigma * sigma) * (xin[i] - mu));
    }
    rc = edmrt_step(plan, st, seeds.data(), B, n, x.data(), xe.data(), F.data(), Y.data(), xin.data(), sig.data());
  }
  if (rc != EDMRT_OK) {
    std::fprintf(stderr, "edmrt: %s\n", edmrt_status_string(rc));
    edmrt_plan_free(plan);
    return 1;
  }
  for (size_t i = 0; i < N; ++i) std::printf("%.9g\n", static_cast<double>(x[i]));
  edmrt_plan_free(plan);
  return 0;
}
