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
 * Buffers are caller-owned, float32, contiguous, B samples of n elements, and must not overlap.  No function
 * throws or aborts: edmrt_plan_load / edmrt_plan_parse return NULL with a message in `err` (where given) on
 * failure; edmrt_init, edmrt_step and edmrt_randn return EDMRT_OK (0) or one of the codes below, which
 * edmrt_status_string describes.
 */
#ifndef EDMRT_H
#define EDMRT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes of edmrt_init, edmrt_step and edmrt_randn. */
#define EDMRT_OK 0
#define EDMRT_ERR_NULL 1     /* the plan, seeds or a buffer pointer is NULL */
#define EDMRT_ERR_STAGE 2    /* stage is outside [0, edmrt_plan_stages(plan)) */
#define EDMRT_ERR_SIZE 3     /* batch < 1, per_sample < 1, or the buffers' byte size overflows */
#define EDMRT_ERR_INTERNAL 4 /* a failure inside the core, e.g. out of memory */

/* edmrt_plan_load reads at most this many bytes: a larger file (or a device, FIFO or directory) is refused. */
#define EDMRT_MAX_PLAN_BYTES (64u * 1024u * 1024u)

typedef struct edmrt_plan edmrt_plan;

/* A plan from a JSON file (engine/src/plan.py's Plan.save) or a NUL-terminated JSON text; NULL with a message in
 * err (truncated to err_len - 1 characters, NUL-terminated) when the file or the plan is invalid. */
edmrt_plan* edmrt_plan_load(const char* path, char* err, size_t err_len);
edmrt_plan* edmrt_plan_parse(const char* json, char* err, size_t err_len);
void edmrt_plan_free(edmrt_plan* plan); /* NULL is allowed */

int edmrt_plan_stages(const edmrt_plan* plan);  /* S: network evaluations; -1 for a NULL plan */
int edmrt_plan_history(const edmrt_plan* plan); /* K: history slots Y needs; -1 for a NULL plan */
double edmrt_plan_sigma(const edmrt_plan* plan, int stage); /* sigma of the stage; -1.0 for a NULL plan or bad stage */

int edmrt_init(const edmrt_plan* plan, const int64_t* seeds, int64_t batch, int64_t per_sample, float* x,
               float* x_eval, float* x_in, float* sigma_in);
int edmrt_step(const edmrt_plan* plan, int stage, const int64_t* seeds, int64_t batch, int64_t per_sample, float* x,
               float* x_eval, const float* F, float* Y, float* x_in, float* sigma_in);
/* Standard normal noise, out[b * n + i] = N(seed_b, stream, i).  Streams: 0 = the initial noise, 1 = the churn
 * before stage 0, 2 + s = the noise of stage s (kernels/src/philox.py's INITIAL_STREAM, CHURN_STREAM and
 * stage_stream(s); edmrt_core.hpp's kInitialStream, kChurnStream, kStage0Stream + s). */
int edmrt_randn(const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t stream, float* out);

/* A static, NUL-terminated description of a return code ("unknown status" for others). */
const char* edmrt_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* EDMRT_H */
