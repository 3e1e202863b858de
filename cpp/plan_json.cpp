// A plan from its JSON (engine/src/plan.py's to_json): a strict JSON reader (RFC 8259), directed by the plan's
// fields, then the checks of engine/src/plan.py's Plan (__post_init__ and from_dict), then the table in the layout
// of kernels/src/table.py.  Anything else throws std::runtime_error naming the field.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>
#include <system_error>

#include "edmrt_core.hpp"

namespace edmrt {

namespace {

[[noreturn]] void bad(const std::string& why) { throw std::runtime_error(why); }

// A JSON reader over one document: each call reads one value and leaves the position after it.
class Reader {
 public:
  enum Kind { Object, Array, String, Number, Bool, Null };
  static constexpr int kMaxDepth = 64;

  explicit Reader(const std::string& t) : t_(t) {}

  // The kind of the next value (after whitespace), without reading it.
  Kind kind() {
    ws();
    if (i_ >= t_.size()) fail("unexpected end");
    switch (t_[i_]) {
      case '{': return Object;
      case '[': return Array;
      case '"': return String;
      case 't': case 'f': return Bool;
      case 'n': return Null;
      case '-': case '0': case '1': case '2': case '3': case '4': case '5': case '6': case '7': case '8': case '9':
        return Number;
      default: fail("expected a value (JSON has no '+', leading '.', NaN, Infinity or comments)");
    }
  }

  // "{" key ":" value ("," key ":" value)* "}": each(key) reads the value.
  void object(int depth, const std::function<void(const std::string&)>& each) {
    enter(depth);
    expect('{');
    if (eat('}')) return;
    do {
      ws();
      const std::string key = string();
      expect(':');
      each(key);
    } while (eat(','));
    expect('}');
  }

  // "[" value ("," value)* "]": each() reads one element.
  void array(int depth, const std::function<void()>& each) {
    enter(depth);
    expect('[');
    if (eat(']')) return;
    do { each(); } while (eat(','));
    expect(']');
  }

  // A number by RFC 8259's grammar: -? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?; overflow is an error.
  // No '+', no leading '.', no hex, no NaN or Infinity: what Python's json and Plan.to_json write.
  double number() {
    ws();
    const std::size_t start = i_;
    if (at('-')) ++i_;
    if (at('0')) {
      ++i_;
    } else if (digit()) {
      while (digit()) ++i_;
    } else {
      fail("expected a digit");
    }
    if (at('.')) {
      ++i_;
      if (!digit()) fail("expected a digit after '.'");
      while (digit()) ++i_;
    }
    if (at('e') || at('E')) {
      ++i_;
      if (at('+') || at('-')) ++i_;
      if (!digit()) fail("expected a digit in the exponent");
      while (digit()) ++i_;
    }
    double v = 0.0;
    const char* first = t_.data() + start;
    const char* last = t_.data() + i_;
    const auto r = std::from_chars(first, last, v);
    if (r.ec == std::errc::result_out_of_range) {
      // from_chars reports both overflow and underflow: underflow is 0 (as Python reads it), overflow an error.
      if (decimal_magnitude(first, last) > 0) fail("number out of range of a double");
      v = *first == '-' ? -0.0 : 0.0;
    } else if (r.ec != std::errc() || r.ptr != last) {
      fail("bad number");
    }
    return v;
  }

  bool boolean() {
    ws();
    if (word("true")) return true;
    if (word("false")) return false;
    fail("expected true or false");
  }

  // A string with JSON's escapes; \u escapes become UTF-8.  Raw control characters and invalid UTF-8 are errors.
  std::string string() {
    ws();
    if (!at('"')) fail("expected a string");
    ++i_;
    std::string s;
    for (;;) {
      if (i_ >= t_.size()) fail("unterminated string");
      const unsigned char c = static_cast<unsigned char>(t_[i_++]);
      if (c == '"') return s;
      if (c < 0x20) fail("control character in a string");
      if (c >= 0x80) {
        utf8_sequence(s, c);
        continue;
      }
      if (c != '\\') {
        s += static_cast<char>(c);
        continue;
      }
      if (i_ >= t_.size()) fail("unterminated string");
      const char e = t_[i_++];
      switch (e) {
        case '"': case '\\': case '/': s += e; break;
        case 'b': s += '\b'; break;
        case 'f': s += '\f'; break;
        case 'n': s += '\n'; break;
        case 'r': s += '\r'; break;
        case 't': s += '\t'; break;
        case 'u': utf8(s, code_point()); break;
        default: fail("bad escape in a string");
      }
    }
  }

  // Any value, checked and dropped (a plan's precond and options: the table does not read them).
  void skip(int depth) {
    switch (kind()) {
      case Object: object(depth, [&](const std::string&) { skip(depth + 1); }); break;
      case Array: array(depth, [&] { skip(depth + 1); }); break;
      case String: string(); break;
      case Bool: boolean(); break;
      case Null: if (!word("null")) fail("expected a value"); break;
      case Number: number(); break;
    }
  }

  void end() {
    ws();
    if (i_ != t_.size()) fail("trailing characters");
  }

  [[noreturn]] void fail(const std::string& why) const {
    bad("plan JSON is malformed at byte " + std::to_string(i_) + ": " + why);
  }

 private:
  const std::string& t_;
  std::size_t i_ = 0;

  void enter(int depth) const {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
  }
  void ws() {
    while (i_ < t_.size() && (t_[i_] == ' ' || t_[i_] == '\n' || t_[i_] == '\r' || t_[i_] == '\t')) ++i_;
  }
  bool at(char c) const { return i_ < t_.size() && t_[i_] == c; }
  bool digit() const { return i_ < t_.size() && t_[i_] >= '0' && t_[i_] <= '9'; }
  bool eat(char c) {
    ws();
    if (!at(c)) return false;
    ++i_;
    return true;
  }
  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  bool word(const char* w) {
    const std::size_t n = std::char_traits<char>::length(w);
    if (t_.compare(i_, n, w) != 0) return false;
    i_ += n;
    return true;
  }
  unsigned hex4() {
    unsigned v = 0;
    for (int k = 0; k < 4; ++k, ++i_) {
      if (i_ >= t_.size()) fail("unterminated \\u escape");
      const char h = t_[i_];
      const int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10
                    : h >= 'A' && h <= 'F' ? h - 'A' + 10 : 16;
      if (d == 16) fail("bad \\u escape");
      v = v * 16 + static_cast<unsigned>(d);
    }
    return v;
  }
  // The code point of a \u escape (after "\u"), a surrogate pair joined; a lone surrogate is an error.
  unsigned code_point() {
    const unsigned hi = hex4();
    if (hi < 0xD800 || hi > 0xDFFF) return hi;
    if (hi > 0xDBFF || !word("\\u")) fail("lone surrogate in a \\u escape");
    const unsigned lo = hex4();
    if (lo < 0xDC00 || lo > 0xDFFF) fail("lone surrogate in a \\u escape");
    return 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
  }
  // The rest of a UTF-8 sequence whose lead byte c (>= 0x80) was read: no overlong forms, surrogates or code points
  // above U+10FFFF (what Python's utf-8 decoder refuses too).
  void utf8_sequence(std::string& s, unsigned char c) {
    int more = 0;
    unsigned cp = 0, least = 0;
    if (c >= 0xC2 && c <= 0xDF) {
      more = 1; cp = c & 0x1Fu; least = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
      more = 2; cp = c & 0x0Fu; least = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
      more = 3; cp = c & 0x07u; least = 0x10000;
    } else {
      fail("invalid UTF-8 in a string");
    }
    s += static_cast<char>(c);
    for (int k = 0; k < more; ++k, ++i_) {
      const unsigned char d = i_ < t_.size() ? static_cast<unsigned char>(t_[i_]) : 0;
      if ((d & 0xC0u) != 0x80u) fail("invalid UTF-8 in a string");
      cp = (cp << 6) | (d & 0x3Fu);
      s += static_cast<char>(d);
    }
    if (cp < least || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) fail("invalid UTF-8 in a string");
  }
  static void utf8(std::string& s, unsigned cp) {
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else if (cp < 0x800) {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      s += static_cast<char>(0xE0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      s += static_cast<char>(0xF0 | (cp >> 18));
      s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  // The decimal exponent m of a nonzero number token written as 0.d1d2... x 10^m (only its sign is used).
  static int64_t decimal_magnitude(const char* p, const char* end) {
    if (*p == '-') ++p;
    int64_t lead = 0;
    if (*p == '0') {
      ++p;
      if (p < end && *p == '.')
        for (++p; p < end && *p == '0'; ++p) --lead;
    } else {
      for (; p < end && *p >= '0' && *p <= '9'; ++p) ++lead;
    }
    while (p < end && *p != 'e' && *p != 'E') ++p;
    int64_t exp = 0, sign = 1;
    if (p < end) {
      ++p;
      if (*p == '-' || *p == '+') sign = *p++ == '-' ? -1 : 1;
      for (; p < end; ++p) exp = std::min<int64_t>(exp * 10 + (*p - '0'), int64_t{1} << 40);
    }
    return lead + sign * exp;
  }
};

// ---------------------------------------------------------------- the fields as read
const char* const kStageFields[] = {"sigma", "c_in", "c_noise", "c_skip", "c_out", "alpha", "beta", "a", "e", "n"};
const char* const kRequired[] = {"format", "version", "solver", "sigmas", "step", "sigma", "c_in", "c_noise",
                                 "c_skip", "c_out", "alpha", "beta", "a", "e", "n", "b", "commit"};

struct Fields {
  std::set<std::string> seen;
  std::string format, solver;
  double version = 0.0, n_init = 0.0;
  std::map<std::string, std::vector<double>> arrays;  // sigmas, step, commit and the stage fields
  std::vector<std::vector<double>> b;
};

std::string quoted(const std::string& key) { return "plan field '" + key + "'"; }

void expect_kind(Reader& r, Reader::Kind want, const std::string& key, const char* what) {
  if (r.kind() != want) bad(quoted(key) + " must be " + what);
}

std::vector<double> numbers(Reader& r, const std::string& key, bool booleans) {
  expect_kind(r, Reader::Array, key, "an array of numbers");
  std::vector<double> out;
  r.array(1, [&] {
    const Reader::Kind k = r.kind();
    if (k == Reader::Number) out.push_back(r.number());
    else if (k == Reader::Bool && booleans) out.push_back(r.boolean() ? 1.0 : 0.0);
    else bad(quoted(key) + (booleans ? " must hold booleans (or 0 and 1)" : " must hold numbers"));
  });
  return out;
}

void read_field(Reader& r, const std::string& key, Fields& f) {
  if (!f.seen.insert(key).second) bad("plan JSON has field '" + key + "' twice");
  if (key == "format" || key == "solver") {
    expect_kind(r, Reader::String, key, "a string");
    (key == "format" ? f.format : f.solver) = r.string();
  } else if (key == "version" || key == "n_init") {
    expect_kind(r, Reader::Number, key, "a number");
    (key == "version" ? f.version : f.n_init) = r.number();
  } else if (key == "precond" || key == "options") {
    expect_kind(r, Reader::Object, key, "an object");
    r.skip(1);
  } else if (key == "b") {
    expect_kind(r, Reader::Array, key, "an S x K array of numbers");
    r.array(1, [&] { f.b.push_back(numbers(r, key, false)); });
  } else if (key == "sigmas" || key == "step" || key == "commit" ||
             std::find(std::begin(kStageFields), std::end(kStageFields), key) != std::end(kStageFields)) {
    f.arrays[key] = numbers(r, key, key == "commit");
  } else {
    bad("plan JSON has unknown field '" + key + "'");
  }
}

// ---------------------------------------------------------------- the checks of engine/src/plan.py's Plan
void check_schedule(const std::vector<double>& s) {
  if (s.size() < 2) bad("plan field 'sigmas' must hold at least 2 values (t_0 ... t_N)");
  for (double v : s)
    if (!std::isfinite(v)) bad("plan field 'sigmas' must be finite");
  if (s.front() < s.back()) {  // upward: an inversion, from a clean image at t_0 to noise at t_N
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (s[i] <= 0.0) bad("plan field 'sigmas' runs upward (an inversion) and must be > 0 throughout");
      if (i + 1 < s.size() && s[i + 1] <= s[i]) bad("plan field 'sigmas' runs upward and must be strictly ascending");
    }
    return;
  }
  if (s.back() < 0.0) bad("plan field 'sigmas' must end in 0 (EDM's t_N = 0) or a positive level");
  for (std::size_t i = 0; i + 1 < s.size(); ++i) {
    if (s[i] <= 0.0) bad("plan field 'sigmas' must be > 0 before its last value");
    if (s[i + 1] >= s[i]) bad("plan field 'sigmas' must be strictly descending");
  }
}

void check_history(const std::vector<std::vector<double>>& b, std::size_t S) {
  if (b.size() != S || b[0].empty())
    bad("plan field 'b' must be an S x K array with K >= 1 (S = " + std::to_string(S) + ")");
  const std::size_t K = b[0].size();
  if (K > 16) bad("plan field 'b' must have K <= 16 history columns, got " + std::to_string(K));
  for (std::size_t s = 0; s < S; ++s) {
    if (b[s].size() != K) bad("plan field 'b' is ragged: row " + std::to_string(s) + " differs from row 0");
    for (std::size_t k = 0; k < K; ++k) {
      if (!std::isfinite(b[s][k])) bad("plan field 'b' must be finite");
      if (k > s && b[s][k] != 0.0)
        bad("plan field 'b' refers to history before stage 0: b[" + std::to_string(s) + ", k] must be 0 for k > " +
            std::to_string(s));
    }
  }
}

void check_steps(const std::vector<double>& step, const std::vector<double>& commit, std::size_t S, std::size_t N) {
  if (step.size() != S) bad("plan field 'step' must hold " + std::to_string(S) + " integers");
  for (std::size_t s = 0; s < S; ++s) {
    if (step[s] != std::floor(step[s]) || step[s] < 0.0 || step[s] > static_cast<double>(N - 1) ||
        (s > 0 && step[s] < step[s - 1]))
      bad("plan field 'step' must be non-decreasing integers in [0, " + std::to_string(N - 1) + "]");
  }
  if (commit.size() != S) bad("plan field 'commit' must hold " + std::to_string(S) + " booleans");
  for (double c : commit)
    if (c != 0.0 && c != 1.0) bad("plan field 'commit' must hold booleans (or 0 and 1)");
  if (commit.back() != 1.0) bad("plan field 'commit' must end in true: the last stage must commit its result");
}

Plan checked_plan(Fields& f) {
  for (const char* key : kRequired)
    if (!f.seen.count(key)) bad(std::string("plan JSON lacks field '") + key + "'");
  if (f.format != "edmrt.plan") bad("not an edmrt plan: plan field 'format' must be \"edmrt.plan\"");
  if (f.version != 1.0) bad("unsupported plan version: plan field 'version' must be 1");
  if (f.solver.empty()) bad("plan field 'solver' must be a non-empty string");
  const std::vector<double>& sigmas = f.arrays["sigmas"];
  check_schedule(sigmas);
  const std::size_t S = f.arrays["sigma"].size();
  if (S == 0) bad("plan field 'sigma' must have at least one stage (network evaluation)");
  if (S > static_cast<std::size_t>(std::numeric_limits<int>::max())) bad("plan field 'sigma' has too many stages");
  for (const char* key : kStageFields) {
    const std::vector<double>& v = f.arrays[key];
    if (v.size() != S) bad(quoted(key) + " must have " + std::to_string(S) + " values like 'sigma'");
    for (double x : v)
      if (!std::isfinite(x)) bad(quoted(key) + " must be finite");
  }
  check_history(f.b, S);
  check_steps(f.arrays["step"], f.arrays["commit"], S, sigmas.size() - 1);
  for (double x : f.arrays["sigma"])
    if (x <= 0.0) bad("plan field 'sigma' must be > 0 at every network evaluation");
  for (double x : f.arrays["n"])
    if (x < 0.0) bad("plan field 'n' (noise scales) must be >= 0");
  if (!std::isfinite(f.n_init) || f.n_init < 0.0) bad("plan field 'n_init' must be a finite number >= 0");

  Plan p;
  p.solver = f.solver;
  p.stages = static_cast<int>(S);
  p.K = static_cast<int>(f.b[0].size());
  p.sigma0 = sigmas[0];
  p.n_init = f.n_init;
  p.sigma = f.arrays["sigma"];
  const std::size_t W = static_cast<std::size_t>(kFixedCols + p.K);
  p.table.assign(S * W, 0.0);
  for (std::size_t s = 0; s < S; ++s) {
    double* row = p.table.data() + s * W;
    // Columns c_in .. commit are the plan fields of the same names.
    for (int c = 0; c <= COMMIT; ++c) row[c] = f.arrays[column_name(static_cast<Col>(c))][s];
    row[C_IN_NEXT] = s + 1 < S ? f.arrays["c_in"][s + 1] : 0.0;
    row[C_NOISE_NEXT] = s + 1 < S ? f.arrays["c_noise"][s + 1] : 0.0;
    for (int k = 0; k < p.K; ++k) row[B0 + k] = f.b[s][static_cast<std::size_t>(k)];
  }
  return p;
}

}  // namespace

Plan plan_from_json(const std::string& text) {
  Reader r(text);
  if (r.kind() != Reader::Object) bad("a plan must be a JSON object");
  Fields f;
  r.object(0, [&](const std::string& key) { read_field(r, key, f); });
  r.end();
  return checked_plan(f);
}

}  // namespace edmrt
