// edmrt core: plain C++17, no Python headers.  Bindings live in bindings.cpp, the C ABI in capi.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace edmrt {

// ---------------------------------------------------------------- Philox4x32-10 (Salmon et al. 2011)
// key = the sample's 64-bit seed, counter = (element, stream, 0, 0): Triton's tl.randint4x stream.
// Streams (kernels/src/philox.py's INITIAL_STREAM, CHURN_STREAM, STAGE0_STREAM; the bindings export them as STREAMS):
constexpr uint32_t kInitialStream = 0;  // x_init = t0 N(seed, kInitialStream)
constexpr uint32_t kChurnStream = 1;    // the churn before stage 0
constexpr uint32_t kStage0Stream = 2;   // stage s draws kStage0Stream + s
void philox4x32(uint32_t ctr[4], uint32_t k0, uint32_t k1);
// Triton's tl.randn mapping of the first two words: Box-Muller, cosine branch, float32.
float normal_from_words(uint32_t w0, uint32_t w1);
// out[b * per_sample + i] = N(seed_b, stream, i), OpenMP-parallel.
void randn(const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t stream, float* out);

// ---------------------------------------------------------------- the plan table
// Columns of one stage row: kernels/src/table.py's COLUMNS, then the history weights b_0 .. b_{K-1}.
// The bindings export the names as TABLE_COLUMNS, and the tests check them against COLUMNS.
enum Col : int {
  C_IN = 0, C_NOISE, C_SKIP, C_OUT, ALPHA, BETA, A, E, N, COMMIT, C_IN_NEXT, C_NOISE_NEXT, B0
};
constexpr int kFixedCols = B0;

// The column's name in kernels/src/table.py ("b_0" for the first history column); -Wswitch flags a missing one.
constexpr const char* column_name(Col c) {
  switch (c) {
    case C_IN: return "c_in";
    case C_NOISE: return "c_noise";
    case C_SKIP: return "c_skip";
    case C_OUT: return "c_out";
    case ALPHA: return "alpha";
    case BETA: return "beta";
    case A: return "a";
    case E: return "e";
    case N: return "n";
    case COMMIT: return "commit";
    case C_IN_NEXT: return "c_in_next";
    case C_NOISE_NEXT: return "c_noise_next";
    case B0: return "b_0";
  }
  return "";
}

struct StepArgs {
  const double* row;       // the stage's row of the table (kFixedCols + K values)
  int stage;               // stage index s (history slot s % K)
  int K;                   // history depth
  int64_t batch;           // B
  int64_t per_sample;      // elements per sample
  float* x;                // (B, per_sample) committed state, in/out
  float* x_eval;           // (B, per_sample) evaluation point, in/out
  const float* F;          // (B or 2B, per_sample) raw network output; 2B = [uncond; cond] with guidance
  bool guidance;           // classifier-free guidance: F = F_u + w (F_c - F_u)
  float w;                 // guidance weight
  float* Y;                // (K, B, per_sample) history ring, slot s % K written
  float* x_in;             // (B or 2B, per_sample) next network input c_in[s+1] * x_new (2B: both halves)
  bool x_in_twice;
  float* sigma_in;         // (B or 2B) next network noise input c_noise[s+1]
  const int64_t* seeds;    // (B) per-sample seeds
  const float* noise = nullptr;  // (B, per_sample) this stage's given noise z (an inversion's noise map), or
                                 // nullptr: z is the Philox normal of (seed, stage stream, element)
};

// One stage of a plan (the equations of kernels/src/reference.py): D, the history entry, the linear update, noise,
// commit, next input.
void fused_step(const StepArgs& a);

// The instruction set fused_step's deterministic update runs with: "avx2" on an x86-64 CPU that has it (GCC
// builds), else "baseline"; EDMRT_STEP_ISA=baseline in the environment (read at the first call) forces the
// baseline.  Both give the same bits.
const char* step_isa();

// Initial state: x = x_eval = t0 N(seed, kInitialStream) + n_init N(seed, kChurnStream), or, with a given x0
// (non-null, batch * per_sample floats; may be x itself), x = x_eval = x0 + n_init N(seed, kChurnStream);
// x_in = c_in[0] x (both halves when x_in_twice); sigma_in = c_noise[0].
void init_state(const double* row0, double t0, double n_init, int64_t batch, int64_t per_sample, const int64_t* seeds,
                const float* x0, float* x, float* x_eval, float* x_in, bool x_in_twice, float* sigma_in);

// ---------------------------------------------------------------- plans from JSON (the C ABI uses this)
struct Plan {
  int stages = 0, K = 0;
  double sigma0 = 0.0, n_init = 0.0;
  std::vector<double> sigma;   // (S) network sigma per stage
  std::vector<double> table;   // (S, kFixedCols + K), the same layout as kernels/src/table.py
  std::string solver;
};
// Parse an edmrt plan JSON (format "edmrt.plan", version 1); throws std::runtime_error with the reason.
Plan plan_from_json(const std::string& text);

}  // namespace edmrt
