"""Models: the exact Gaussian-mixture denoiser (test oracle and quality benchmark)."""
from .gmm import GaussianMixture

__all__ = ["GaussianMixture"]
