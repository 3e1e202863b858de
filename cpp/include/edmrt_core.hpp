// edmrt core: plain C++17, no Python headers.
#pragma once
#include <cstddef>
#include <cstdint>

namespace edmrt {

// out[i] = sum_t coeff[t] * in[t][i] for i < n.  `out` may alias any input: each element is
// read from every input before it is written.  OpenMP-parallel over i.
template <typename T>
void lincomb(T* out, const double* coeff, const T* const* in, std::size_t terms, std::size_t n);

}  // namespace edmrt
