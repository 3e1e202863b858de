// Fused linear combination: the building block of a plan stage's update
// x_new = a x + e x_eval + sum_k b_k Y_k (../shared/DESIGN.md).
#include "edmrt_core.hpp"

namespace edmrt {

template <typename T>
void lincomb(T* out, const double* coeff, const T* const* in, std::size_t terms, std::size_t n) {
  const std::ptrdiff_t len = static_cast<std::ptrdiff_t>(n);
#pragma omp parallel for schedule(static) if (len > (1 << 16))
  for (std::ptrdiff_t i = 0; i < len; ++i) {
    double acc = 0.0;
    for (std::size_t t = 0; t < terms; ++t) acc += coeff[t] * static_cast<double>(in[t][i]);
    out[i] = static_cast<T>(acc);
  }
}

template void lincomb<float>(float*, const double*, const float* const*, std::size_t, std::size_t);
template void lincomb<double>(double*, const double*, const double* const*, std::size_t, std::size_t);

}  // namespace edmrt
