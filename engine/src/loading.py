"""``edmrt.load``: any model by name or path, as an ``edmrt.Model``, with adapters fused in on request.

A bundled name (``edmrt.models.bundled``: card + safetensors), or a local diffusers folder (``edmrt.adapters.diffusers``:
``load_diffusers``); ``adapters`` {source: weight} are then loaded (``edmrt.adapters.lora``) and fused into the weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import Model
from .models.bundled import BUNDLED, BUNDLED_ADAPTERS, WEIGHTS_DIR, load_bundled

__all__ = ["load", "with_adapters"]


def load(name: str = "digits", root: str | Path | None = None, device: str | torch.device = "cpu",
         adapters=None, combination: str = "linear", **merge_kw):
    """The bundled model ``name`` (``BUNDLED``) as an ``edmrt.Model`` in eval mode; ``root``: another weights folder.

    Raises ValueError for an unknown name, a missing, corrupt or mismatched weights file, or a bad card.
    A local diffusers folder (a directory holding model_index.json) loads through
    ``edmrt.adapters.diffusers.load_diffusers``.  ``adapters`` {source: weight}: LoRA / DoRA adapters loaded and
    fused into the weights (``with_adapters``), e.g. ``load("digits", adapters={"digits-cd-lora": 1.0})``.
    """
    model = _load(name, root, device)
    return with_adapters(model, adapters, combination, **merge_kw) if adapters else model


def _is_diffusers_folder(name) -> bool:
    """``name`` is a path to a directory holding model_index.json (a diffusers pipeline folder)."""
    try:
        return isinstance(name, (str, os.PathLike)) and (Path(name) / "model_index.json").is_file()
    except (OSError, ValueError):  # a name too long for a path, or one with a NUL byte
        return False


def _adapter_source(key) -> tuple[Path, str]:
    """(path, adapter name) of an ``adapters`` key: a bundled adapter's name or a path to an adapter folder /
    .safetensors file (named after its stem, other characters than letters, digits, '-' and '_' made '_')."""
    if isinstance(key, str) and key in BUNDLED_ADAPTERS:
        return WEIGHTS_DIR / key, key
    if not isinstance(key, (str, os.PathLike)):
        raise ValueError(f"an adapters key must be a bundled adapter ({', '.join(BUNDLED_ADAPTERS)}) or a path, got "
                         f"{type(key).__name__}")
    path = Path(key)
    if not path.exists():
        raise ValueError(f"adapter {str(key)!r} is neither a bundled adapter ({', '.join(BUNDLED_ADAPTERS)}) nor an "
                         "existing adapter folder or .safetensors file")
    stem = path.stem if path.suffix == ".safetensors" else path.name
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "adapter"
    return path, name


def with_adapters(model: Model, adapters, combination: str = "linear", **merge_kw) -> Model:
    """``model`` with the adapters {source: weight} loaded (``edmrt.adapters.lora.load_adapter``) and fused into its
    weights in place (one adapter scaled by its weight; several combined by ``combination``, peft's
    ``add_weighted_adapter``).  A few-step adapter's card (``edmrt.json`` with a ``precond``, e.g. digits-cd-lora)
    also sets the preconditioning, sigma range and sampling defaults: the result is then a new Model over the same
    network, which keeps the base model's preconditioning in ``metadata["base_precond"]``.  Its card's ``base``
    must name the model it was trained on.  The adapters stay loaded: ``Sampler.set_adapters`` swaps them."""
    from .adapters.lora import adapters_of, load_adapter

    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(f"adapters must be a non-empty dict {{name or path: weight}}, got {adapters!r:.80}")
    weights, sources = {}, {}
    for key, w in adapters.items():
        path, name = _adapter_source(key)
        where = str(Path(path).resolve())
        if name in sources:   # two sources under one name: the second would silently be the first
            raise ValueError(f"adapters {sources[name][0]!r} and {str(key)!r} would both be named {name!r} (an adapter "
                             "is named after its folder or file): rename one of them")
        sources[name] = (str(key), where)
        loaded = adapters_of(model)
        if loaded is None or name not in loaded.names:
            loaded = load_adapter(model, path, name)
        elif loaded.sources.get(name) not in (None, where):
            raise ValueError(f"an adapter named {name!r} is already loaded from {loaded.sources[name]!r}; "
                             f"{str(key)!r} is another: rename it")
        weights[name] = w
    loaded = adapters_of(model)
    few = loaded.few_step_card(weights)
    for name in weights:
        base = (loaded.cards.get(name) or {}).get("base")
        if base is not None and base != model.metadata.get("name"):
            raise ValueError(f"adapter {name!r} was trained on {base!r}, not on {model.metadata.get('name')!r}")
    loaded.apply(weights, combination, **merge_kw)
    if few is None:
        return model
    name, card = few
    from .precond import precond_from_dict

    meta = {**model.metadata, "base_precond": model.precond.to_dict(), "few_step_adapter": name,
            "adapters": dict(weights)}
    if "sampling" in card:
        meta["sampling"] = card["sampling"]
    try:
        precond = precond_from_dict(card["precond"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"adapter {name!r}: its card's precond {card['precond']!r:.120} is invalid ({exc})") from None
    out = Model(model.network, precond, sample_shape=model.sample_shape,
                num_classes=model.num_classes, sigma_min=float(card.get("sigma_min", model.sigma_min)),
                sigma_max=float(card.get("sigma_max", model.sigma_max)), metadata=meta, cond=model.cond,
                decoder=model.decoder)
    out.adapters = loaded
    return out


def _load(name, root, device) -> Model:
    if root is None and _is_diffusers_folder(name):
        from .adapters.diffusers import load_diffusers

        return load_diffusers(name, device=device)
    if root is None and isinstance(name, (str, Path)) and name not in BUNDLED and (
            isinstance(name, Path) or "/" in name or Path(name).is_dir()):
        from .adapters.diffusers import load_diffusers  # a path or a Hub id: that loader names what is wrong

        return load_diffusers(name, device=device)
    return load_bundled(name, root, device)
