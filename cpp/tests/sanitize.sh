#!/usr/bin/env bash
# The C++ core under AddressSanitizer and UndefinedBehaviorSanitizer.  Builds, into a temporary directory (never
# over the in-place build), the C-ABI host programs of cpp/tests/ and the Python extension edmrt._core with
# -fsanitize=address,undefined; runs the hosts on every solver's plan, on the plan-JSON corpus of
# cpp/tests/corpus/ and on files that are no plan (a device, a FIFO, a directory, a file over the size limit);
# then tests/test_core.py, tests/test_kernels.py and tests/test_capi.py against the sanitized extension.  Any
# sanitizer report fails the run.  CI: bash cpp/tests/sanitize.sh   (PYTHON and CXX may name the tools.)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
python=${PYTHON:-python}
cxx=${CXX:-g++}
work=$(mktemp -d)
# pytest captures file descriptor 2: the sanitizers write their reports to files, shown here on exit.
trap 'status=$?; cat "$work"/sanitizer.* 2>/dev/null || true; rm -rf "$work"; exit $status' EXIT

san=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1)
flags=(-std=c++17 -Wall -Wextra -fopenmp -I "$root/cpp/include")
export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:strict_string_checks=1:log_path=$work/sanitizer
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$work/sanitizer
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== building the sanitized extension and C-ABI hosts in $work"
site=$work/site
obj=$work/obj
mkdir -p "$site/edmrt" "$obj"
pyinc=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
pybind=$("$python" -c 'import pybind11; print(pybind11.get_include())')
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# Each source compiled once (-fPIC: the same objects serve the extension and the hosts); the two slow ones in the
# background.
compile() { "$cxx" "${flags[@]}" "${san[@]}" -fPIC -c "$@"; }
compile -fvisibility=hidden -I "$pyinc" -I "$pybind" cpp/bindings.cpp -o "$obj/bindings.o" &
bindings_build=$!
compile -Werror cpp/step.cpp -o "$obj/step.o" &
step_build=$!
for src in cpp/philox.cpp cpp/plan_json.cpp cpp/capi.cpp cpp/tests/plan_check.cpp cpp/tests/capi_errors.cpp \
  cpp/tests/heun_gaussian.cpp; do
  compile -Werror "$src" -o "$obj/$(basename "$src" .cpp).o"
done
wait "$step_build"
wait "$bindings_build"
core=("$obj/philox.o" "$obj/step.o" "$obj/plan_json.o" "$obj/capi.o")
"$cxx" "${san[@]}" -fopenmp -shared "${core[@]}" "$obj/bindings.o" -o "$site/edmrt/_core$suffix"
for host in plan_check capi_errors heun_gaussian; do
  "$cxx" "${san[@]}" -fopenmp "$obj/$host.o" "${core[@]}" -o "$work/$host"
done

# A package directory that is the repository's edmrt (engine/src, kernels/src, export/src) with the sanitized _core.
for entry in "$root"/engine/src/*; do
  case $(basename "$entry") in _core*.so | __pycache__) continue ;; esac
  ln -s "$entry" "$site/edmrt/"
done
ln -s "$root/kernels/src" "$site/edmrt/kernels"
ln -s "$root/export/src" "$site/edmrt/export"

echo "== ${SECONDS}s: C-ABI hosts on every solver's plan, the corpus and files that are no plan"
mkdir -p "$work/plans"
"$python" - "$work/plans" <<'PY'
import sys
from edmrt.lab.selfcheck import solver_plans
for name, plan in solver_plans():
    plan.save(f"{sys.argv[1]}/good_{name}.json")
PY
mkfifo "$work/fifo.json"
truncate -s $((64 * 1024 * 1024 + 1)) "$work/over_limit.json"
"$work/plan_check" cpp/tests/corpus/*.json "$work"/plans/*.json /dev/zero "$work/fifo.json" "$work" \
  "$work/over_limit.json" >"$work/verdicts.tsv"
# good_* files must be accepted, every other file rejected.
awk -F'\t' '{ good = ($2 ~ /\/good_[^\/]*$/) }
  (good && $1 != "accepted") || (!good && $1 != "rejected") { print "unexpected verdict: " $0; bad = 1 }
  END { if (NR < 60) { print "only " NR " verdicts"; bad = 1 }; exit bad }' "$work/verdicts.tsv"
echo "$(grep -c '^accepted' "$work/verdicts.tsv") accepted, $(grep -c '^rejected' "$work/verdicts.tsv") rejected"
"$work/capi_errors" "$work/plans/good_dpmpp_3m_sde.json"
"$work/heun_gaussian" "$work/plans/good_heun.json" 4 33 0.3 0.5 4 8 15 16 >/dev/null

echo "== ${SECONDS}s: tests against the sanitized extension"
# libasan first; libstdc++ with it, so that ASan's __cxa_throw interceptor finds the real one (the bindings throw).
asan=$("$cxx" -print-file-name=libasan.so)
stdcxx=$("$cxx" -print-file-name=libstdc++.so)
[[ -f $asan && -f $stdcxx ]] || { echo "libasan or libstdc++ not found ($asan, $stdcxx)"; exit 1; }
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:log_path=$work/sanitizer  # CPython leaks by design
export TRITON_INTERPRET=1
# pytest runs in the process that checked where edmrt._core came from.
LD_PRELOAD="$asan $stdcxx" "$python" - "$site/edmrt/" tests/test_core.py tests/test_kernels.py tests/test_capi.py <<'PY'
import sys

import edmrt._core
import pytest

if not edmrt._core.__file__.startswith(sys.argv[1]):
    sys.exit(f"edmrt._core came from {edmrt._core.__file__}, not the sanitized build in {sys.argv[1]}")
print(f"edmrt._core: {edmrt._core.__file__}")
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
PY
echo "== ${SECONDS}s: sanitizers: no report"
