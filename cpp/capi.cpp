// The C ABI of include/edmrt.h over the C++ core.  No exception crosses it: every function body is inside
// try / catch (...), and failures return NULL (with a message) or an EDMRT_ERR_* code.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>

#include "edmrt.h"
#include "edmrt_core.hpp"

struct edmrt_plan {
  edmrt::Plan plan;
};

namespace {

void set_err(char* err, size_t n, const char* msg) noexcept {
  if (err && n) {
    std::strncpy(err, msg, n - 1);
    err[n - 1] = '\0';
  }
}

// The text of a plan file: a regular file (a device such as /dev/zero, a FIFO or a directory is refused before
// it is opened), read up to EDMRT_MAX_PLAN_BYTES.
std::string read_plan_file(const char* path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec) throw std::runtime_error(std::string("cannot open plan file ") + path + ": " + ec.message());
  if (!fs::is_regular_file(st)) throw std::runtime_error(std::string("plan file ") + path + " is not a regular file");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(std::string("cannot open plan file ") + path);
  std::string text;
  char buf[1 << 16];
  while (f.read(buf, sizeof buf) || f.gcount() > 0) {
    text.append(buf, static_cast<size_t>(f.gcount()));
    if (text.size() > EDMRT_MAX_PLAN_BYTES)
      throw std::runtime_error(std::string("plan file ") + path + " is larger than EDMRT_MAX_PLAN_BYTES (" +
                               std::to_string(EDMRT_MAX_PLAN_BYTES >> 20) + " MiB)");
  }
  if (f.bad()) throw std::runtime_error(std::string("cannot read plan file ") + path);
  return text;
}

// A plan from `make()` (which may throw), or NULL with the reason in err.
template <typename Make>
edmrt_plan* guarded_plan(char* err, size_t err_len, Make&& make) noexcept {
  try {
    return new edmrt_plan{make()};
  } catch (const std::bad_alloc&) {
    set_err(err, err_len, "out of memory reading the plan");
  } catch (const std::exception& e) {
    set_err(err, err_len, e.what());
  } catch (...) {
    set_err(err, err_len, "unknown error reading the plan");
  }
  return nullptr;
}

// The sizes of B samples of n elements and of K such buffers: EDMRT_ERR_SIZE unless batch, per_sample >= 1 and
// K * batch * per_sample floats fit in a ptrdiff_t.
int check_sizes(int64_t batch, int64_t per_sample, int64_t K) {
  if (batch < 1 || per_sample < 1) return EDMRT_ERR_SIZE;
  const int64_t max_floats = std::numeric_limits<std::ptrdiff_t>::max() / static_cast<int64_t>(sizeof(float));
  if (per_sample > max_floats / K / batch) return EDMRT_ERR_SIZE;
  return EDMRT_OK;
}

// The status of `run()` (which may throw): EDMRT_ERR_INTERNAL for any exception.
template <typename Run>
int guarded(Run&& run) noexcept {
  try {
    return run();
  } catch (...) {
    return EDMRT_ERR_INTERNAL;
  }
}

}  // namespace

extern "C" {

edmrt_plan* edmrt_plan_parse(const char* json, char* err, size_t err_len) {
  return guarded_plan(err, err_len, [&] {
    if (!json) throw std::invalid_argument("json is NULL");
    return edmrt::plan_from_json(json);
  });
}

edmrt_plan* edmrt_plan_load(const char* path, char* err, size_t err_len) {
  return guarded_plan(err, err_len, [&] {
    if (!path) throw std::invalid_argument("path is NULL");
    return edmrt::plan_from_json(read_plan_file(path));
  });
}

void edmrt_plan_free(edmrt_plan* plan) {
  try {
    delete plan;
  } catch (...) {
  }
}

int edmrt_plan_stages(const edmrt_plan* plan) {
  try {
    return plan ? plan->plan.stages : -1;
  } catch (...) {
    return -1;
  }
}

int edmrt_plan_history(const edmrt_plan* plan) {
  try {
    return plan ? plan->plan.K : -1;
  } catch (...) {
    return -1;
  }
}

double edmrt_plan_sigma(const edmrt_plan* plan, int stage) {
  try {
    if (!plan || stage < 0 || stage >= plan->plan.stages) return -1.0;
    return plan->plan.sigma[static_cast<size_t>(stage)];
  } catch (...) {
    return -1.0;
  }
}

int edmrt_init(const edmrt_plan* plan, const int64_t* seeds, int64_t batch, int64_t per_sample, float* x,
               float* x_eval, float* x_in, float* sigma_in) {
  return guarded([&] {
    if (!plan || !seeds || !x || !x_eval || !x_in || !sigma_in) return EDMRT_ERR_NULL;
    if (const int rc = check_sizes(batch, per_sample, 1)) return rc;
    const edmrt::Plan& p = plan->plan;
    edmrt::init_state(p.table.data(), p.sigma0, p.n_init, batch, per_sample, seeds, nullptr, x, x_eval, x_in, false,
                      sigma_in);
    return EDMRT_OK;
  });
}

int edmrt_step(const edmrt_plan* plan, int stage, const int64_t* seeds, int64_t batch, int64_t per_sample, float* x,
               float* x_eval, const float* F, float* Y, float* x_in, float* sigma_in) {
  return guarded([&] {
    if (!plan || !seeds || !x || !x_eval || !F || !Y || !x_in || !sigma_in) return EDMRT_ERR_NULL;
    const edmrt::Plan& p = plan->plan;
    if (stage < 0 || stage >= p.stages) return EDMRT_ERR_STAGE;
    if (const int rc = check_sizes(batch, per_sample, p.K)) return rc;
    edmrt::StepArgs a{};
    a.row = p.table.data() + static_cast<size_t>(stage) * static_cast<size_t>(edmrt::kFixedCols + p.K);
    a.stage = stage; a.K = p.K; a.batch = batch; a.per_sample = per_sample;
    a.x = x; a.x_eval = x_eval; a.F = F; a.guidance = false; a.w = 1.0f; a.Y = Y;
    a.x_in = x_in; a.x_in_twice = false; a.sigma_in = sigma_in; a.seeds = seeds;
    edmrt::fused_step(a);
    return EDMRT_OK;
  });
}

int edmrt_randn(const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t stream, float* out) {
  return guarded([&] {
    if (!seeds || !out) return EDMRT_ERR_NULL;
    if (const int rc = check_sizes(batch, per_sample, 1)) return rc;
    edmrt::randn(seeds, batch, per_sample, stream, out);
    return EDMRT_OK;
  });
}

const char* edmrt_status_string(int status) {
  try {
    switch (status) {
      case EDMRT_OK: return "ok";
      case EDMRT_ERR_NULL: return "the plan, seeds or a buffer pointer is NULL";
      case EDMRT_ERR_STAGE: return "stage is outside [0, edmrt_plan_stages(plan))";
      case EDMRT_ERR_SIZE: return "batch and per_sample must be >= 1, and the buffers' byte size must fit in ptrdiff_t";
      case EDMRT_ERR_INTERNAL: return "a failure inside the edmrt core (e.g. out of memory)";
      default: return "unknown status";
    }
  } catch (...) {
    return "unknown status";
  }
}

}  // extern "C"
