"""Peers for the parity tests: re-exported from ``edmrt.lab.peers`` (which ``edmrt quality --peers`` uses too)."""
from edmrt.lab.peers import k_denoiser, load_k_diffusion_sampling  # noqa: F401
