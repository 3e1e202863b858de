"""Models shipped with edmrt: ``edmrt.load(name) -> edmrt.Model``.

Each bundled model is ``weights/NAME.safetensors`` plus its model card ``weights/NAME.json``
(architecture, preconditioning, training command, seed, machine, metrics).  Weights are read with
safetensors only: nothing is ever unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["load", "BUNDLED", "WEIGHTS_DIR", "read_card", "read_weights", "write_model"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_READ_BYTES_MAX = 256 << 20  # weights files up to this size are read into memory, larger ones memory-mapped
BUNDLED = {
    "digits": "class-conditional EDM UNet on scikit-learn's 8x8 digits (Heun, 18 steps)",
    "digits-cd": "consistency-distilled student of digits (consistency or tcd solver, 1-4 steps)",
}


def read_card(name: str, root: Path) -> dict:
    path = Path(root) / f"{name}.json"
    try:
        card = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"model card {str(path)!r} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"model card {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(card, dict) or not str(card.get("format", "")).startswith("edmrt-model-card-"):
        raise ValueError(f"{str(path)!r} is not an edmrt model card")
    return card


def read_weights(path: Path, module: torch.nn.Module, expected: str = "its model card's architecture") -> None:
    """Load safetensors ``path`` into ``module`` strictly; ValueError for an unreadable or mismatched file
    (``expected`` names what the weights must fit, in that message)."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    try:
        # Small files are parsed from bytes: safetensors' memory-mapped load_file keeps ~17 KB per call alive
        # (measured: 300 calls, +5 MB), which a service that loads models repeatedly would accumulate.
        if path.stat().st_size <= _READ_BYTES_MAX:
            with open(path, "rb") as f:
                state = load(f.read())
        else:
            state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as safetensors (corrupt or not safetensors): {exc}") from None
    ref = module.state_dict()
    want = {k: tuple(v.shape) for k, v in ref.items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    both = sorted(set(want) & set(got))
    bad = {"missing": sorted(set(want) - set(got)), "unexpected": sorted(set(got) - set(want)),
           "wrong shape": [f"{k} {got[k]} (expected {want[k]})" for k in both if want[k] != got[k]],
           # A header's dtype is what the bytes mean: an I32 tensor where F32 belongs would load as garbage values.
           "wrong dtype": [f"{k} {state[k].dtype} (expected {ref[k].dtype})" for k in both
                           if state[k].dtype != ref[k].dtype]}
    if any(bad.values()):
        raise ValueError(f"{str(path)!r} does not fit {expected}: " + "; ".join(
            f"{len(v)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for k, v in bad.items() if v))
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise ValueError(f"{str(path)!r} holds NaN or Inf weights")
    module.load_state_dict(state, strict=True)


def write_model(module: torch.nn.Module, weights: str | Path, card: dict, fmt: str = "edmrt-unet-1") -> dict:
    """The inverse of ``read_weights`` + ``read_card``: ``module``'s tensors as safetensors at ``weights`` and
    ``card`` as JSON beside it (same stem); returns the card."""
    from safetensors.torch import save_file

    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(weights),
              metadata={"format": fmt})
    weights.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def load(name: str = "digits", root: str | Path | None = None, device: str | torch.device = "cpu"):
    """The bundled model ``name`` (``BUNDLED``) as an ``edmrt.Model`` in eval mode; ``root``: another weights folder.

    Raises ValueError for an unknown name, a missing, corrupt or mismatched weights file, or a bad card.
    """
    from ..model import Model
    from ..precond import ConsistencyPrecond, EDMPrecond
    from .unet import EDMUNet, UNetConfig

    if not isinstance(name, str) or name not in BUNDLED:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(BUNDLED)}")
    root = Path(root) if root is not None else WEIGHTS_DIR
    card = read_card(name, root)
    try:
        arch = dict(card["architecture"])
        config = UNetConfig(**{**arch, "channel_mult": tuple(arch["channel_mult"]),
                               "attn_resolutions": tuple(arch["attn_resolutions"])})
        pc = card["precond"]
        if pc.get("name") == "edm":
            precond = EDMPrecond(float(pc["sigma_data"]))
        elif pc.get("name") == "cm":
            precond = ConsistencyPrecond(float(pc["sigma_data"]), float(pc["sigma_min"]))
        else:
            raise ValueError(f"preconditioning {pc.get('name')!r} is not supported (edm or cm)")
        kw = dict(sample_shape=tuple(card["sample_shape"]), num_classes=card["num_classes"],
                  sigma_min=float(card["sigma_min"]), sigma_max=float(card["sigma_max"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model card of {name!r} is incomplete or invalid: {exc!r}") from None
    # The card's own fields must agree with its architecture: a wrong shape or class count samples garbage.
    arch_shape = (config.img_channels, config.img_resolution, config.img_resolution)
    if kw["sample_shape"] != arch_shape:
        raise ValueError(f"model card of {name!r}: sample_shape {list(kw['sample_shape'])} contradicts its "
                         f"architecture ({list(arch_shape)})")
    if kw["num_classes"] != config.num_classes:
        raise ValueError(f"model card of {name!r}: num_classes {kw['num_classes']!r} contradicts its architecture "
                         f"({config.num_classes})")
    net = EDMUNet(config)
    read_weights(root / f"{name}.safetensors", net)
    net.eval().requires_grad_(False).to(device)
    return Model(net, precond, metadata={"name": name, **card}, **kw)
