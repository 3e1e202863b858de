// A plan from its JSON (engine/plan.py's to_json): a small recursive-descent JSON reader, then
// the table in the layout of kernels/table.py.  Malformed input throws std::runtime_error.
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>

#include "edmrt_core.hpp"

namespace edmrt {

namespace {

struct Value {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0.0;
  std::string str;
  std::vector<Value> arr;
  std::map<std::string, Value> obj;
};

class Reader {
 public:
  explicit Reader(const std::string& t) : t_(t) {}
  Value document() {
    Value v = value(0);
    ws();
    if (i_ != t_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& t_;
  std::size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("plan JSON is malformed at byte " + std::to_string(i_) + ": " + why);
  }
  void ws() {
    while (i_ < t_.size() && (t_[i_] == ' ' || t_[i_] == '\n' || t_[i_] == '\r' || t_[i_] == '\t')) ++i_;
  }
  bool eat(char c) {
    ws();
    if (i_ < t_.size() && t_[i_] == c) { ++i_; return true; }
    return false;
  }
  void expect(char c) { if (!eat(c)) fail(std::string("expected '") + c + "'"); }
  bool word(const char* w) {
    std::size_t n = std::char_traits<char>::length(w);
    if (t_.compare(i_, n, w) == 0) { i_ += n; return true; }
    return false;
  }
  Value value(int depth) {
    if (depth > 64) fail("nesting too deep");
    ws();
    if (i_ >= t_.size()) fail("unexpected end");
    Value v;
    const char c = t_[i_];
    if (c == '{') {
      ++i_;
      v.kind = Value::Object;
      if (eat('}')) return v;
      do {
        ws();
        std::string key = string();
        expect(':');
        v.obj[key] = value(depth + 1);
      } while (eat(','));
      expect('}');
    } else if (c == '[') {
      ++i_;
      v.kind = Value::Array;
      if (eat(']')) return v;
      do { v.arr.push_back(value(depth + 1)); } while (eat(','));
      expect(']');
    } else if (c == '"') {
      v.kind = Value::String;
      v.str = string();
    } else if (word("true")) {
      v.kind = Value::Bool; v.b = true;
    } else if (word("false")) {
      v.kind = Value::Bool; v.b = false;
    } else if (word("null")) {
      v.kind = Value::Null;
    } else {
      const char* start = t_.c_str() + i_;
      char* end = nullptr;
      v.num = std::strtod(start, &end);
      if (end == start) fail("expected a value");
      i_ += static_cast<std::size_t>(end - start);
      v.kind = Value::Number;
    }
    return v;
  }
  std::string string() {
    if (i_ >= t_.size() || t_[i_] != '"') fail("expected a string");
    ++i_;
    std::string s;
    while (i_ < t_.size() && t_[i_] != '"') {
      if (t_[i_] == '\\') {
        ++i_;
        if (i_ >= t_.size()) fail("bad escape");
        const char e = t_[i_];
        if (e == 'u') { s += '?'; i_ += 4; }  // plan keys and solver names are ASCII
        else s += (e == 'n' ? '\n' : e == 't' ? '\t' : e);
      } else {
        s += t_[i_];
      }
      ++i_;
    }
    if (i_ >= t_.size()) fail("unterminated string");
    ++i_;
    return s;
  }
};

const Value& field(const Value& root, const std::string& key) {
  auto it = root.obj.find(key);
  if (it == root.obj.end()) throw std::runtime_error("plan JSON lacks field '" + key + "'");
  return it->second;
}

std::vector<double> numbers(const Value& root, const std::string& key) {
  const Value& v = field(root, key);
  if (v.kind != Value::Array) throw std::runtime_error("plan field '" + key + "' must be an array");
  std::vector<double> out;
  for (const Value& e : v.arr) {
    if (e.kind == Value::Number) out.push_back(e.num);
    else if (e.kind == Value::Bool) out.push_back(e.b ? 1.0 : 0.0);
    else throw std::runtime_error("plan field '" + key + "' must hold numbers");
    if (!std::isfinite(out.back())) throw std::runtime_error("plan field '" + key + "' must be finite");
  }
  return out;
}

}  // namespace

Plan plan_from_json(const std::string& text) {
  Value root = Reader(text).document();
  if (root.kind != Value::Object) throw std::runtime_error("a plan must be a JSON object");
  const Value& fmt = field(root, "format");
  if (fmt.kind != Value::String || fmt.str != "edmrt.plan") throw std::runtime_error("not an edmrt plan (format)");
  const Value& ver = field(root, "version");
  if (ver.kind != Value::Number || ver.num != 1.0) throw std::runtime_error("unsupported plan version");
  Plan p;
  const Value& solver = field(root, "solver");
  if (solver.kind == Value::String) p.solver = solver.str;
  p.sigma = numbers(root, "sigma");
  const std::size_t S = p.sigma.size();
  if (S == 0) throw std::runtime_error("a plan must have at least one stage");
  const char* cols[] = {"c_in", "c_noise", "c_skip", "c_out", "alpha", "beta", "a", "e", "n", "commit"};
  std::vector<std::vector<double>> v;
  for (const char* c : cols) {
    v.push_back(numbers(root, c));
    if (v.back().size() != S) throw std::runtime_error(std::string("plan field '") + c + "' must have one value per stage");
  }
  const Value& b = field(root, "b");
  if (b.kind != Value::Array || b.arr.size() != S || b.arr[0].kind != Value::Array || b.arr[0].arr.empty())
    throw std::runtime_error("plan field 'b' must be an S x K array");
  p.K = static_cast<int>(b.arr[0].arr.size());
  if (p.K > 16) throw std::runtime_error("plan history K must be <= 16");
  const std::vector<double> sigmas = numbers(root, "sigmas");
  if (sigmas.size() < 2) throw std::runtime_error("plan field 'sigmas' must hold the schedule");
  p.sigma0 = sigmas[0];
  auto it = root.obj.find("n_init");
  p.n_init = (it != root.obj.end() && it->second.kind == Value::Number) ? it->second.num : 0.0;
  p.stages = static_cast<int>(S);
  const int W = kFixedCols + p.K;
  p.table.assign(S * static_cast<std::size_t>(W), 0.0);
  for (std::size_t s = 0; s < S; ++s) {
    double* row = p.table.data() + s * static_cast<std::size_t>(W);
    for (int c = 0; c < 10; ++c) row[c] = v[static_cast<std::size_t>(c)][s];
    row[C_IN_NEXT] = s + 1 < S ? v[0][s + 1] : 0.0;
    row[C_NOISE_NEXT] = s + 1 < S ? v[1][s + 1] : 0.0;
    const Value& bs = b.arr[s];
    if (bs.kind != Value::Array || static_cast<int>(bs.arr.size()) != p.K) throw std::runtime_error("plan field 'b' is ragged");
    for (int k = 0; k < p.K; ++k) {
      if (bs.arr[static_cast<std::size_t>(k)].kind != Value::Number) throw std::runtime_error("plan field 'b' must hold numbers");
      row[B0 + k] = bs.arr[static_cast<std::size_t>(k)].num;
    }
  }
  return p;
}

}  // namespace edmrt
