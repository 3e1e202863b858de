// C ABI test host: every function of include/edmrt.h on bad arguments returns its documented error (NULL with a
// message, -1, or an EDMRT_ERR_* code) instead of throwing, aborting or touching memory it was not given.
// Prints one line per failed check; exit 0 when all pass.  Usage: capi_errors VALID_PLAN.json
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "edmrt.h"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

bool contains(const char* s, const char* part) { return s && std::strstr(s, part) != nullptr; }

void loading() {
  char err[256];
  std::memset(err, 'x', sizeof err);
  check(edmrt_plan_load(nullptr, err, sizeof err) == nullptr && contains(err, "path is NULL"), "load(NULL)");
  check(edmrt_plan_load("/dev/zero", err, sizeof err) == nullptr && contains(err, "not a regular file"),
        "load(/dev/zero) is refused");
  check(edmrt_plan_load("/", err, sizeof err) == nullptr && contains(err, "not a regular file"), "load(a directory)");
  check(edmrt_plan_load("/nonexistent/plan.json", err, sizeof err) == nullptr && contains(err, "cannot open"),
        "load(a missing file)");
  check(edmrt_plan_load("/dev/zero", nullptr, 0) == nullptr, "load without an error buffer");
  check(edmrt_plan_parse(nullptr, err, sizeof err) == nullptr && contains(err, "json is NULL"), "parse(NULL)");
  check(edmrt_plan_parse("", err, sizeof err) == nullptr && contains(err, "malformed"), "parse(\"\")");
  check(edmrt_plan_parse("{\"format\": \"edmrt.plan\", \"version\": 1, \"sigmas\": [1e999", err, sizeof err) ==
            nullptr && contains(err, "out of range"), "parse(1e999)");
  // A short buffer holds the start of the message, NUL-terminated; a one-byte buffer holds "".
  char small[8];
  std::memset(small, 'x', sizeof small);
  check(edmrt_plan_parse("[", small, sizeof small) == nullptr && std::strlen(small) == sizeof small - 1,
        "a short error buffer is truncated and NUL-terminated");
  char one = 'x';
  check(edmrt_plan_parse("[", &one, 1) == nullptr && one == '\0', "a one-byte error buffer holds \"\"");
  edmrt_plan_free(nullptr);
  check(edmrt_plan_stages(nullptr) == -1 && edmrt_plan_history(nullptr) == -1 && edmrt_plan_sigma(nullptr, 0) == -1.0,
        "accessors of a NULL plan");
}

void stepping(const edmrt_plan* p) {
  const int S = edmrt_plan_stages(p), K = edmrt_plan_history(p);
  check(S >= 1 && K >= 1, "the valid plan loads");
  check(edmrt_plan_sigma(p, -1) == -1.0 && edmrt_plan_sigma(p, S) == -1.0 && edmrt_plan_sigma(p, 0) > 0.0,
        "edmrt_plan_sigma's stage range");
  const int64_t B = 2, n = 3, seeds[2] = {1, 2};
  std::vector<float> x(B * n), xe(B * n), xin(B * n), F(B * n), Y(static_cast<size_t>(K * B * n)), sig(B);
  float *px = x.data(), *pe = xe.data(), *pi = xin.data(), *ps = sig.data(), *pY = Y.data();
  const float* pF = F.data();
  check(edmrt_init(nullptr, seeds, B, n, px, pe, pi, ps) == EDMRT_ERR_NULL, "init: NULL plan");
  check(edmrt_init(p, nullptr, B, n, px, pe, pi, ps) == EDMRT_ERR_NULL, "init: NULL seeds");
  check(edmrt_init(p, seeds, B, n, px, pe, nullptr, ps) == EDMRT_ERR_NULL, "init: NULL x_in");
  check(edmrt_init(p, seeds, 0, n, px, pe, pi, ps) == EDMRT_ERR_SIZE, "init: batch 0");
  check(edmrt_init(p, seeds, B, -1, px, pe, pi, ps) == EDMRT_ERR_SIZE, "init: per_sample -1");
  check(edmrt_init(p, seeds, INT64_MAX, 2, px, pe, pi, ps) == EDMRT_ERR_SIZE, "init: batch * per_sample overflows");
  check(edmrt_init(p, seeds, B, n, px, pe, pi, ps) == EDMRT_OK, "init: valid");
  check(edmrt_step(p, -1, seeds, B, n, px, pe, pF, pY, pi, ps) == EDMRT_ERR_STAGE, "step: stage -1");
  check(edmrt_step(p, S, seeds, B, n, px, pe, pF, pY, pi, ps) == EDMRT_ERR_STAGE, "step: stage S");
  check(edmrt_step(p, 0, seeds, B, n, px, pe, nullptr, pY, pi, ps) == EDMRT_ERR_NULL, "step: NULL F");
  check(edmrt_step(p, 0, seeds, B, n, px, pe, pF, nullptr, pi, ps) == EDMRT_ERR_NULL, "step: NULL Y");
  check(edmrt_step(nullptr, 0, seeds, B, n, px, pe, pF, pY, pi, ps) == EDMRT_ERR_NULL, "step: NULL plan");
  check(edmrt_step(p, 0, seeds, B, 0, px, pe, pF, pY, pi, ps) == EDMRT_ERR_SIZE, "step: per_sample 0");
  check(edmrt_step(p, 0, seeds, INT64_MAX / 4, 4, px, pe, pF, pY, pi, ps) == EDMRT_ERR_SIZE, "step: size overflows");
  for (int s = 0; s < S; ++s) check(edmrt_step(p, s, seeds, B, n, px, pe, pF, pY, pi, ps) == EDMRT_OK, "step: valid");
  check(edmrt_randn(nullptr, B, n, 0, px) == EDMRT_ERR_NULL, "randn: NULL seeds");
  check(edmrt_randn(seeds, B, n, 0, nullptr) == EDMRT_ERR_NULL, "randn: NULL out");
  check(edmrt_randn(seeds, -3, n, 0, px) == EDMRT_ERR_SIZE, "randn: batch -3");
  check(edmrt_randn(seeds, B, n, 7, px) == EDMRT_OK, "randn: valid");
  for (int code : {EDMRT_OK, EDMRT_ERR_NULL, EDMRT_ERR_STAGE, EDMRT_ERR_SIZE, EDMRT_ERR_INTERNAL, -1, 99})
    check(edmrt_status_string(code) != nullptr && std::strlen(edmrt_status_string(code)) > 0, "status strings");
  check(contains(edmrt_status_string(EDMRT_ERR_STAGE), "stage"), "EDMRT_ERR_STAGE's description");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s VALID_PLAN.json\n", argv[0]);
    return 2;
  }
  loading();
  char err[512] = {0};
  edmrt_plan* p = edmrt_plan_load(argv[1], err, sizeof err);
  if (!p) {
    std::printf("FAILED: %s does not load: %s\n", argv[1], err);
    return 1;
  }
  stepping(p);
  edmrt_plan_free(p);
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
