"""Pipelines: what runs above the Sampler, one job each (``inversion``: a real image to the noise that samples back
into it; ``edit``: LEDITS++ edit guidance along an inversion; ``inpaint``: known pixels re-imposed at every stage; ``cascade``: Stable Cascade's prior, decoder and VQGAN).  They build Samplers and plans; the Sampler and everything under it never imports them."""
from .cascade import CascadeSampler, cascade
from .edit import EditEngine, edit
from .inpaint import InpaintEngine, inpaint
from .inversion import Inversion, invert

__all__ = ["Inversion", "invert", "edit", "EditEngine", "inpaint", "InpaintEngine", "cascade", "CascadeSampler"]
