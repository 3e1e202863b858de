"""edmrt.kernels: the fused step, one operation per network evaluation.

``fused_step`` (or a ``Stepper`` bound to one set of buffers) runs stage s of a plan table in place;
``init_state`` writes the state before stage 0.  ``dispatch.py`` validates and picks the implementation
(Triton, the C++ core, the torch reference in ``reference.py``), ``table.py`` defines the table's columns,
``philox.py`` the noise streams.
"""
from .dispatch import (IMPLS, Stepper, check_step_args, core_available, default_impl, fused_step, init_state,
                       triton_available)
from .philox import philox_normal
from .table import COLUMNS, FIXED, plan_table

__all__ = ["fused_step", "init_state", "Stepper", "plan_table", "philox_normal", "IMPLS", "default_impl",
           "check_step_args", "core_available", "triton_available", "COLUMNS", "FIXED"]
