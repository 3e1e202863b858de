"""Prompts to conditioning: a diffusers folder's own tokenizer(s) and text encoder(s), run by its pipeline's
``encode_prompt`` (so that edmrt's embeddings are the pipeline's, float for float), with a bounded cache of recent
prompts.  Used by ``edmrt sample --prompt``, ``edmrt edit --prompt``, ``edmrt render`` (requests with a prompt) and
``edmrt serve`` (requests with a prompt).

``encode_prompt``'s outputs map onto the Model's inputs: the prompt embeddings are ``encoder_hidden_states``; the
pooled ones (SDXL's second encoder, SD3's CLIP pair) are ``text_embeds`` or ``pooled_projections``, whichever the
model takes.  The unconditional half is the negative prompt's (empty: the pipeline's own empty-prompt embedding).
SDXL's ``time_ids`` and LCM's ``timestep_cond`` are not text: ``default_inputs`` fills them.
"""
from __future__ import annotations

import inspect
import json
import threading
from collections import OrderedDict
from pathlib import Path

import torch

__all__ = ["PromptEncoder", "default_inputs", "check_prompt", "embeds_from_file", "ALIASES", "LCM_DEFAULT_GUIDANCE",
           "MAX_PROMPT_CHARS"]

LCM_DEFAULT_GUIDANCE = 8.5   # diffusers' LatentConsistencyModelPipeline default guidance_scale
MAX_PROMPT_CHARS = 4096      # a prompt longer than this is a mistake (CLIP reads 77 tokens, T5 256-512)
_NETWORK_PARTS = ("unet", "transformer", "vae", "prior", "decoder")
ALIASES = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "text_embeds", "add_time_ids": "time_ids"}


class PromptEncoder:
    """The text half of a diffusers folder's pipeline (module docstring).  ``names``: the Model's conditioning
    inputs (the pooled embeddings go to ``text_embeds`` or ``pooled_projections``).  ``cache``: how many recent
    (prompt, negative prompt) encodings are kept (LRU); ``encoded`` counts the ones run through the encoder.

    Thread-safe: one lock around the encoder and the cache (a text encoder is not re-entrant)."""

    def __init__(self, folder, names=("encoder_hidden_states",), cache: int = 256, device="cpu"):
        from diffusers import DiffusionPipeline

        folder = Path(folder)
        if isinstance(cache, bool) or not isinstance(cache, int) or cache < 0:
            raise ValueError(f"cache must be an int >= 0 (prompts kept), got {cache!r}")
        try:
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
            skip = {k: None for k in _NETWORK_PARTS if k in index}
            self.pipe = DiffusionPipeline.from_pretrained(str(folder), **skip, use_safetensors=True,
                                                          local_files_only=True)
        except Exception as exc:  # missing tokenizer / text encoder, transformers not installed, a bad folder
            raise ValueError(f"prompts need the folder's tokenizer and text encoder (and transformers installed); "
                             f"give embeddings instead ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not hasattr(self.pipe, "encode_prompt") or getattr(self.pipe, "text_encoder", None) is None:
            raise ValueError(f"{str(folder)!r} has no text encoder: give prompt embeddings instead")
        self.pipe.to(device)
        self.device = torch.device(device)
        self.names = tuple(names)
        self.pooled = "pooled_projections" if "pooled_projections" in self.names else "text_embeds"
        self.cache_size, self.encoded = cache, 0
        self._cache: OrderedDict[tuple, tuple[dict, dict]] = OrderedDict()
        self._lock = threading.Lock()
        self._params = inspect.signature(self.pipe.encode_prompt).parameters

    def encode(self, prompt: str, negative: str | None = None, guided: bool = True) -> tuple[dict, dict]:
        """(cond, uncond) for one prompt, each {input name: (1, *shape) float32 tensor} (uncond empty without
        guidance), from the cache when it was encoded recently."""
        check_prompt(prompt, "prompt")
        if negative is not None:
            check_prompt(negative, "negative_prompt")
        key = (prompt, negative, bool(guided))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            kw = dict(prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                      negative_prompt=negative)
            with torch.inference_mode():
                out = self.pipe.encode_prompt(**{k: v for k, v in kw.items() if k in self._params})
            self.encoded += 1
            cond = {"encoder_hidden_states": out[0].float().cpu()}
            uncond = {"encoder_hidden_states": out[1].float().cpu()} if guided and out[1] is not None else {}
            if len(out) == 4 and self.pooled in self.names:   # SDXL, SD3: the pooled embeddings
                cond[self.pooled] = out[2].float().cpu()
                if guided and out[3] is not None:
                    uncond[self.pooled] = out[3].float().cpu()
            if self.cache_size:
                self._cache[key] = (cond, uncond)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return cond, uncond

    def encode_many(self, prompts, negatives=None, guided: bool = True) -> tuple[dict, dict]:
        """(cond, uncond) for N prompts, each {name: (N, *shape)}; a prompt repeated in the list is encoded once.
        Prompts of different token counts (long prompts) are refused: one batch holds one length."""
        prompts = list(prompts)
        negatives = [None] * len(prompts) if negatives is None else list(negatives)
        if not prompts or len(negatives) != len(prompts):
            raise ValueError(f"prompts: a non-empty list, with one negative prompt per prompt (or none); got "
                             f"{len(prompts)} prompts and {len(negatives)} negative prompts")
        parts = [self.encode(p, n, guided) for p, n in zip(prompts, negatives)]
        cond = {k: torch.cat([c[k] for c, _ in parts]) for k in parts[0][0]}
        uncond = {k: torch.cat([u[k] for _, u in parts]) for k in parts[0][1]}
        return cond, uncond


def embeds_from_file(path, names) -> tuple[dict, dict]:
    """(cond, uncond) from a safetensors file of tensors named after ``names`` or their diffusers aliases (``ALIASES``;
    ``negative_`` before a name: the unconditional half).  ValueError naming the file or the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompt-embeds {str(p)!r} does not exist")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"--prompt-embeds {str(p)!r} is not a safetensors file: {exc}") from None
    cond, uncond = {}, {}
    for key, t in tensors.items():
        neg = key.startswith("negative_")
        name = key.removeprefix("negative_")
        name = ALIASES.get(name, name)
        if name not in names:
            raise ValueError(f"--prompt-embeds: tensor {key!r} is none of the model's inputs {list(names)} "
                             f"(or their diffusers names {sorted(ALIASES)}, with negative_ for the unconditional half)")
        (uncond if neg else cond)[name] = t.float() if t.is_floating_point() else t
    return cond, uncond


def check_prompt(text, what: str) -> str:
    """A prompt: a str of at most MAX_PROMPT_CHARS characters (empty: the pipeline's empty-prompt embedding);
    ValueError naming it."""
    if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
        got = f"{len(text)} characters" if isinstance(text, str) else type(text).__name__
        raise ValueError(f"{what} must be a string of at most {MAX_PROMPT_CHARS} characters, got {got}")
    return text


def default_inputs(model, cond: dict, guidance: float | None) -> tuple[dict, float | None]:
    """SDXL's time_ids and LCM's timestep_cond when not given; returns (cond, the guidance to sample with)."""
    from ..adapters.diffusers import guidance_embedding

    names = {c.name: c for c in model.cond}
    cond = dict(cond)
    if "time_ids" in names and "time_ids" not in cond:
        vae = getattr(model.decoder, "vae", None)
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8  # diffusers' vae_scale_factor
        h, w = (d * scale for d in model.sample_shape[-2:])
        cond["time_ids"] = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)
    if "timestep_cond" in names and "timestep_cond" not in cond:
        w = LCM_DEFAULT_GUIDANCE if guidance is None else guidance
        cond["timestep_cond"] = guidance_embedding(w - 1.0, names["timestep_cond"].shape[0])[0]
        guidance = None  # the guidance is embedded: one conditional half
    return cond, guidance
