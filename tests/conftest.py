import os
import sys

# Triton kernels (issue 4) run on the CPU only in interpreter mode, which must be chosen
# before any @triton.jit decorator runs: set it here, first.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

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
    """A fresh seeded generator per test; the seed differs per test so inputs are fresh."""
    return torch.Generator().manual_seed(abs(hash(os.environ.get("PYTEST_CURRENT_TEST", ""))) % (2 ** 31))
