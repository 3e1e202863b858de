import os
import sys

# Triton kernels (issue 4) run on the CPU only in interpreter mode, which must be chosen
# before any @triton.jit decorator runs: set it here, first.
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
