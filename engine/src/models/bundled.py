"""Models shipped with edmrt: their cards and weights, read by ``load_bundled`` (``edmrt.load`` dispatches here).

Each bundled model is ``weights/NAME.safetensors`` plus its model card ``weights/NAME.json``
(architecture, preconditioning, training command, seed, machine, metrics).  Each bundled adapter is a peft
adapter folder ``weights/NAME/`` (adapter_config.json, adapter_model.safetensors) plus its edmrt card
(``edmrt.json``).  Weights are read with safetensors only: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import torch

from ..checks import check_device
from ..model import Model
from ..precond import ConsistencyPrecond, EDMPrecond
from .unet import EDMUNet, UNetConfig

__all__ = ["load_bundled", "BUNDLED", "BUNDLED_ADAPTERS", "WEIGHTS_DIR", "read_card", "read_weights", "write_model"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_READ_BYTES_MAX = 256 << 20  # weights files up to this size are read into memory, larger ones memory-mapped
BUNDLED = {
    "digits": "class-conditional EDM UNet on scikit-learn's 8x8 digits (Heun, 18 steps)",
    "digits-cd": "consistency-distilled student of digits (consistency or tcd solver, 1-4 steps)",
}
BUNDLED_ADAPTERS = {
    "digits-cd-lora": "few-step LoRA on digits: consistency distillation into an adapter on the frozen teacher "
                      "(consistency or tcd solver, 1-4 steps)",
}


_CARD_BYTES_MAX = 1 << 20      # a model card is a few KB
_HEADER_BYTES_MAX = 100 << 20  # the safetensors format's own bound on its JSON header
# safetensors' dtype names and the torch dtypes they hold.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _regular_file(path: Path, what: str, limit: int | None = None) -> Path:
    """``path`` as a regular file of at most ``limit`` bytes (a device, a FIFO or a folder is refused before it is
    opened: reading one could block or never end)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist (cannot be read)") from None
    except OSError as exc:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {str(path)!r} is not a regular file")
    if limit is not None and st.st_size > limit:
        raise ValueError(f"{what} {str(path)!r} is {st.st_size} bytes, more than the {limit} a {what} may have")
    return path


def read_card(name: str, root: Path) -> dict:
    path = _regular_file(Path(root) / f"{name}.json", "model card", _CARD_BYTES_MAX)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"model card {str(path)!r} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"model card {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(card, dict) or not str(card.get("format", "")).startswith("edmrt-model-card-"):
        raise ValueError(f"{str(path)!r} is not an edmrt model card")
    return card


def weights_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a safetensors file, from its header alone (nothing else is read):
    8 bytes little-endian header length, then that many bytes of JSON.  Each tensor's data_offsets must be its
    shape's bytes, in order, within the file (a truncated file, or one whose header lies about a shape or an offset,
    is refused here, naming the tensor, before any data is read)."""
    path = _regular_file(Path(path), "weights file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(_HEADER_BYTES_MAX, size - 8):
                raise ValueError(f"its header length {n} does not fit the file ({size} bytes): not safetensors, or "
                                 "truncated")
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        out, spans = {}, []
        for k, v in header.items():
            if k == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(v["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {k!r} has dtype {v['dtype']!r}, which edmrt does not read")
            shape = tuple(v["shape"])
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError(f"tensor {k!r} has shape {list(shape)}: expected non-negative integers")
            begin, end = v["data_offsets"]
            want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != want:
                raise ValueError(f"tensor {k!r}: data_offsets {[begin, end]} hold {end - begin} bytes, its "
                                 f"{v['dtype']} shape {list(shape)} needs {want}")
            spans.append((begin, end, k))
            out[k] = (dtype, shape)
        pos = 0
        for begin, end, k in sorted(spans):
            if begin != pos:
                raise ValueError(f"tensor {k!r}: data_offsets start at {begin}, expected {pos} (overlapping or "
                                 "gapped data)")
            pos = end
        if 8 + n + pos != size:
            raise ValueError(f"its tensors need {8 + n + pos} bytes, the file has {size} (truncated or padded)")
        return out
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as safetensors (corrupt or not safetensors): {exc}") from None


def check_fits(header: dict, module: torch.nn.Module, path: Path, expected: str) -> None:
    """The file's tensors (``weights_header``) are exactly the module's: the same names, shapes and dtypes.  Works on
    a module built on the meta device, so that a card describing a huge network is refused before any allocation."""
    ref = {k: (v.dtype, tuple(v.shape)) for k, v in module.state_dict().items()}
    both = sorted(set(ref) & set(header))
    bad = {"missing": sorted(set(ref) - set(header)), "unexpected": sorted(set(header) - set(ref)),
           "wrong shape": [f"{k} {header[k][1]} (expected {ref[k][1]})" for k in both if ref[k][1] != header[k][1]],
           # A header's dtype is what the bytes mean: an I32 tensor where F32 belongs would load as garbage values.
           "wrong dtype": [f"{k} {header[k][0]} (expected {ref[k][0]})" for k in both if ref[k][0] != header[k][0]]}
    if any(bad.values()):
        raise ValueError(f"{str(path)!r} does not fit {expected}: " + "; ".join(
            f"{len(v)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for k, v in bad.items() if v))


def read_weights(path: Path, module: torch.nn.Module, expected: str = "its model card's architecture") -> None:
    """Load safetensors ``path`` into ``module`` strictly; ValueError for an unreadable or mismatched file
    (``expected`` names what the weights must fit, in that message).  The header is checked before the data is read."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    path = Path(path)
    if not os.path.lexists(path):
        raise ValueError(f"weights file {str(path)!r} does not exist")
    check_fits(weights_header(path), module, path, expected)
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


def _from_card(card: dict, name: str):
    """(UNetConfig, Precond, Model keywords) of a model card, each field checked by name."""
    def field(key, kind, what):
        if key not in card or not isinstance(card[key], kind) or isinstance(card[key], bool):
            raise ValueError(f"model card of {name!r} is incomplete or invalid: {key!r} must be {what}, got "
                             f"{card.get(key)!r:.80}")
        return card[key]

    arch = field("architecture", dict, "an object (the UNet's config)")
    try:
        config = UNetConfig(**{**arch, "channel_mult": tuple(arch["channel_mult"]),
                               "attn_resolutions": tuple(arch["attn_resolutions"])})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model card of {name!r}: architecture is invalid: {exc}") from None
    pc = field("precond", dict, "an object")
    if pc.get("name") == "edm":
        precond = EDMPrecond(pc.get("sigma_data"))
    elif pc.get("name") == "cm":
        precond = ConsistencyPrecond(pc.get("sigma_data"), pc.get("sigma_min"))
    else:
        raise ValueError(f"model card of {name!r}: preconditioning {pc.get('name')!r} is not supported (edm or cm)")
    kw = dict(sample_shape=tuple(field("sample_shape", list, "a list of ints")),
              num_classes=field("num_classes", int, "an int"), sigma_min=field("sigma_min", (int, float), "a number"),
              sigma_max=field("sigma_max", (int, float), "a number"))
    return config, precond, kw


def load_bundled(name: str, root: str | Path | None = None, device: str | torch.device = "cpu") -> Model:
    """The bundled model ``name`` (``BUNDLED``) from its card and safetensors weights in ``root`` (default
    ``WEIGHTS_DIR``), in eval mode on ``device``; ValueError for an unknown name, a missing, corrupt or mismatched
    weights file, or a bad card.  ``edmrt.load`` is the entry point for every kind of model."""
    if not isinstance(name, str) or name not in BUNDLED:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(BUNDLED)} or a local diffusers folder")
    device = check_device(device)
    root = Path(root) if root is not None else WEIGHTS_DIR
    card = read_card(name, root)
    config, precond, kw = _from_card(card, name)
    # The card's own fields must agree with its architecture: a wrong shape or class count samples garbage.
    arch_shape = (config.img_channels, config.img_resolution, config.img_resolution)
    if kw["sample_shape"] != arch_shape:
        raise ValueError(f"model card of {name!r}: sample_shape {list(kw['sample_shape'])} contradicts its "
                         f"architecture ({list(arch_shape)})")
    if kw["num_classes"] != config.num_classes:
        raise ValueError(f"model card of {name!r}: num_classes {kw['num_classes']!r} contradicts its architecture "
                         f"({config.num_classes})")
    weights = root / f"{name}.safetensors"
    with torch.device("meta"):  # shapes only: a card that describes a huge network allocates nothing
        check_fits(weights_header(weights), EDMUNet(config), weights, "its model card's architecture")
    net = EDMUNet(config)
    read_weights(weights, net)
    net.eval().requires_grad_(False).to(device)
    return Model(net, precond, metadata={"name": name, **card}, **kw)
