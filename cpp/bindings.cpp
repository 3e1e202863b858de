// Python bindings of the edmrt core (pybind11); logic lives in the other files of cpp/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "edmrt_core.hpp"

namespace py = pybind11;

namespace {

// Check dtype, contiguity and size *before* touching a pointer: pybind11's array_t would
// silently copy a non-contiguous or mistyped array, and a write into that copy is lost.
template <typename T>
const T* checked(const py::array& a, const char* name, int64_t size) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::value_error(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                          ", got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (size >= 0 && a.size() != size)
    throw py::value_error(std::string(name) + " must have " + std::to_string(size) + " elements, got " +
                          std::to_string(a.size()));
  return static_cast<const T*>(a.data());
}

template <typename T>
T* writable(py::array& a, const char* name, int64_t size) {
  if (!a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
  checked<T>(a, name, size);
  return static_cast<T*>(a.mutable_data());
}

void fused_step(py::array table, int stage, py::array x, py::array x_eval, py::array F, py::array Y, py::array x_in,
                py::array sigma_in, py::array seeds, int64_t batch, double guidance) {
  if (table.ndim() != 2) throw py::value_error("table must be 2-D (stages, columns)");
  const int64_t S = table.shape(0), W = table.shape(1);
  const int K = static_cast<int>(W - edmrt::kFixedCols);
  if (K < 1 || K > 16) throw py::value_error("table must have " + std::to_string(edmrt::kFixedCols) + " + K columns, 1 <= K <= 16");
  if (stage < 0 || stage >= S)
    throw py::value_error("stage must be in [0, " + std::to_string(S) + "), got " + std::to_string(stage));
  if (batch < 1) throw py::value_error("batch must be >= 1");
  const double* tab = checked<double>(table, "table", -1);
  const int64_t total = x.size();
  if (total % batch) throw py::value_error("x must hold batch * per_sample elements");
  const bool cfg = !std::isnan(guidance);
  edmrt::StepArgs a{};
  a.row = tab + static_cast<int64_t>(stage) * W;
  a.stage = stage; a.K = K; a.batch = batch; a.per_sample = total / batch;
  a.x = writable<float>(x, "x", total);
  a.x_eval = writable<float>(x_eval, "x_eval", total);
  a.F = checked<float>(F, "F", cfg ? 2 * total : total);
  a.guidance = cfg; a.w = cfg ? static_cast<float>(guidance) : 1.0f;
  a.Y = writable<float>(Y, "Y", static_cast<int64_t>(K) * total);
  if (x_in.size() != total && x_in.size() != 2 * total)
    throw py::value_error("x_in must have batch or 2 * batch samples like x");
  a.x_in_twice = x_in.size() == 2 * total;
  a.x_in = writable<float>(x_in, "x_in", -1);
  a.sigma_in = writable<float>(sigma_in, "sigma_in", a.x_in_twice ? 2 * batch : batch);
  a.seeds = checked<int64_t>(seeds, "seeds", batch);
  py::gil_scoped_release release;
  edmrt::fused_step(a);
}

void init_state(py::array table, double t0, double n_init, py::array seeds, py::array x, py::array x_eval,
                py::array x_in, py::array sigma_in, int64_t batch, std::optional<py::array> x0) {
  if (table.ndim() != 2 || table.shape(0) < 1) throw py::value_error("table must be 2-D with at least one stage");
  const double* tab = checked<double>(table, "table", -1);
  if (batch < 1) throw py::value_error("batch must be >= 1");
  const int64_t total = x.size();
  if (total % batch) throw py::value_error("x must hold batch * per_sample elements");
  const bool twice = x_in.size() == 2 * total;
  if (!twice && x_in.size() != total) throw py::value_error("x_in must have batch or 2 * batch samples like x");
  const int64_t* sd = checked<int64_t>(seeds, "seeds", batch);
  const float* p0 = x0 ? checked<float>(*x0, "x0", total) : nullptr;
  float* px = writable<float>(x, "x", total);
  float* pe = writable<float>(x_eval, "x_eval", total);
  float* pi = writable<float>(x_in, "x_in", -1);
  float* ps = writable<float>(sigma_in, "sigma_in", twice ? 2 * batch : batch);
  py::gil_scoped_release release;
  edmrt::init_state(tab, t0, n_init, batch, total / batch, sd, p0, px, pe, pi, twice, ps);
}

void randn(py::array seeds, uint32_t stream, py::array out, int64_t batch) {
  if (batch < 1) throw py::value_error("batch must be >= 1");
  const int64_t total = out.size();
  if (total % batch) throw py::value_error("out must hold batch * per_sample elements");
  const int64_t* sd = checked<int64_t>(seeds, "seeds", batch);
  float* o = writable<float>(out, "out", total);
  py::gil_scoped_release release;
  edmrt::randn(sd, batch, total / batch, stream, o);
}

std::vector<uint32_t> philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  uint32_t c[4] = {c0, c1, c2, c3};
  edmrt::philox4x32(c, k0, k1);
  return {c[0], c[1], c[2], c[3]};
}

py::array plan_table_from_json(const std::string& text) {
  edmrt::Plan p;
  try {
    p = edmrt::plan_from_json(text);
  } catch (const std::runtime_error& e) {
    throw py::value_error(e.what());
  }
  const int64_t W = edmrt::kFixedCols + p.K;
  py::array_t<double> out({static_cast<int64_t>(p.stages), W});
  std::copy(p.table.begin(), p.table.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "edmrt compiled core (C++17)";
  m.def("fused_step", &fused_step, py::arg("table"), py::arg("stage"), py::arg("x"), py::arg("x_eval"), py::arg("F"),
        py::arg("Y"), py::arg("x_in"), py::arg("sigma_in"), py::arg("seeds"), py::arg("batch"),
        py::arg("guidance") = std::nan(""),
        "One plan stage on float32 CPU buffers (OpenMP, GIL released); guidance NaN = no CFG.");
  m.def("init_state", &init_state, py::arg("table"), py::arg("t0"), py::arg("n_init"), py::arg("seeds"), py::arg("x"),
        py::arg("x_eval"), py::arg("x_in"), py::arg("sigma_in"), py::arg("batch"), py::arg("x0") = py::none(),
        "x = t0 N(seed, STREAMS['initial']) (or the given float32 x0) + n_init N(seed, STREAMS['churn']); "
        "x_eval = x; x_in = c_in[0] x; sigma_in = c_noise[0].");
  m.def("randn", &randn, py::arg("seeds"), py::arg("stream"), py::arg("out"), py::arg("batch"),
        "Philox normal noise: out[b, i] = N(seed_b, stream, i).");
  m.def("philox", &philox, "Philox4x32-10 of one counter and key (for tests).");
  m.def("plan_table_from_json", &plan_table_from_json, py::arg("text"),
        "The C++ plan reader: the (S, 12 + K) table of a plan JSON (as the C ABI sees it).");
  py::list columns;
  for (int c = 0; c < edmrt::kFixedCols; ++c) columns.append(edmrt::column_name(static_cast<edmrt::Col>(c)));
  m.attr("TABLE_COLUMNS") = columns;
  m.attr("TABLE_FIXED_COLUMNS") = static_cast<int>(edmrt::kFixedCols);
  py::dict streams;
  streams["initial"] = edmrt::kInitialStream;
  streams["churn"] = edmrt::kChurnStream;
  streams["stage0"] = edmrt::kStage0Stream;
  m.attr("STREAMS") = streams;
}
