import os
import sys

# Triton kernels run on the CPU only in interpreter mode, which must be chosen before any
# @triton.jit decorator runs: set it here, first, unless a GPU is present (benchmarks/gpu_check.sh
# exports TRITON_INTERPRET=0 there, so the kernels compile for the device).
os.environ.setdefault("TRITON_INTERPRET", "1")
# backend="auto" measures the installed backends at its first call per batch size (edmrt.backends.auto); pinned here
# to ONNX Runtime so that tests keep one backend whatever the timing; tests/test_openvino.py unpins it to test "auto".
os.environ.setdefault("EDMRT_AUTO_BACKEND", "onnxruntime")
sys.path.insert(0, os.path.dirname(__file__))

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# A kernel family that cannot run here skips with one of these reasons.  CI (.ci/run) sets
# EDMRT_REQUIRE_KERNELS=1: such a skip then fails the run instead of passing silently, so that the
# "Correctness, as tested" (docs/guarantees.md) is what CI checks.
KERNEL_SKIP_REASONS = ("triton is not installed", "the C++ core edmrt._core is not built")
_kernel_skips: list[str] = []


def _record_skip(report) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(r in reason for r in KERNEL_SKIP_REASONS):
            _kernel_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _record_skip(report)


def pytest_collectreport(report):
    _record_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("EDMRT_REQUIRE_KERNELS") == "1" and _kernel_skips:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"EDMRT_REQUIRE_KERNELS=1 but {len(_kernel_skips)} kernel test(s) skipped:", red=True)
            for line in _kernel_skips[:20]:
                tr.write_line(f"  {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def kdiff():
    from peers import load_k_diffusion_sampling

    mod = load_k_diffusion_sampling()
    if mod is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq)")
    return mod


@pytest.fixture
def gen():
    """A seeded generator per test: inputs differ from test to test, and a failure reproduces
    (crc32 of the test id; Python's str hash is salted per process)."""
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    return torch.Generator().manual_seed(zlib.crc32(test_id.encode()))


@pytest.fixture(scope="session")
def triton_device():
    """Where the Triton kernel runs in this session: CUDA when present, else the CPU interpreter."""
    from edmrt.kernels import triton_step

    if not triton_step.available():
        pytest.skip("triton is not installed (the test extra lists it: pip install -e '.[test]')")
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton cannot run here")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (two OpenMP threads on a shared 2-core VM spin-wait ~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
