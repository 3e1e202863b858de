// Python bindings of the edmrt core (pybind11); logic lives in the other files of cpp/.
// Every argument is checked here, before a pointer is touched: the core functions trust their arguments.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "edmrt_core.hpp"

namespace py = pybind11;

namespace {

using Shape = std::vector<py::ssize_t>;
constexpr int kMaxHistory = 16;  // K <= 16: the core keeps the history terms in fixed arrays of 16

std::string str(const Shape& s) {
  std::string out = "(";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

Shape shape_of(const py::array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }

// Check dtype, contiguity, alignment, size and shape *before* touching a pointer: pybind11's array_t would
// silently copy a non-contiguous or mistyped array, and a write into that copy is lost.
template <typename T>
const T* checked(const py::array& a, const char* name, const Shape& shape) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::value_error(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) +
                          ", got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(std::string(name) + " must be aligned to its dtype");
  py::ssize_t size = 1;
  for (py::ssize_t d : shape) size *= d;
  if (a.size() != size)
    throw py::value_error(std::string(name) + " must have " + std::to_string(size) + " elements, got " +
                          std::to_string(a.size()));
  if (shape_of(a) != shape)
    throw py::value_error(std::string(name) + " must have shape " + str(shape) + ", got " + str(shape_of(a)));
  return static_cast<const T*>(a.data());
}

template <typename T>
T* writable(py::array& a, const char* name, const Shape& shape) {
  if (!a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
  checked<T>(a, name, shape);
  return static_cast<T*>(a.mutable_data());
}

// The plan table: (S, kFixedCols + K) float64 with S >= 1 and 1 <= K <= 16; sets S and K.
const double* table_of(const py::array& table, int64_t& S, int& K) {
  if (table.ndim() != 2 || table.shape(0) < 1)
    throw py::value_error("table must be 2-D with at least one stage, got shape " + str(shape_of(table)));
  const int64_t W = table.shape(1);
  if (W < edmrt::kFixedCols + 1 || W > edmrt::kFixedCols + kMaxHistory)
    throw py::value_error("table must have " + std::to_string(edmrt::kFixedCols) + " + K columns with 1 <= K <= " +
                          std::to_string(kMaxHistory) + ", got shape " + str(shape_of(table)));
  S = table.shape(0);
  K = static_cast<int>(W - edmrt::kFixedCols);
  return checked<double>(table, "table", shape_of(table));
}

// The state x: (batch, ...) with at least one element per sample; returns its shape.
Shape state_shape(const py::array& x, int64_t batch) {
  if (batch < 1) throw py::value_error("batch must be >= 1, got " + std::to_string(batch));
  if (x.ndim() < 1 || x.size() % batch) throw py::value_error("x must hold batch * per_sample elements");
  if (x.shape(0) != batch || x.size() < batch)
    throw py::value_error("x must have shape (batch, ...) with batch = " + std::to_string(batch) +
                          " and at least one element per sample, got " + str(shape_of(x)));
  return shape_of(x);
}

// x's shape with its first dimension replaced by `rows` (F, x_in: B or 2B samples), or prefixed (Y: K slots).
Shape with_rows(Shape s, py::ssize_t rows) {
  s[0] = rows;
  return s;
}
Shape prefixed(py::ssize_t n, const Shape& s) {
  Shape out{n};
  out.insert(out.end(), s.begin(), s.end());
  return out;
}

// Whether x_in holds 2B samples (both guidance halves) or B, like x.
bool x_in_twice(const py::array& x_in, const py::array& x) {
  if (x_in.size() != x.size() && x_in.size() != 2 * x.size())
    throw py::value_error("x_in must have batch or 2 * batch samples like x");
  return x_in.size() == 2 * x.size();
}

// Buffers written by a call must not overlap each other nor the buffers it reads (the fused step's element loop
// declares its pointers __restrict__).  Each entry: name, array.
struct Buf {
  const char* name;
  const py::array* a;
};
bool overlap(const py::array& u, const py::array& v) {
  if (u.nbytes() == 0 || v.nbytes() == 0) return false;
  const auto* p = static_cast<const char*>(u.data());
  const auto* q = static_cast<const char*>(v.data());
  return p < q + v.nbytes() && q < p + u.nbytes();
}
void disjoint(const std::vector<Buf>& outputs, const std::vector<Buf>& inputs) {
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    for (std::size_t j = 0; j < i; ++j)
      if (overlap(*outputs[i].a, *outputs[j].a))
        throw py::value_error(std::string(outputs[i].name) + " must not overlap " + outputs[j].name);
    for (const Buf& in : inputs)
      if (overlap(*outputs[i].a, *in.a))
        throw py::value_error(std::string(outputs[i].name) + " must not overlap " + in.name);
  }
}

// The fused step bound to one set of buffers (the C++ half of kernels.Stepper): every buffer is checked once, here;
// a call checks only the stage and F.  It keeps references to the arrays, so the buffers live as long as it does.
// A call writes the buffers: one call at a time per object (an engine calls it under its lock).
class BoundStep {
 public:
  BoundStep(py::array table, py::array x, py::array x_eval, py::array Y, py::array x_in, py::array sigma_in,
            py::array seeds, int64_t batch, double guidance)
      : table_(table), x_(x), x_eval_(x_eval), Y_(Y), x_in_(x_in), sigma_in_(sigma_in), seeds_(seeds) {
    int K = 0;
    tab_ = table_of(table_, S_, K);
    const bool cfg = !std::isnan(guidance);
    if (cfg && !std::isfinite(guidance))
      throw py::value_error("guidance must be finite (NaN: no guidance), got " + std::to_string(guidance));
    const Shape xs = state_shape(x_, batch);
    const bool twice = x_in_twice(x_in_, x_);
    const py::ssize_t nin = twice ? 2 * batch : batch;
    a_.K = K; a_.batch = batch; a_.per_sample = x_.size() / batch;
    a_.x = writable<float>(x_, "x", xs);
    a_.x_eval = writable<float>(x_eval_, "x_eval", xs);
    a_.guidance = cfg; a_.w = cfg ? static_cast<float>(guidance) : 1.0f;
    a_.Y = writable<float>(Y_, "Y", prefixed(K, xs));
    a_.x_in_twice = twice;
    a_.x_in = writable<float>(x_in_, "x_in", with_rows(xs, nin));
    a_.sigma_in = writable<float>(sigma_in_, "sigma_in", {nin});
    a_.seeds = checked<int64_t>(seeds_, "seeds", {batch});
    f_shape_ = with_rows(xs, cfg ? 2 * batch : batch);
    x_shape_ = xs;
    disjoint(outputs(), {{"table", &table_}, {"seeds", &seeds_}});
  }

  // noise: this stage's given noise z (float32, shaped like x), used in place of the Philox draw; None: Philox.
  void operator()(int64_t stage, const py::array& F, const std::optional<py::array>& noise) const {
    if (stage < 0 || stage >= S_ || stage > std::numeric_limits<int>::max())
      throw py::value_error("stage must be in [0, " + std::to_string(S_) + "), got " + std::to_string(stage));
    edmrt::StepArgs a = a_;
    a.row = tab_ + stage * (edmrt::kFixedCols + a.K);
    a.stage = static_cast<int>(stage);
    a.F = checked<float>(F, "F", f_shape_);
    if (noise) {
      a.noise = checked<float>(*noise, "noise", x_shape_);
      disjoint(outputs(), {{"F", &F}, {"noise", &*noise}});
    } else {
      disjoint(outputs(), {{"F", &F}});
    }
    py::gil_scoped_release release;
    edmrt::fused_step(a);
  }

 private:
  std::vector<Buf> outputs() const {
    return {{"x", &x_}, {"x_eval", &x_eval_}, {"Y", &Y_}, {"x_in", &x_in_}, {"sigma_in", &sigma_in_}};
  }

  py::array table_, x_, x_eval_, Y_, x_in_, sigma_in_, seeds_;
  const double* tab_ = nullptr;
  int64_t S_ = 0;
  Shape f_shape_, x_shape_;
  edmrt::StepArgs a_{};
};

void fused_step(py::array table, int64_t stage, py::array x, py::array x_eval, py::array F, py::array Y,
                py::array x_in, py::array sigma_in, py::array seeds, int64_t batch, double guidance,
                std::optional<py::array> noise) {
  BoundStep(table, x, x_eval, Y, x_in, sigma_in, seeds, batch, guidance)(stage, F, noise);
}

void init_state(py::array table, double t0, double n_init, py::array seeds, py::array x, py::array x_eval,
                py::array x_in, py::array sigma_in, int64_t batch, std::optional<py::array> x0) {
  int64_t S = 0;
  int K = 0;
  const double* tab = table_of(table, S, K);
  for (const auto& [name, v] : {std::make_pair("t0", t0), std::make_pair("n_init", n_init)})
    if (!std::isfinite(v) || v < 0.0)
      throw py::value_error(std::string(name) + " must be a finite number >= 0, got " + std::to_string(v));
  const Shape xs = state_shape(x, batch);
  const bool twice = x_in_twice(x_in, x);
  const py::ssize_t nin = twice ? 2 * batch : batch;
  const int64_t* sd = checked<int64_t>(seeds, "seeds", {batch});
  const float* p0 = x0 ? checked<float>(*x0, "x0", xs) : nullptr;
  float* px = writable<float>(x, "x", xs);
  float* pe = writable<float>(x_eval, "x_eval", xs);
  float* pi = writable<float>(x_in, "x_in", with_rows(xs, nin));
  float* ps = writable<float>(sigma_in, "sigma_in", {nin});
  std::vector<Buf> inputs{{"table", &table}, {"seeds", &seeds}};
  if (x0 && p0 != px) inputs.push_back({"x0 (unless it is x itself)", &*x0});
  disjoint({{"x", &x}, {"x_eval", &x_eval}, {"x_in", &x_in}, {"sigma_in", &sigma_in}}, inputs);
  py::gil_scoped_release release;
  edmrt::init_state(tab, t0, n_init, batch, x.size() / batch, sd, p0, px, pe, pi, twice, ps);
}

uint32_t u32(int64_t v, const char* name) {
  if (v < 0 || v > std::numeric_limits<uint32_t>::max())
    throw py::value_error(std::string(name) + " must be in [0, 2**32), got " + std::to_string(v));
  return static_cast<uint32_t>(v);
}

void randn(py::array seeds, int64_t stream, py::array out, int64_t batch) {
  const uint32_t st = u32(stream, "stream");
  if (batch < 1) throw py::value_error("batch must be >= 1, got " + std::to_string(batch));
  if (out.ndim() < 1 || out.size() % batch) throw py::value_error("out must hold batch * per_sample elements");
  if (out.shape(0) != batch || out.size() < batch)
    throw py::value_error("out must have shape (batch, ...) with batch = " + std::to_string(batch) +
                          " and at least one element per sample, got " + str(shape_of(out)));
  const int64_t* sd = checked<int64_t>(seeds, "seeds", {batch});
  float* o = writable<float>(out, "out", shape_of(out));
  disjoint({{"out", &out}}, {{"seeds", &seeds}});
  py::gil_scoped_release release;
  edmrt::randn(sd, batch, out.size() / batch, st, o);
}

std::vector<uint32_t> philox(int64_t c0, int64_t c1, int64_t c2, int64_t c3, int64_t k0, int64_t k1) {
  uint32_t c[4] = {u32(c0, "c0"), u32(c1, "c1"), u32(c2, "c2"), u32(c3, "c3")};
  edmrt::philox4x32(c, u32(k0, "k0"), u32(k1, "k1"));
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
        py::arg("guidance") = std::nan(""), py::arg("noise") = py::none(),
        "One plan stage on float32 CPU buffers (OpenMP, GIL released); guidance NaN = no CFG; noise: the stage's "
        "given noise (float32, shaped like x) instead of the Philox draw.");
  py::class_<BoundStep>(m, "BoundStep", "fused_step bound to one set of buffers, checked once; call(stage, F).")
      .def(py::init<py::array, py::array, py::array, py::array, py::array, py::array, py::array, int64_t, double>(),
           py::arg("table"), py::arg("x"), py::arg("x_eval"), py::arg("Y"), py::arg("x_in"), py::arg("sigma_in"),
           py::arg("seeds"), py::arg("batch"), py::arg("guidance") = std::nan(""))
      .def("__call__", &BoundStep::operator(), py::arg("stage"), py::arg("F"), py::arg("noise") = py::none());
  m.def("step_isa", &edmrt::step_isa, "The instruction set of the fused step's deterministic update.");
  m.def("init_state", &init_state, py::arg("table"), py::arg("t0"), py::arg("n_init"), py::arg("seeds"), py::arg("x"),
        py::arg("x_eval"), py::arg("x_in"), py::arg("sigma_in"), py::arg("batch"), py::arg("x0") = py::none(),
        "x = t0 N(seed, STREAMS['initial']) (or the given float32 x0) + n_init N(seed, STREAMS['churn']); "
        "x_eval = x; x_in = c_in[0] x; sigma_in = c_noise[0].");
  m.def("randn", &randn, py::arg("seeds"), py::arg("stream"), py::arg("out"), py::arg("batch"),
        "Philox normal noise: out[b, i] = N(seed_b, stream, i).");
  m.def("philox", &philox, py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"),
        "Philox4x32-10 of one counter and key (for tests).");
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
