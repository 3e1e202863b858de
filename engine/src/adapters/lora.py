"""LoRA and DoRA adapters on an edmrt network: load, merge, fuse into the base weights, swap in place.

One base model, many adapters (style LoRAs, few-step LCM-LoRA / TCD-LoRA).  ``load_adapter(target, source, name)``
loads an adapter onto ``target`` (an ``edmrt.Model``, its network, or an ``nn.Module``: edmrt's ``EDMUNet``, a
network from ``edmrt.adapters.diffusers``) and returns the target's ``AdapterSet`` (also ``model.adapters``):

- peft adapters: a folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (what peft's
  ``save_pretrained`` writes; LoRA and DoRA, ``use_dora=True``), read with peft's own ``LoraConfig`` and
  ``set_peft_model_state_dict``.
- diffusers-format LoRA safetensors (``StableDiffusionPipeline.save_lora_weights``, kohya / A1111 files that
  diffusers converts): a .safetensors file, or a folder with ``weight_name``; converted by diffusers' own
  ``lora_state_dict`` and ``UNet2DConditionModel.load_lora_adapter`` (diffusers networks only).
- safetensors only: nothing is unpickled.  A .bin / .pt / .ckpt (or a folder holding only those) is refused.

How: the ``AdapterSet`` keeps a peft-injected shadow of the network's adapted module (a deep copy that shares
every untouched parameter with the live network, so it costs only the adapters plus one copy of the targeted
weights).  The shadow's targeted weights are the base values, never modified; fused weights are computed there
with peft's own layer ``merge`` (W + s BA; DoRA: m (W + s BA) / ||W + s BA|| per output row) and several
adapters are first combined with peft's ``add_weighted_adapter`` (linear, ties, dare_linear, dare_ties,
magnitude_prune, cat, svd variants), so the results are peft's by construction.  ``apply(weights)`` copies the
fused weights into the live parameters in place (``param.copy_``: the tensors, their storage and data_ptr stay,
so engines, a captured CUDA graph or any backend that bound them by address see the new weights); ``restore()``
copies the base values back, bit for bit.  The live network keeps its plain layers: a fused network costs the
same as the base.

``AdapterSet.targets``: the live parameter names adapters touch (the names to export as ONNX inputs so a swap
also reaches a live ONNX Runtime session).

An adapter folder may also hold ``edmrt.json``, edmrt's adapter card (``ADAPTER_CARD``, written by
``edmrt distill --lora``): the base model it was trained on and, for a few-step adapter, the preconditioning and
sampling defaults the adapted model needs (a consistency adapter turns the teacher into a consistency model, as an
LCM-LoRA needs the LCM scheduler).  ``AdapterSet.cards`` holds it; ``edmrt.load(name, adapters=...)`` applies it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["COMBINATIONS", "ADAPTER_CARD", "AdapterSet", "SwapLock", "adapters_of", "reading_weights", "import_peft",
           "load_adapter", "read_adapter_card", "MAX_RANK"]

ADAPTER_CARD = "edmrt.json"
_CARD_BYTES_MAX = 1 << 20

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd", "ties_svd",
                "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MIX = "_edmrt_mix"


def import_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA / DoRA adapters need peft: pip install 'edmrt[adapters]' (or pip install peft)") \
            from None
    return peft


def _root(network: nn.Module) -> tuple[nn.Module, str]:
    """(the module adapters are written for, the prefix of its parameter names in ``network``): a diffusers
    network's UNet / transformer (``edmrt.adapters.diffusers`` wrappers), else the network itself."""
    for attr in ("unet", "transformer"):
        sub = getattr(network, attr, None)
        if isinstance(sub, nn.Module) and hasattr(sub, "config"):
            return sub, attr + "."
    return network, ""


def _network(target) -> nn.Module:
    from ..model import Model

    net = target.network if isinstance(target, Model) else target
    if not isinstance(net, nn.Module):
        raise ValueError(f"adapters load onto an edmrt Model whose network is a torch module, or onto a torch "
                         f"module, got {type(net).__name__}")
    return net


def adapters_of(target) -> AdapterSet | None:
    """The AdapterSet loaded onto ``target`` (a Model or its network), or None."""
    found = getattr(target, "adapters", None)
    if isinstance(found, AdapterSet):
        return found
    net = getattr(target, "network", target)
    found = getattr(net, "_edmrt_adapters", None)
    return found if isinstance(found, AdapterSet) else None


def reading_weights(target):
    """A context for one run on ``target``'s live weights (a Model or its network): an adapter swap waits until it
    ends (``SwapLock.reading``); a null context when no adapters are loaded."""
    adapters = adapters_of(target)
    return contextlib.nullcontext() if adapters is None else adapters.swap.reading()


def _check_name(name) -> str:
    if not isinstance(name, str) or not name or not name.replace("_", "a").replace("-", "a").isalnum() \
            or name == _MIX:
        raise ValueError(f"an adapter name must be a non-empty string of letters, digits, '_' and '-', got {name!r}")
    return name


class SwapLock:
    """The weights of one network: requests read them (shared), a swap writes them (exclusive).  A swap waits until
    every running request has finished, whichever Sampler or engine runs it (an engine just evicted from a Sampler's
    LRU, a second Sampler on the same Model), and holds new requests back until it is done, so a result is the base's
    or the adapter's, never a mix.  A waiting swap goes before requests that arrive after it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting = 0

    @contextlib.contextmanager
    def reading(self):
        with self._cond:
            while self._writing or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._cond:
            self._waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class AdapterSet:
    """The adapters loaded onto one network and the base values of every parameter they touch (module docstring).

    ``names``: loaded adapters, in load order.  ``targets``: live parameter names adapters touch.  ``active``: the
    weights last applied ({} when the base is in place)."""

    def __init__(self, network: nn.Module):
        if not isinstance(network, nn.Module):
            raise ValueError(f"network must be a torch module, got {type(network).__name__}")
        self.network = network
        self.root, self.prefix = _root(network)
        self._live = dict(network.named_parameters())
        self._peft_model = None          # peft.PeftModel over the shadow of self.root
        self._base: dict[str, nn.Parameter] = {}   # live name -> the shadow's parameter (the base values)
        self._layers: dict[str, nn.Module] = {}    # live name -> the shadow's LoRA layer owning it
        self.names: list[str] = []
        self.configs: dict = {}
        self.cards: dict = {}            # name -> the adapter folder's edmrt card (dict) or None
        self.sources: dict = {}          # name -> the resolved path it was loaded from (None: a state dict)
        self.active: dict = {}
        self.lock = threading.RLock()
        self.swap = SwapLock()           # requests read the live weights under it, a swap writes them

    # ------------------------------------------------------------------ loading
    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self._base)

    def _shadow(self) -> nn.Module:
        """A deep copy of the adapted module sharing every parameter and buffer with the live one."""
        memo = {id(t): t for t in self.root.parameters()}
        memo.update({id(t): t for t in self.root.buffers()})
        return copy.deepcopy(self.root, memo)

    def add(self, name: str, config, state_dict: Mapping, card: dict | None = None, source: str | None = None,
            where: str | None = None) -> AdapterSet:
        """Add adapter ``name``: a peft ``LoraConfig`` and its peft-format state dict (keys as peft's
        ``get_peft_model_state_dict`` / ``save_pretrained`` write them); ``card``: its edmrt card, if any;
        ``source``: where it was read from (kept in ``sources``); ``where``: what errors name (the weights file)."""
        where = where or source or name
        peft = import_peft()
        from peft.tuners.lora import LoraLayer

        _check_name(name)
        with self.lock:
            if name in self.names:
                raise ValueError(f"adapter {name!r} is already loaded (loaded: {self.names})")
            if not isinstance(config, peft.LoraConfig):
                raise ValueError(f"{name}: only LoRA / DoRA adapters (peft LoraConfig) are supported, got "
                                 f"{type(config).__name__}")
            # Before peft allocates anything: every tensor a LoRA / DoRA weight with the config's rank and the layer's
            # dims.
            _check_lora_tensors(dict(state_dict), config, self.root, where)
            config = copy.deepcopy(config)
            # Weights come from the file; keep an init that never touches the base weights (PiSSA / OLoRA would).
            # (The init draws from torch's RNG as peft's does, so a seeded DARE merge reproduces peft's masks.)
            if config.init_lora_weights not in (True, False, "gaussian"):
                config.init_lora_weights = True
            config.inference_mode = True
            if getattr(config, "modules_to_save", None):
                raise ValueError(f"{name}: adapters with modules_to_save (whole replaced modules) are not supported")
            if self._peft_model is None:
                self._peft_model = peft.PeftModel(self._shadow(), config, adapter_name=name)
            else:
                self._peft_model.add_adapter(name, config)
            try:
                state_dict = dict(state_dict)
                if not any(k.startswith("base_model.model.") for k in state_dict):  # keys relative to the module
                    state_dict = {f"base_model.model.{k}": v for k, v in state_dict.items()}
                try:
                    result = peft.set_peft_model_state_dict(self._peft_model, state_dict, adapter_name=name)
                except RuntimeError as exc:   # torch's size mismatch: said with the adapter's name and source
                    raise ValueError(f"{where}: the adapter's weights do not fit this network: "
                                     f"{str(exc).strip()[:400]}") from None
                unexpected = [k for k in result.unexpected_keys if "lora" in k]
                missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
                if unexpected or missing:
                    raise ValueError(f"{name}: the adapter's weights do not fit this network (unexpected "
                                     f"{unexpected[:3]}, missing {missing[:3]})")
                added = self._separate(name, LoraLayer, bool(getattr(config, "lora_bias", False)))
                if not added and not any(name in layer.lora_A or name in layer.lora_embedding_A
                                         for layer in self._layers.values()):
                    raise ValueError(f"{name}: the adapter targets no layer of this network")
            except Exception:
                self._peft_model.delete_adapter(name) if len(self._peft_model.peft_config) > 1 else None
                if not self.names:
                    self._peft_model = None
                raise
            self.names.append(name)
            self.configs[name] = config
            self.cards[name] = card
            self.sources[name] = source
        return self

    def _separate(self, name: str, lora_layer, bias: bool) -> list[str]:
        """Give the shadow its own copy (the base values) of every live parameter the adapter targets."""
        live_ids = {id(p) for p in self._live.values()}
        added = []
        for path, module in self._peft_model.base_model.model.named_modules():
            if not isinstance(module, lora_layer) or name not in getattr(module, "lora_A", {}) and \
                    name not in getattr(module, "lora_embedding_A", {}):
                continue
            base = module.get_base_layer()
            for pname in ("weight", "bias") if bias else ("weight",):
                p = getattr(base, pname, None)
                if not isinstance(p, nn.Parameter):
                    continue
                live = f"{self.prefix}{path}.{pname}"
                if live not in self._live or (id(p) in live_ids and self._live[live] is not p):
                    raise ValueError(f"{name}: cannot map the adapted parameter {path}.{pname} onto the network")
                if id(p) in live_ids:  # first adapter on this layer: the live value is the base value
                    own = nn.Parameter(p.detach().clone(), requires_grad=False)
                    setattr(base, pname, own)
                    self._base[live] = own
                    added.append(live)
                self._layers[live] = module
        return added

    # ------------------------------------------------------------------ fusing
    def check_weights(self, weights) -> dict:
        """{name: float} from ``weights`` (a dict, or None / {} for the base); ValueError naming an unknown
        adapter or a weight that is not a finite real number."""
        if weights is None:
            return {}
        if not isinstance(weights, Mapping):
            raise ValueError(f"adapter weights must be a dict {{name: weight}}, got {type(weights).__name__}")
        out = {}
        for k, w in weights.items():
            if k not in self.names:
                raise ValueError(f"unknown adapter {k!r}; loaded: {self.names}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) and not (
                    isinstance(w, torch.Tensor) and w.numel() == 1):
                raise ValueError(f"adapter {k!r}: the weight must be a real number, got {w!r}")
            w = float(w)
            if not math.isfinite(w):
                raise ValueError(f"adapter {k!r}: the weight must be finite, got {w!r}")
            out[k] = w
        return out

    @staticmethod
    def check_combination(combination) -> str:
        if combination not in COMBINATIONS:
            raise ValueError(f"unknown combination {combination!r}; expected one of {list(COMBINATIONS)}")
        return combination

    def _merged(self, adapter: str, scale: float = 1.0) -> dict:
        """{live name: fused tensor} for one adapter of the shadow, by peft's own layer merge with its scaling
        times ``scale``; the shadow's base values are restored bit for bit after each layer."""
        out = {}
        for layer in dict.fromkeys(self._layers.values()):
            if adapter not in layer.lora_A and adapter not in layer.lora_embedding_A:
                continue
            base = layer.get_base_layer()
            names = [n for n, m in self._layers.items() if m is layer]
            params = {n: getattr(base, n.rsplit(".", 1)[1]) for n in names}
            keep = {n: p.detach().clone() for n, p in params.items()}
            scaling = layer.scaling[adapter]
            try:
                layer.scaling[adapter] = scaling * scale
                layer.merge(safe_merge=False, adapter_names=[adapter])
                for n in names:
                    out[n] = getattr(base, n.rsplit(".", 1)[1]).detach().clone()
            finally:
                layer.scaling[adapter] = scaling
                for n in names:
                    getattr(base, n.rsplit(".", 1)[1]).data.copy_(keep[n])
                while adapter in layer.merged_adapters:
                    layer.merged_adapters.remove(adapter)
                for key in [k for k in getattr(layer, "_caches", {}) if k.startswith(f"{adapter}-")]:
                    layer._caches.pop(key)
        return out

    def fused_weights(self, weights, combination: str = "linear", seed: int | None = None, **merge_kw) -> dict:
        """{live parameter name: fused tensor} for every target, for ``weights`` {adapter: weight}.

        {} or None: the base values.  One adapter: peft's merge with its scaling times the weight (LoRA: W + w s BA;
        DoRA with the scaled delta inside the norm), whatever ``combination``.  Several: peft's
        ``add_weighted_adapter(names, weights, combination_type=combination, **merge_kw)`` (``density``,
        ``majority_sign_method``, ``svd_rank``, ...), then that adapter's merge.  DARE draws its masks from torch's
        global RNG: ``seed`` (int) runs it under ``torch.manual_seed(seed)`` in a forked RNG state."""
        weights = self.check_weights(weights)
        self.check_combination(combination)
        with self.lock, torch.no_grad():
            fused = {n: p.detach().clone() for n, p in self._base.items()}
            if not weights:
                return fused
            if len(weights) == 1:
                (name, w), = weights.items()
                fused.update(self._merged(name, w))
                return fused
            pm = self._peft_model
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(int(seed))
                try:
                    pm.add_weighted_adapter(list(weights), list(weights.values()), _MIX,
                                            combination_type=combination, **merge_kw)
                except TypeError as exc:
                    raise ValueError(f"combination {combination!r}: {exc}") from None
            try:
                fused.update(self._merged(_MIX))
            finally:
                if _MIX in pm.peft_config:
                    pm.delete_adapter(_MIX)
                    pm.set_adapter(self.names[0])
            return fused

    def apply(self, weights, combination: str = "linear", **kw) -> None:
        """Fuse ``weights`` into the live parameters in place (``copy_``: same tensors, same data_ptr), once no request
        reads them (``swap``)."""
        fused, active = self.fused_weights(weights, combination, **kw), self.check_weights(weights)
        with self.swap.writing():
            self.write(fused, active)

    def write(self, fused: Mapping, active: dict) -> None:
        """Copy ``fused`` ({live parameter name: tensor}, from ``fused_weights``) into the live parameters in place
        and record ``active`` (the weights they came from).  The caller holds ``swap.writing()``."""
        unknown = [n for n in fused if n not in self._base]
        if unknown:
            raise ValueError(f"not adapter targets of this network: {unknown[:3]}")
        with self.lock, torch.no_grad():
            for n, t in fused.items():
                self._live[n].copy_(t)
            self.active = dict(active)

    def few_step_card(self, weights) -> tuple[str, dict] | None:
        """(name, card) of the one adapter with a non-zero weight in ``weights`` whose edmrt card sets a
        preconditioning (a few-step adapter), or None; ValueError if two such adapters are mixed."""
        found = [(n, self.cards[n]) for n, w in self.check_weights(weights).items()
                 if w != 0 and isinstance(self.cards.get(n), dict) and "precond" in self.cards[n]]
        if len(found) > 1:
            raise ValueError(f"adapters {[n for n, _ in found]} each set the model's preconditioning (few-step "
                             "adapters): mix at most one of them with other adapters")
        return found[0] if found else None

    def restore(self) -> None:
        """The base values back into the live parameters, bit for bit (in place), once no request reads them."""
        with self.swap.writing(), self.lock, torch.no_grad():
            for n, p in self._base.items():
                self._live[n].copy_(p)
            self.active = {}

    def __deepcopy__(self, memo):
        # A copied network gets plain weights and no adapters: this set is bound to the original's parameters.
        return None

    def __reduce__(self):
        return _detached, ()

    def __repr__(self) -> str:
        return f"AdapterSet(names={self.names}, targets={len(self._base)}, active={self.active})"


def _check_given_tensors(state: Mapping) -> None:
    """A state dict given in memory: tensors only, real floating point, finite; ValueError naming the key."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dtype not in _FLOAT_DTYPES:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"adapter state dict: {key!r} is {got}; adapter weights are real floating-point tensors")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"adapter state dict: {key!r} holds NaN or Inf")


def _detached():
    """What a pickled or copied network holds in place of its AdapterSet: nothing."""
    return


# ----------------------------------------------------------------------------- sources

def _refuse_pickled(path: Path) -> None:
    raise ValueError(f"{str(path)!r} is a pickled PyTorch file: edmrt reads adapters from safetensors only "
                     "(nothing is unpickled); save it with safe_serialization=True where you trust the file")


# The largest LoRA / DoRA rank a config may ask for: far above published adapters (<= 256), and a bound that keeps
# an absurd r or rank_pattern from allocating before the file's own tensors are compared with it.
MAX_RANK = 4096
_LORA_KEYS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _read_adapter_weights(path: Path) -> dict:
    """The tensors of an adapter's safetensors file: the header checked first (``weights_header``: truncation, lying
    shapes or offsets, a pickle under the name), then every tensor real floating point and finite; ValueError
    naming the file and the key."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from ..models.bundled import weights_header

    for key, (dtype, _) in weights_header(path).items():
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{str(path)!r}: tensor {key!r} is {dtype}; adapter weights are real floating point "
                             "(float16, bfloat16, float32 or float64)")
    try:
        with open(path, "rb") as f:
            state = load(f.read())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as safetensors (corrupt or not safetensors): {exc}") from None
    bad = next((k for k, v in state.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"{str(path)!r}: tensor {bad!r} holds NaN or Inf")
    return state


# adapter_config.json fields edmrt reads (through peft), with the types peft needs: {field: (check, expected)}.
def _is_int(lo, hi):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_num(lo, hi):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _is_names(v):
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


_CONFIG_FIELDS = {
    "r": (_is_int(1, MAX_RANK), f"an int in [1, {MAX_RANK}]"),
    "lora_alpha": (_is_num(1e-6, 1e6), "a number in (0, 1e6]"),
    "lora_dropout": (_is_num(0.0, 0.999), "a number in [0, 1)"),
    "target_modules": (_is_names, "module names (a list of strings or one regex string)"),
    "exclude_modules": (_is_names, "module names (a list of strings or one regex string)"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_int(1, MAX_RANK)(r)
                                                          for k, r in v.items()),
                     f"a dict {{module name: rank in [1, {MAX_RANK}]}}"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_num(1e-6, 1e6)(a)
                                                           for k, a in v.items()), "a dict {module name: alpha}"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "modules_to_save": (lambda v: v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
                        "null or a list of module names"),
    "layers_to_transform": (lambda v: v is None or _is_int(0, 1 << 20)(v) or (
        isinstance(v, list) and all(_is_int(0, 1 << 20)(i) for i in v)), "null, an int or a list of ints"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a peft init name"),
}


def _check_config_fields(cfg, path: Path) -> None:
    """Each field of adapter_config.json that peft reads has its type (``_CONFIG_FIELDS``); ValueError naming it."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(cfg).__name__}")
    for field, (ok, want) in _CONFIG_FIELDS.items():
        if field in cfg and not (cfg[field] is None and field in ("target_modules", "exclude_modules")) \
                and not ok(cfg[field]):
            raise ValueError(f"{str(path)!r}: {field} must be {want}, got {cfg[field]!r:.100}")


def _rank_of(config, module_path: str) -> int:
    """The rank peft gives the adapter on ``module_path``: its rank_pattern entry, else r (peft's own matching)."""
    from peft.utils.other import get_pattern_key

    pattern = getattr(config, "rank_pattern", None) or {}
    key = get_pattern_key(pattern.keys(), module_path) if pattern else None
    return int(pattern[key]) if key in pattern else int(config.r)


def _check_lora_tensors(state: dict, config, root: nn.Module, where: str) -> None:
    """Every tensor of a peft state dict is a LoRA / DoRA weight of a layer of ``root`` with the config's rank and
    the layer's dims (checked before peft allocates anything); ValueError naming ``where``, the key and the shape
    expected."""
    modules = dict(root.named_modules())
    for key, value in state.items():
        path = key.removeprefix("base_model.model.")
        part = next((p for p in _LORA_KEYS if f".{p}" in f".{path}"), None)
        if part is None:
            raise ValueError(f"{where}: {key!r} is not a LoRA / DoRA weight (expected keys holding "
                             f"{' / '.join(_LORA_KEYS)}); an adapter file must not replace base weights")
        module_path = path.split(f".{part}", 1)[0]
        base = modules.get(module_path)
        weight = getattr(getattr(base, "base_layer", base), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{where}: {key!r} names the layer {module_path!r}, which is not a weighted layer of "
                             f"this {type(root).__name__}")
        rank = _rank_of(config, module_path)
        out_dim, in_dim = weight.shape[0], weight.shape[1] if weight.ndim > 1 else 1
        if isinstance(base, nn.Conv2d):
            in_dim = weight.shape[1] * base.groups
        expect = {"lora_A": (rank, in_dim), "lora_B": (out_dim, rank)}.get(part)
        if part == "lora_embedding_A":
            expect = (rank, weight.shape[0])
        elif part == "lora_embedding_B":
            expect = (weight.shape[1], rank)
        if expect is not None and tuple(value.shape[:2]) != expect:
            raise ValueError(f"{where}: {key!r} has shape {list(value.shape)}; the config (rank {rank}) and the layer "
                             f"{module_path!r} ({list(weight.shape)}) need {list(expect)} in its first two dims")


def _peft_folder(folder: Path, weight_name: str | None):
    """(LoraConfig, state dict) of a peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
    peft = import_peft()
    weights = folder / (weight_name or "adapter_model.safetensors")
    if weights.suffix in _PICKLED:
        _refuse_pickled(weights)
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLED)
        if pickled:
            raise ValueError(f"{str(folder)!r} holds only pickled adapter weights ({', '.join(pickled)}): edmrt "
                             "reads safetensors only (nothing is unpickled); save with safe_serialization=True")
        raise ValueError(f"{str(folder)!r} has no {weights.name}")
    cfg_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(folder)!r}: adapter_config.json is not readable JSON ({exc})") from None
    _check_config_fields(cfg, cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{str(folder)!r}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only, "
                         "with use_dora for DoRA)")
    try:
        config = peft.LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise ValueError(f"{str(cfg_path)!r} is not a LoRA config peft reads: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from None
    return config, _read_adapter_weights(weights), read_adapter_card(folder)


def read_adapter_card(folder: Path) -> dict | None:
    """The edmrt card (``ADAPTER_CARD``) of an adapter folder, or None if it has none; ValueError if it is not a
    regular file holding a JSON object with a supported format."""
    path = Path(folder) / ADAPTER_CARD
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file() or path.stat().st_size > _CARD_BYTES_MAX:
        raise ValueError(f"{str(path)!r}: an adapter card must be a regular file under {_CARD_BYTES_MAX} bytes")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not readable JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != "edmrt-adapter-card-1":
        raise ValueError(f"{str(path)!r}: expected an object with format 'edmrt-adapter-card-1'")
    return card


def _diffusers_lora(root: nn.Module, source, name: str, weight_name: str | None):
    """(LoraConfig, peft state dict) of a diffusers-format LoRA, by diffusers' own conversion
    (``lora_state_dict`` then ``load_lora_adapter`` on a parameter-sharing copy of the UNet)."""
    peft = import_peft()
    if not hasattr(root, "load_lora_adapter"):
        raise ValueError(f"diffusers-format LoRA files load onto diffusers networks only (this one is "
                         f"{type(root).__name__}); give a peft adapter folder instead")
    import diffusers

    sdxl = getattr(root, "config", {}).get("addition_embed_type") == "text_time"
    loader = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    if isinstance(source, Mapping):
        state = dict(source)
        alphas, meta = None, None
    else:
        out = loader.lora_state_dict(str(source), weight_name=weight_name, use_safetensors=True,
                                     local_files_only=True, return_lora_metadata=True)
        state, alphas, meta = out if len(out) == 3 else (*out, None)
    prefix = "unet" if any(k.startswith("unet.") for k in state) else None
    memo = {id(t): t for t in root.parameters()}
    memo.update({id(t): t for t in root.buffers()})
    scratch = copy.deepcopy(root, memo)
    kw = {"network_alphas": alphas} if alphas else {}
    if meta:
        kw = {"metadata": meta}
    scratch.load_lora_adapter(state, prefix=prefix, adapter_name=name, **kw)
    if name not in getattr(scratch, "peft_config", {}):
        raise ValueError(f"{name}: the LoRA file holds no weights for this network (keys such as "
                         f"{list(state)[:3]})")
    config = scratch.peft_config[name]
    sd = peft.get_peft_model_state_dict(scratch, adapter_name=name)
    return config, sd


def load_adapter(target, source, name: str, weight_name: str | None = None) -> AdapterSet:
    """Load the LoRA / DoRA adapter ``source`` onto ``target`` as ``name``; returns the target's AdapterSet (made
    on the first call, then ``model.adapters`` when target is a Model).  The live weights are not changed: fuse with
    ``AdapterSet.apply`` or ``Sampler.set_adapters``.

    ``source``: a peft adapter folder (adapter_config.json + adapter_model.safetensors), a diffusers-format LoRA
    .safetensors file or folder (``weight_name`` picks the file; default pytorch_lora_weights.safetensors), or a
    diffusers-format state dict.  ValueError: a pickled file, a missing file, a duplicate name, weights that do not
    fit the network."""
    net = _network(target)
    adapters = adapters_of(target) or adapters_of(net)
    if adapters is None:
        adapters = AdapterSet(net)
    _check_name(name)
    if name in adapters.names:
        raise ValueError(f"adapter {name!r} is already loaded (loaded: {adapters.names})")
    card, where, file = None, None, None
    if isinstance(source, Mapping):
        _check_given_tensors(source)
        config, sd = _diffusers_lora(adapters.root, source, name, None)
    else:
        path = Path(source)
        where = str(path.resolve())
        if path.suffix in _PICKLED or (weight_name or "").endswith(_PICKLED):
            _refuse_pickled(path if path.suffix in _PICKLED else path / weight_name)
        if not path.exists():
            raise ValueError(f"{str(path)!r} does not exist")
        if path.is_dir() and (path / "adapter_config.json").is_file():
            config, sd, card = _peft_folder(path, weight_name)
            file = str(path / (weight_name or "adapter_model.safetensors"))
        else:
            if path.is_dir():
                files = sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors")
                if weight_name is None:
                    if not files:
                        pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLED)
                        raise ValueError(f"{str(path)!r} holds no adapter_config.json and no .safetensors"
                                         + (f" (only pickled {', '.join(pickled)}: edmrt reads safetensors only, "
                                            "nothing is unpickled)" if pickled else ""))
                    weight_name = ("pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in files
                                   else files[0] if len(files) == 1 else None)
                    if weight_name is None:
                        raise ValueError(f"{str(path)!r} holds several .safetensors {files}: pass weight_name")
                src = path
            elif path.suffix == ".safetensors":
                src, weight_name = path.parent, path.name
            else:
                raise ValueError(f"{str(path)!r}: expected a peft adapter folder or a .safetensors LoRA file")
            _read_adapter_weights(src / weight_name)   # the file checked before diffusers parses it
            config, sd = _diffusers_lora(adapters.root, src, name, weight_name)
    adapters.add(name, config, sd, card, source=where, where=file)
    from ..model import Model

    if isinstance(target, Model):
        target.adapters = adapters
    object.__setattr__(net, "_edmrt_adapters", adapters)
    return adapters
