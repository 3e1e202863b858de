#!/usr/bin/env bash
# The project's one GPU check (run it once on a lent GPU, then commit what it wrote):
#   bash benchmarks/gpu_check.sh
# Needs only the machine's torch, triton and numpy.  Installs edmrt with
# `pip install --no-deps --no-build-isolation -e .` (builds the C++ core if pybind11 is there);
# otherwise runs from the tree through a link farm.  Runs the GPU tests (if pytest is there),
# then benchmarks/gpu_check.py; writes JSON and a log to $OUT, or to benchmarks/results/.
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
  for f in engine/*; do ln -s "$PWD/$f" "$farm/edmrt/$(basename "$f")"; done
  ln -s "$PWD/kernels" "$farm/edmrt/kernels"
  ln -s "$PWD/export" "$farm/edmrt/export"
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
echo "== gpu_check done, status $status"
exit $status
