"""Pipelines: what runs above the Sampler, one job each (``inversion``: a real image to the noise that samples back
into it).  They build Samplers and plans; the Sampler and everything under it never imports them."""
from .inversion import Inversion, invert

__all__ = ["Inversion", "invert"]
