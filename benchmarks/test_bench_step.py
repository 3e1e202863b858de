"""pytest-benchmark suite for the CPU fused step and its baselines (not part of the test suite):

    python -m pytest benchmarks/test_bench_step.py --benchmark-only

The committed numbers come from benchmarks/step_cpu.py, which interleaves the same cases in one process
and reports medians and ratios (these VMs drift 2-5x over minutes, so separate runs do not compare).
"""
import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("diffusers")

from step_cpu import cases  # noqa: E402  (benchmarks/ is on sys.path: pytest's rootdir-relative import)

SHAPES = [(64, 3, 32, 32), (4, 4, 128, 128)]
CASES = {shape: cases(shape) for shape in SHAPES}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(CASES[SHAPES[0]]))
def test_step(benchmark, shape, name):
    fn, nbytes = CASES[shape][name]
    benchmark.extra_info["bytes"] = nbytes
    benchmark(fn)
