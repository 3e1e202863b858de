"""The device table of a plan: one row per stage, the columns every fused-step implementation reads.

Row s: c_in, c_noise, c_skip, c_out, alpha, beta, a, e, n, commit, c_in[s+1], c_noise[s+1], b_0 .. b_{K-1}
(b_0 is column ``FIXED``).  ``COLUMNS`` is the definition: the Triton launchers pass each offset to the kernels
as a constexpr, and the C++ core's ``enum Col`` (exported as ``_core.TABLE_COLUMNS``) is checked against it by
the tests.  float64, built once.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["COLUMNS", "FIXED", "COL", "plan_table"]

COLUMNS = ("c_in", "c_noise", "c_skip", "c_out", "alpha", "beta", "a", "e", "n", "commit", "c_in_next", "c_noise_next")
FIXED = len(COLUMNS)
COL = {name: i for i, name in enumerate(COLUMNS)}  # column index by name


def plan_table(plan, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (S, 12 + K) float64 table of ``plan`` on ``device`` (uploaded once, read by stage index)."""
    S, K = plan.stages, plan.history
    t = np.zeros((S, FIXED + K), dtype=np.float64)
    for name in COLUMNS[:10]:
        t[:, COL[name]] = getattr(plan, name)
    t[:-1, COL["c_in_next"]] = plan.c_in[1:]
    t[:-1, COL["c_noise_next"]] = plan.c_noise[1:]
    t[:, FIXED:] = plan.b
    return torch.from_numpy(t).to(device)
