import os
import sys

# Triton kernels run on the CPU only in interpreter mode, which must be chosen before any
# @triton.jit decorator runs: set it here, first, unless a GPU is present (benchmarks/gpu_check.sh
# exports TRITON_INTERPRET=0 there, so the kernels compile for the device).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


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
        pytest.skip("triton is not installed")
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
