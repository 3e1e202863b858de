/* edmrt C ABI: run an edmrt plan from C or C++ without Python.
 *
 *   edmrt_plan* p = edmrt_plan_load("plan.json", err, sizeof err);      // edmrt plan heun --json plan.json
 *   edmrt_init(p, seeds, B, n, x, x_eval, x_in, sigma_in);               // x = t0 N(seed, 0) (+ churn, stream 1)
 *   for (int s = 0; s < edmrt_plan_stages(p); ++s) {
 *     my_network(x_in, sigma_in, F);                                      // F = raw output at (c_in x, c_noise)
 *     edmrt_step(p, s, seeds, B, n, x, x_eval, F, Y, x_in, sigma_in);     // Y: K * B * n floats of history
 *   }
 *   edmrt_plan_free(p);
 *
 * Buffers are caller-owned, float32, contiguous, B samples of n elements.  Functions return 0 on
 * success and a non-zero code with a message in `err` (where given) on failure.
 */
#ifndef EDMRT_H
#define EDMRT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct edmrt_plan edmrt_plan;

edmrt_plan* edmrt_plan_load(const char* path, char* err, size_t err_len);
edmrt_plan* edmrt_plan_parse(const char* json, char* err, size_t err_len);
void edmrt_plan_free(edmrt_plan* plan);

int edmrt_plan_stages(const edmrt_plan* plan);   /* S: network evaluations */
int edmrt_plan_history(const edmrt_plan* plan);  /* K: history slots Y needs */
double edmrt_plan_sigma(const edmrt_plan* plan, int stage);

int edmrt_init(const edmrt_plan* plan, const int64_t* seeds, int64_t batch, int64_t per_sample, float* x,
               float* x_eval, float* x_in, float* sigma_in);
int edmrt_step(const edmrt_plan* plan, int stage, const int64_t* seeds, int64_t batch, int64_t per_sample, float* x,
               float* x_eval, const float* F, float* Y, float* x_in, float* sigma_in);
/* Standard normal noise, out[b * n + i] = N(seed_b, stream, i).  Streams: 0 = the initial noise, 1 = the churn
 * before stage 0, 2 + s = the noise of stage s (kernels/philox.py's INITIAL_STREAM, CHURN_STREAM and
 * stage_stream(s); edmrt_core.hpp's kInitialStream, kChurnStream, kStage0Stream + s). */
int edmrt_randn(const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t stream, float* out);

#ifdef __cplusplus
}
#endif

#endif /* EDMRT_H */
