// The C ABI of include/edmrt.h over the C++ core.
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "edmrt.h"
#include "edmrt_core.hpp"

struct edmrt_plan {
  edmrt::Plan plan;
};

namespace {
void set_err(char* err, size_t n, const std::string& msg) {
  if (err && n) {
    std::strncpy(err, msg.c_str(), n - 1);
    err[n - 1] = '\0';
  }
}
}  // namespace

extern "C" {

edmrt_plan* edmrt_plan_parse(const char* json, char* err, size_t err_len) {
  if (!json) { set_err(err, err_len, "json is NULL"); return nullptr; }
  try {
    return new edmrt_plan{edmrt::plan_from_json(json)};
  } catch (const std::exception& e) {
    set_err(err, err_len, e.what());
    return nullptr;
  }
}

edmrt_plan* edmrt_plan_load(const char* path, char* err, size_t err_len) {
  if (!path) { set_err(err, err_len, "path is NULL"); return nullptr; }
  std::ifstream f(path, std::ios::binary);
  if (!f) { set_err(err, err_len, std::string("cannot open ") + path); return nullptr; }
  std::stringstream ss;
  ss << f.rdbuf();
  return edmrt_plan_parse(ss.str().c_str(), err, err_len);
}

void edmrt_plan_free(edmrt_plan* plan) { delete plan; }

int edmrt_plan_stages(const edmrt_plan* plan) { return plan ? plan->plan.stages : -1; }
int edmrt_plan_history(const edmrt_plan* plan) { return plan ? plan->plan.K : -1; }
double edmrt_plan_sigma(const edmrt_plan* plan, int stage) {
  if (!plan || stage < 0 || stage >= plan->plan.stages) return -1.0;
  return plan->plan.sigma[static_cast<size_t>(stage)];
}

int edmrt_init(const edmrt_plan* plan, const int64_t* seeds, int64_t batch, int64_t per_sample, float* x,
               float* x_eval, float* x_in, float* sigma_in) {
  if (!plan || !seeds || !x || !x_eval || !x_in || !sigma_in || batch < 1 || per_sample < 1) return 1;
  edmrt::init_state(plan->plan.table.data(), plan->plan.sigma0, plan->plan.n_init, batch, per_sample, seeds, nullptr, x,
                    x_eval, x_in, false, sigma_in);
  return 0;
}

int edmrt_step(const edmrt_plan* plan, int stage, const int64_t* seeds, int64_t batch, int64_t per_sample, float* x,
               float* x_eval, const float* F, float* Y, float* x_in, float* sigma_in) {
  if (!plan || !seeds || !x || !x_eval || !F || !Y || !x_in || !sigma_in || batch < 1 || per_sample < 1) return 1;
  if (stage < 0 || stage >= plan->plan.stages) return 2;
  const edmrt::Plan& p = plan->plan;
  edmrt::StepArgs a{};
  a.row = p.table.data() + static_cast<size_t>(stage) * static_cast<size_t>(edmrt::kFixedCols + p.K);
  a.stage = stage; a.K = p.K; a.batch = batch; a.per_sample = per_sample;
  a.x = x; a.x_eval = x_eval; a.F = F; a.guidance = false; a.w = 1.0f; a.Y = Y;
  a.x_in = x_in; a.x_in_twice = false; a.sigma_in = sigma_in; a.seeds = seeds;
  edmrt::fused_step(a);
  return 0;
}

int edmrt_randn(const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t stream, float* out) {
  if (!seeds || !out || batch < 1 || per_sample < 1) return 1;
  edmrt::randn(seeds, batch, per_sample, stream, out);
  return 0;
}

}  // extern "C"
