// Python bindings of the edmrt core (pybind11); logic lives in the other files of cpp/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "edmrt_core.hpp"

namespace py = pybind11;

namespace {

// Check dtype, contiguity and size *before* touching a pointer: pybind11's array_t would
// silently copy a non-contiguous or mistyped array, and a write into that copy is lost.
template <typename T>
void lincomb_typed(py::array out, const std::vector<double>& coeff, const std::vector<py::array>& in) {
  const auto size = static_cast<std::size_t>(out.size());
  std::vector<const T*> ptrs;
  ptrs.reserve(in.size());
  for (std::size_t t = 0; t < in.size(); ++t) {
    const py::array& a = in[t];
    if (!a.dtype().is(out.dtype()))
      throw py::value_error("inputs[" + std::to_string(t) + "] must have dtype " +
                            std::string(py::str(out.dtype())) + " like out, got " + std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style))
      throw py::value_error("inputs[" + std::to_string(t) + "] must be C-contiguous");
    if (static_cast<std::size_t>(a.size()) != size)
      throw py::value_error("inputs[" + std::to_string(t) + "] must have " + std::to_string(size) +
                            " elements like out, got " + std::to_string(a.size()));
    ptrs.push_back(static_cast<const T*>(a.data()));
  }
  T* dst = static_cast<T*>(out.mutable_data());
  py::gil_scoped_release release;
  edmrt::lincomb<T>(dst, coeff.data(), ptrs.data(), ptrs.size(), size);
}

void lincomb(py::array out, const std::vector<double>& coeff, const std::vector<py::array>& in) {
  if (coeff.size() != in.size())
    throw py::value_error("coeffs must hold one value per input: " + std::to_string(in.size()) + " inputs, got " +
                          std::to_string(coeff.size()) + " coeffs");
  if (!(out.flags() & py::array::c_style)) throw py::value_error("out must be C-contiguous");
  if (!out.writeable()) throw py::value_error("out must be writeable");
  if (out.dtype().is(py::dtype::of<float>())) return lincomb_typed<float>(out, coeff, in);
  if (out.dtype().is(py::dtype::of<double>())) return lincomb_typed<double>(out, coeff, in);
  throw py::value_error("out must have dtype float32 or float64, got " + std::string(py::str(out.dtype())));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "edmrt compiled core (C++17)";
  m.def("lincomb", &lincomb, py::arg("out"), py::arg("coeffs"), py::arg("inputs"),
        "out[i] = sum_t coeffs[t] * inputs[t][i] (float32 or float64, C-contiguous, accumulated in float64; "
        "out may alias an input; GIL released).");
}
