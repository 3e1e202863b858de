#!/usr/bin/env bash
# The project's one GPU check (run it once on a lent GPU, then commit what it wrote):
#   bash benchmarks/fetch_gpu_wheels.sh     # first, here (networked): diffusers' wheels into benchmarks/wheels/
#   bash benchmarks/gpu_check.sh            # on the GPU machine: the device tool with carry=["benchmarks/wheels"]
# Needs the machine's torch, triton and numpy.  Installs edmrt with
# `pip install --no-deps --no-build-isolation -e .` (builds the C++ core if pybind11 is there);
# otherwise runs from the tree through a link farm.  Runs the GPU tests (if pytest is there),
# then benchmarks/gpu_check.py, then the SD-1.5-shaped case benchmarks/gpu_sd.py (diffusers installed offline from
# the carried benchmarks/wheels when the image lacks it; without diffusers gpu_sd.py runs its stated fallback), then
# the SD-1.5-shaped LEDITS++ edit benchmarks/gpu_edit.py (needs diffusers); writes JSON and a log to $OUT, or to
# benchmarks/results/.  The whole run stays within ~9 minutes: gpu_sd.py gets at most 240 s and gpu_edit.py 150 s,
# less when the steps before them ran long.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
exec > >(tee "$LOG") 2>&1
echo "== gpu_check $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

if ! python3 -m pip install -q --no-deps --no-build-isolation -e . 2>"$OUT/pip.err"; then
  echo "pip install failed (see pip.err); running from the tree without the C++ core"
  farm=$(mktemp -d)
  mkdir -p "$farm/edmrt"
  for f in engine/src/*; do ln -s "$PWD/$f" "$farm/edmrt/$(basename "$f")"; done
  ln -s "$PWD/kernels/src" "$farm/edmrt/kernels"
  ln -s "$PWD/export/src" "$farm/edmrt/export"
  export PYTHONPATH="$farm${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import edmrt, edmrt.kernels; print('edmrt from', edmrt.__file__)" || exit 1

status=0
if python3 -c "import pytest" 2>/dev/null; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py || status=1
else
  echo "pytest is not installed here: the checks below cover the GPU tests' content"
fi
timeout 300 python3 benchmarks/gpu_check.py || status=1

# The SD-1.5-shaped case: diffusers' pipeline vs edmrt's whole-loop CUDA graph (benchmarks/gpu_sd.py).
if ! python3 -c "import diffusers" 2>/dev/null; then
  if [ -d benchmarks/wheels ]; then
    echo "installing diffusers from benchmarks/wheels (offline)"
    python3 -m pip install -q --no-index --find-links benchmarks/wheels diffusers==0.42.1 2>"$OUT/pip_diffusers.err" \
      || echo "diffusers install failed (see pip_diffusers.err): gpu_sd.py runs its fallback"
  else
    echo "no diffusers and no benchmarks/wheels (bash benchmarks/fetch_gpu_wheels.sh, carry it): gpu_sd.py falls back"
  fi
fi
left=$((540 - SECONDS))                       # the ~9-minute budget of the whole run
sd_limit=$(( left < 240 ? left : 240 ))
if (( sd_limit < 90 )); then
  echo "gpu_sd.py SKIPPED: only ${left} s left of the 9-minute budget"
  status=1
else
  timeout "$sd_limit" python3 benchmarks/gpu_sd.py --budget-s $(( sd_limit * 5 / 8 )) || status=1
fi
# The SD-1.5-shaped LEDITS++ edit (invert + edit) vs diffusers' LEditsPPPipelineStableDiffusion; the edit loop as
# one CUDA graph (benchmarks/gpu_edit.py).
left=$((540 - SECONDS))
edit_limit=$(( left < 150 ? left : 150 ))
if (( edit_limit < 60 )); then
  echo "gpu_edit.py SKIPPED: only ${left} s left of the 9-minute budget"
  status=1
elif python3 -c "import diffusers" 2>/dev/null; then
  timeout "$edit_limit" python3 benchmarks/gpu_edit.py --budget-s $(( edit_limit * 5 / 8 )) || status=1
else
  echo "gpu_edit.py SKIPPED: diffusers is not installed (LEditsPPPipelineStableDiffusion is the contender)"
fi
echo "== gpu_check done, status $status"
exit $status
