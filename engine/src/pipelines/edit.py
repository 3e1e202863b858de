"""Editing an inverted image by edit guidance: LEDITS++ (Brack et al. 2024, "LEDITS++: Limitless Image Editing using
Text-to-Image Models", Sec. 3.2; diffusers' ``LEditsPPPipelineStableDiffusion``).

From an inversion (``edmrt.invert``; the DDPM kind reconstructs exactly, so an edit changes only what it guides), the
sampler runs again along the inverted plan with the inversion's noise maps, and at every stage the network output is

    F = F_base + sum_k m_k * g_k,   g_k = s_k (F_k - F_u)       (their Eq. 6-8: s_k < 0 for a reversed concept)

with F_u the unconditional row, F_k the row of edit concept k, F_base = F_u (LEDITS++), or the inversion's own
condition (``cond``, with ``guidance`` w: F_u + w (F_c - F_u), or F_c without it) so that an edit with no concepts
active is the reconstruction.  s_k is 0 before concept k's ``warmup`` steps and from its ``cooldown`` step on.  The
implicit mask m_k (their Eq. 9, the noise-based part): 1 where the channel sum of |g_k| reaches its ``threshold``
quantile over the sample's pixels, else 0 (``mask="noise"``); ``mask=None`` keeps every pixel.  The cross-attention
part of their mask needs the network's attention maps, which no edmrt backend exposes: ``mask="attention"`` is refused.

All rows (unconditional, the condition, every concept) are one network batch per stage; the combination and its
quantile are torch operations on static buffers (``EditEngine``) between the network and the fused step, so the
whole edit loop is one CUDA graph on a GPU.  The quantile is torch.quantile's linear rule written with sort, gather
and lerp on a device tensor of thresholds (torch.quantile reads its q on the host), equal to it float for float
(tests/test_edit.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapters.lora import reading_weights
from ..checks import is_real
from ..engine import Engine
from ..model import Model
from ..progress import stage_progress
from ..request import Request, check_guidance, make_request
from ..sampler import Sampler
from .inversion import Inversion

__all__ = ["edit", "EditEngine", "EDIT_KEYS", "MASKS", "quantile_rows"]

EDIT_KEYS = {"cond": None, "scale": 5.0, "reverse": False, "threshold": 0.9, "warmup": 0, "cooldown": None}
MASKS = ("noise", None)
BASES = (None, "cond", "guided")
SCALE_MAX = 100.0          # edit guidance scales beyond this are typos (LEDITS++ uses 2 - 15)


def quantile_rows(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """torch.quantile(v, q, dim=1) (linear interpolation) for v (B, P) and a 0-d tensor q in [0, 1], with no host
    read: ranks = q (P - 1), the sorted values below and above, lerp by the fraction (as ATen computes it)."""
    s = v.sort(dim=1).values
    ranks = (q.to(v.dtype) * (v.shape[1] - 1)).expand(v.shape[0], 1)
    below = ranks.to(torch.int64)
    above = ranks.ceil().to(torch.int64)
    return s.gather(1, below).lerp_(s.gather(1, above), ranks - below).squeeze(1)


@dataclass(frozen=True)
class EditRequest(Request):
    """A ``Request`` with the edit's rows: the network conditioning of every row, the per-stage weights, thresholds."""

    rows: dict = field(default_factory=dict)            # {name: (R B, *shape)}: [uncond; cond?; concept_1..K]
    weights: torch.Tensor | None = None                 # (stages, 1 + K) float32: w, then s_k per stage
    thresholds: torch.Tensor | None = None              # (K,) float32


class EditEngine(Engine):
    """An engine whose network output is the edit-guidance combination of R = 1 + [cond] + K rows (module
    docstring): the fused step's input x_in (B rows) is copied into the R-row network input each stage; the rows'
    conditioning, the weights and the thresholds are static buffers, so a CUDA graph replays any edit of this shape."""

    def __init__(self, backend, plan, batch: int, sample_shape, device="cpu", concepts: int = 1,
                 base: str | None = None, mask: str | None = "noise", graph: bool = True, impl: str = "auto",
                 null_label: int = 0, cond_inputs=None):
        """``base``: None (F_u), "cond" (F_c: the condition row alone) or "guided" (F_u + w (F_c - F_u), w the
        weights' first column)."""
        if isinstance(concepts, bool) or not isinstance(concepts, int) or concepts < 0:
            raise ValueError(f"concepts must be an int >= 0, got {concepts!r}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {list(MASKS)}, got {mask!r}")
        if base not in BASES:
            raise ValueError(f"base must be one of {list(BASES)}, got {base!r}")
        super().__init__(backend, plan, batch, sample_shape, device, guidance=False, graph=graph, impl=impl,
                         null_label=null_label, cond_inputs=cond_inputs)
        self.concepts, self.base, self.mask = concepts, base, mask
        self.source = base is not None
        self.rows = 1 + int(self.source) + concepts
        R, B, shp, dev = self.rows, batch, self.sample_shape, self.device
        self.x_net = torch.zeros((R * B,) + shp, device=dev, dtype=self.x_in.dtype)
        self.sigma_net = torch.zeros(R * B, device=dev, dtype=self.sigma_in.dtype)
        self.F_net = torch.zeros((R * B,) + shp, device=dev, dtype=self.F.dtype)
        self.F_edit = torch.zeros_like(self.F)
        self.cond_net = {c.name: torch.zeros((R * B,) + c.shape, dtype=c.dtype, device=dev) for c in self.cond_inputs}
        self.W = torch.zeros((plan.stages, 1 + concepts), device=dev)
        self.thresholds = torch.zeros(concepts, device=dev)
        # (stages, K, B, 1, *spatial) (or (stages, K, B, *shape) for a 1-D state): each stage's implicit masks, the
        # last request's, for looking at (``edit(..., return_masks=True)``).
        mshape = (1,) + shp[1:] if len(shp) > 1 else shp
        self.masks = torch.zeros((plan.stages, concepts, B) + mshape, device=dev)

    def _network(self, stage: int, cond) -> torch.Tensor:
        R, B = self.rows, self.batch
        self.x_net.view((R,) + tuple(self.x_in.shape)).copy_(self.x_in.expand((R,) + tuple(self.x_in.shape)))
        self.sigma_net.view(R, B).copy_(self.sigma_in.expand(R, B))
        F = self.backend(self.x_net, self.sigma_net, self.cond_net, self.F_net)
        F = (self.F_net if F is None else F).view((R, B) + self.sample_shape).to(torch.float32)
        self.F_edit.copy_(self.combine(F, stage))
        return self.F_edit

    def combine(self, F: torch.Tensor, stage: int) -> torch.Tensor:
        """F (R, B, *shape) float32 rows [uncond; cond?; concepts] at stage ``stage``: the edit's F (its masks into
        ``self.masks``)."""
        w = self.W[stage]
        F_u = F[0]
        base = F_u
        if self.base == "cond":
            base = F[1]
        elif self.base == "guided":
            base = F_u + w[0] * (F[1] - F_u)
        edit = torch.zeros_like(F_u)
        for k in range(self.concepts):
            g = (F[1 + int(self.source) + k] - F_u) * w[1 + k]
            if self.mask == "noise":
                q = g.abs().sum(dim=1, keepdim=True) if g.ndim > 2 else g.abs()
                thr = quantile_rows(q.flatten(1), self.thresholds[k])
                m = q >= thr.view((-1,) + (1,) * (q.ndim - 1))
                self.masks[stage, k].copy_(m & (w[1 + k] != 0))
                g = torch.where(m, g, torch.zeros_like(g))
            else:
                self.masks[stage, k].copy_((w[1 + k] != 0).expand(self.masks.shape[2:]))
            edit = edit + g
        return base + edit

    def _copy_inputs(self, req) -> None:
        super()._copy_inputs(req)
        for name, buf in self.cond_net.items():
            buf.copy_(req.rows[name])
        self.W.copy_(req.weights)
        self.thresholds.copy_(req.thresholds)


def _concepts(edits) -> list[dict]:
    """The edits as dicts with every key (EDIT_KEYS' defaults), checked; ValueError names the edit and the key."""
    if not isinstance(edits, (list, tuple)) or not edits:
        raise ValueError(f"edits must be a non-empty list of dicts {{'cond': ..., 'scale': 5.0, ...}}, got {edits!r:.200}")
    out = []
    for i, e in enumerate(edits):
        if not isinstance(e, dict) or "cond" not in e:
            raise ValueError(f"edits[{i}] must be a dict with 'cond' (the concept's condition), got {e!r:.200}")
        unknown = sorted(set(e) - set(EDIT_KEYS))
        if unknown:
            raise ValueError(f"edits[{i}] has unknown keys {unknown}; expected {sorted(EDIT_KEYS)}")
        c = {**EDIT_KEYS, **e}
        if not is_real(c["scale"]) or not 0.0 <= float(c["scale"]) <= SCALE_MAX:
            raise ValueError(f"edits[{i}]['scale'] must be a number in [0, {SCALE_MAX}], got {c['scale']!r}")
        if not isinstance(c["reverse"], bool):
            raise ValueError(f"edits[{i}]['reverse'] must be True or False, got {c['reverse']!r}")
        if not is_real(c["threshold"]) or not 0.0 <= float(c["threshold"]) < 1.0:
            raise ValueError(f"edits[{i}]['threshold'] must be a quantile in [0, 1), got {c['threshold']!r}")
        for key in ("warmup", "cooldown"):
            v = c[key]
            if not (v is None and key == "cooldown") and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"edits[{i}]['{key}'] must be an int >= 0 (a step index){' or None' * (key == 'cooldown')}"
                                 f", got {v!r}")
        if c["cooldown"] is not None and c["cooldown"] <= c["warmup"]:
            raise ValueError(f"edits[{i}]: cooldown ({c['cooldown']}) must come after warmup ({c['warmup']})")
        out.append(c)
    return out


def _weights(plan, concepts: list[dict], w: float) -> np.ndarray:
    """(stages, 1 + K): the base's guidance weight, then each concept's signed scale where its steps are active."""
    W = np.zeros((plan.stages, 1 + len(concepts)))
    W[:, 0] = w
    for k, c in enumerate(concepts):
        active = (plan.step >= c["warmup"]) & ((plan.step < c["cooldown"]) if c["cooldown"] is not None else True)
        W[:, 1 + k] = np.where(active, -float(c["scale"]) if c["reverse"] else float(c["scale"]), 0.0)
    return W


def _rows(model: Model, device, N: int, cond, uncond, concepts) -> dict:
    """{name: (R N, *shape)}: the unconditional row, the condition (when given), then every concept's, each
    checked as ``Sampler.sample`` checks its conditioning (``make_request``)."""
    seeds = list(range(N))

    def checked(c, what):
        try:
            return make_request(model.cond, model.sample_shape, device, seeds, cond=c).cond
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None

    blocks = ([checked(cond, "cond")] if cond is not None else []) + \
        [checked(c["cond"], f"edits[{k}]['cond']") for k, c in enumerate(concepts)]
    if uncond is not None:
        u = make_request(model.cond, model.sample_shape, device, seeds, cond=blocks[0], guidance=1.0,
                         uncond=uncond).uncond
    else:
        u = {}
    missing = [c.name for c in model.cond if c.null is None and c.name not in u]
    if missing:
        raise ValueError(f"edit guidance needs uncond for {missing} (e.g. negative prompt embeddings): these inputs "
                         "have no null value")
    first = blocks[0]
    null = {}
    for c in model.cond:
        if c.name in u:
            null[c.name] = u[c.name]
        elif c.null == "cond":
            null[c.name] = first[c.name]
        else:
            null[c.name] = torch.full((N,) + c.shape, c.null, dtype=c.dtype, device=device)
    return {c.name: torch.cat([null[c.name]] + [b[c.name] for b in blocks]) for c in model.cond}


def edit(model: Model, inversion: Inversion, edits, cond=None, guidance: float | None = None, uncond=None,
         mask: str | None = "noise", backend="auto", device=None, output: str | None = None,
         engine: EditEngine | None = None, return_masks: bool = False, progress=False):
    """Edit the images of ``inversion`` by edit guidance (module docstring); returns what ``Sampler.sample`` returns.

    ==========  ===========================================================================================
    inversion   an ``edmrt.invert`` result (``kind="ddpm"``: exact, edits change only what they guide)
    edits       [{"cond": ..., "scale": 5.0, "reverse": False, "threshold": 0.9, "warmup": 0,
                "cooldown": None}, ...]: the concepts, each a condition as ``Sampler.sample`` takes it (a
                class label, {name: tensor}); warmup / cooldown are step indices of the inverted plan
    cond        the condition the image was inverted under, as the base (None: LEDITS++'s unconditional
                base); ``guidance`` its CFG weight, as in the inversion
    uncond      the unconditional row, for inputs with no null value (negative prompt embeddings)
    mask        "noise" (LEDITS++'s implicit mask, each concept's threshold) or None
    engine      an ``EditEngine`` to reuse (``edit`` builds one otherwise)
    return_masks  also return the implicit masks, (stages, K, N, 1, H, W) float32 (1: the concept guided
                that pixel at that stage; all ones where mask=None and the concept is active)
    progress    True: a progress bar over the stages; or a callable given the stages done
    ==========  ===========================================================================================

    ValueError names what does not fit: the inversion, an edit's key or value, a condition, the mask."""
    if not isinstance(model, Model):
        raise ValueError(f"model must be an edmrt Model, got {type(model).__name__}")
    if not isinstance(inversion, Inversion):
        raise ValueError(f"inversion must be an edmrt.invert result (an Inversion), got {type(inversion).__name__}")
    if mask == "attention":
        raise ValueError("mask='attention' (LEDITS++'s cross-attention mask) needs the network's attention maps, "
                         "which no edmrt backend exposes; use mask='noise' or None")
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {list(MASKS) + ['attention']}, got {mask!r}")
    output = Sampler._check_output_for(model, output)
    if guidance is not None and cond is None:
        raise ValueError("guidance weighs the base condition: pass cond (what the image was inverted under)")
    w = check_guidance(guidance)
    concepts = _concepts(edits)
    sampler = Sampler(model, backend=backend, device=device, **inversion.sampler_args)
    plan = sampler.plan
    if inversion.plan is not None and inversion.plan != plan:
        raise ValueError("inversion's noise maps are for another plan than its sampler_args build")
    N = inversion.latents.shape[0]
    rows = _rows(model, sampler.device, N, cond, uncond, concepts)
    base = None if cond is None else ("cond" if w is None else "guided")
    if engine is None:
        engine = EditEngine(sampler.backend, plan, N, model.sample_shape, sampler.device, concepts=len(concepts),
                            base=base, mask=mask, graph=sampler.graph, null_label=model.null_label,
                            cond_inputs=model.cond)
    elif (not isinstance(engine, EditEngine) or engine.plan != plan or engine.batch != N
          or engine.concepts != len(concepts) or engine.base != base or engine.mask != mask):
        raise ValueError("engine: an EditEngine for this inversion's plan, batch, number of concepts, base and mask")
    maps = inversion.noise_maps
    req = EditRequest(torch.arange(N, device=sampler.device), None, x_init=inversion.latents.to(sampler.device),
                      noise_maps=None if maps is None else maps.to(sampler.device), rows=rows,
                      weights=torch.tensor(_weights(plan, concepts, 1.0 if w is None else w), dtype=torch.float32),
                      thresholds=torch.tensor([float(c["threshold"]) for c in concepts], dtype=torch.float32))
    with stage_progress(progress, plan.stages, "edit") as tick, reading_weights(model):
        x = engine.run_request(req, tick)
    out = sampler.decode(x) if output == "image" else x
    return (out, engine.masks.clone().cpu()) if return_masks else out
