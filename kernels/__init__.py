"""edmrt.kernels: the fused step (issue 4).  For now it re-exports the compiled core's fused
linear combination, the building block of the stage update ``x_new = a x + e x_eval + sum_k b_k Y_k``."""
from edmrt._core import lincomb

__all__ = ["lincomb"]
