// C ABI test host: load each plan file through include/edmrt.h and print one line per file,
// "accepted<TAB>PATH" or "rejected<TAB>PATH<TAB>REASON".  An accepted plan is then run (edmrt_init, every
// edmrt_step) on B = 3 samples of 7 elements with a Gaussian denoiser's output as the network output F, and
// its final state must be finite.  Exit 0 when every file was handled, 1 on an ABI error code or a
// non-finite result of an accepted plan, 2 on bad usage.  Usage: plan_check PLAN.json...
#include <cmath>
#include <cstdio>
#include <vector>

#include "edmrt.h"

namespace {

// Every stage of `plan` with F = mu + s^2 / (s^2 + sigma^2) (x_in - mu); 0 when the final state is finite.
int run(const edmrt_plan* plan, const char* path) {
  const int64_t B = 3, n = 7;
  const size_t N = static_cast<size_t>(B * n);
  const int64_t seeds[B] = {4, 8, 1LL << 40};
  std::vector<float> x(N), xe(N), xin(N), F(N), Y(static_cast<size_t>(edmrt_plan_history(plan)) * N), sig(B);
  int rc = edmrt_init(plan, seeds, B, n, x.data(), xe.data(), xin.data(), sig.data());
  for (int st = 0; rc == EDMRT_OK && st < edmrt_plan_stages(plan); ++st) {
    for (size_t i = 0; i < N; ++i) {
      const double sigma = sig[i / static_cast<size_t>(n)];
      F[i] = static_cast<float>(0.3 + 0.25 / (0.25 + sigma * sigma) * (xin[i] - 0.3));
    }
    rc = edmrt_step(plan, st, seeds, B, n, x.data(), xe.data(), F.data(), Y.data(), xin.data(), sig.data());
  }
  if (rc != EDMRT_OK) {
    std::fprintf(stderr, "%s: %s\n", path, edmrt_status_string(rc));
    return 1;
  }
  for (float v : x) {
    if (!std::isfinite(v)) {
      std::fprintf(stderr, "%s: accepted, but its final state is not finite\n", path);
      return 1;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s PLAN.json...\n", argv[0]);
    return 2;
  }
  int status = 0;
  for (int i = 1; i < argc; ++i) {
    char err[512] = {0};
    edmrt_plan* plan = edmrt_plan_load(argv[i], err, sizeof err);
    if (!plan) {
      std::printf("rejected\t%s\t%s\n", argv[i], err);
      continue;
    }
    std::printf("accepted\t%s\n", argv[i]);
    if (run(plan, argv[i]) != 0) status = 1;
    edmrt_plan_free(plan);
  }
  return status;
}
