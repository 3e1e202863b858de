"""ONNX Runtime as the backend: an edmrt ONNX file checked against its declared signature, run with I/O binding.

The declared signature of every edmrt ONNX file (``check_onnx_signature``; ``edmrt.export.onnx`` writes it):

==============  =============================  =========================================================
name            shape                          dtype
==============  =============================  =========================================================
x_in            (B, C, H, W)                   float32 (float16 accepted from foreign files)
c_noise         (B,)                           float32 (float16 accepted from foreign files)
<cond name>     (B, *shape), one per           the input's declared dtype: int64 for class labels (in
                conditioning input, in the     [0, num_classes]; num_classes is the null label), float32
                model's declared order         or float16 for embeddings (``encoder_hidden_states``, ...)
F               (B, C, H, W)  (output)         x_in's dtype
==============  =============================  =========================================================

Every input has the batch B as its first axis (symbolic in edmrt exports); a conditioning input's per-sample
dims are fixed.  Inputs after c_noise are conditioning inputs (``edmrt.CondInput``), bound by name; the class
labels are the one named ``class_labels`` (int64, rank 1).  Except weight inputs: the inputs the file's
``edmrt.weight_inputs`` metadata names (JSON {input name: parameter name}; ``export_onnx(weight_inputs=...)``) are
network parameters exported as inputs (fixed shape, no batch axis, float32), which ``OnnxRuntimeBackend(weights=)``
binds to the live parameter tensors by address, so an in-place update of them (an adapter swap) needs no new session.

The declared metadata (``edmrt.KEY`` entries; ``edmrt.export.onnx`` writes them): ``num_classes``, ``cond`` (the
conditioning inputs, a JSON list of ``CondInput.to_dict()``: name, shape, dtype, null, num_classes),
``sample_shape`` (``C,H,W``), ``dtype`` (fp32 / fp16), ``weights_sha256`` (``weights_sha256`` of the exported
network: which weights the file holds) and, for a named model, ``model``.

Threads: ONNX Runtime runs one session from several threads at once, each with its own I/O binding (a binding is
not thread-safe; ``Session::Run`` is).  ``OnnxRuntimeBackend`` hands every call a binding no other call holds.

``onnx`` and ``onnxruntime`` are imported where used, never by ``import edmrt``.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import as_cond, check_backend_args

__all__ = ["OnnxRuntimeBackend", "load_onnx_session", "check_onnx_file", "check_onnx_signature", "onnx_cond_inputs", "onnx_weight_inputs",
           "default_providers",
           "weights_sha256", "INPUT_NAMES", "OUTPUT_NAME", "ORT_TYPES", "MAX_BINDINGS"]

INPUT_NAMES = ("x_in", "c_noise")   # the leading inputs; conditioning inputs follow, by name
OUTPUT_NAME = "F"
# ONNX Runtime's type strings and the torch dtypes they bind to.
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}
_ORT_NAMES = {v: k for k, v in ORT_TYPES.items()}
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)")
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
# Idle I/O bindings an OnnxRuntimeBackend keeps (one per engine's set of buffers; the least recently used is
# dropped first): a Sampler has one engine per (batch size, guidance), far fewer than this.
MAX_BINDINGS = 64


def weights_sha256(net: torch.nn.Module) -> str:
    """sha256 of a network's state (every tensor's name, dtype, shape and bytes, by name): which weights it holds.

    The ONNX cache keys files by it and every export stores it as ``edmrt.weights_sha256``."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype (bfloat16 too)
    return h.hexdigest()


class OnnxRuntimeBackend:
    """An edmrt ONNX file (or a checked ``InferenceSession``) run with ONNX Runtime's I/O binding.

    ``backend(x_in, c_noise, cond, out)``: ``cond`` maps each conditioning input of the file (``cond_inputs``, read
    from its inputs and its ``edmrt.cond`` metadata) to a (B, *shape) tensor of the input's dtype; None (or {}) for a
    file without any, a bare tensor for class labels alone.
    Inputs and ``out`` are bound by ``data_ptr``: ORT reads the caller's tensors and writes F straight into
    ``out``, with no copy and no allocation per call.  A binding is made (and the buffers checked) once per set
    of buffers (addresses, shapes, dtypes, devices of x_in, c_noise, every cond tensor and out), so an engine loop on
    static buffers binds once.  Bindings are taken from a pool and returned after the run: no two calls in flight
    share one, so the engines of a ``Sampler`` (one per batch size and guidance) run from several threads at once;
    up to ``MAX_BINDINGS`` idle bindings are kept, the least recently used dropped first.
    CPU tensors with the CPU provider; CUDA tensors need the CUDA provider (the session then runs on torch's
    current stream, so no host sync is needed between the fused step and the network).

    ``cond_inputs`` (optional): the conditioning inputs the caller's model declares (``Model.cond``); the file's
    must be the same (names, shapes, dtypes), else ValueError.

    ``weights``: for a file with weight inputs (``weight_inputs``: {ONNX input name: parameter name}, from its
    ``edmrt.weight_inputs`` metadata), {parameter name: tensor} for every one of them, no other: the live parameter
    tensors (e.g. ``dict(net.named_parameters())`` restricted to those names), each of the input's shape and dtype
    (float32), contiguous, all on one device (the device x_in will be on), else ValueError naming the parameter.  They
    are bound by ``data_ptr`` in every binding (their addresses are part of its key), so ``p.data.copy_(new)`` changes
    the next run's output with the same session and the same binding; replacing a parameter's storage
    (``p.data = t``) makes the next call bind anew.  The tensors must outlive the backend and must not be written while
    a call runs.
    """

    name = "onnxruntime"

    def __init__(self, path_or_session, providers=None, cond_inputs=None, weights: dict | None = None):
        import onnxruntime as ort

        if isinstance(path_or_session, ort.InferenceSession):
            self.session = path_or_session
            if providers is not None:
                raise ValueError("providers are fixed by the given InferenceSession; pass a path to choose them")
        else:
            if providers is None and torch.cuda.is_available():
                stream = str(torch.cuda.current_stream().cuda_stream)
                providers = [("CUDAExecutionProvider", {"has_user_compute_stream": "1", "user_compute_stream": stream})
                             if p == "CUDAExecutionProvider" else p for p in default_providers()]
            self.session = load_onnx_session(path_or_session, providers=providers, cond_inputs=cond_inputs)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.cond_inputs = check_onnx_signature(self.session.get_inputs(), self.session.get_outputs(),
                                                cond_inputs=cond_inputs, meta=meta)
        self.cond_names = tuple(c.name for c in self.cond_inputs)
        self.conditional = "class_labels" in self.cond_names   # class labels (``edmrt sample --onnx`` checks it)
        ins = {i.name: i for i in self.session.get_inputs()}
        self.weight_inputs = onnx_weight_inputs(meta)   # ONNX input name -> parameter name
        self._weights = _check_weights(weights, self.weight_inputs, ins)   # ((input name, tensor, shape), ...)
        self._wtypes = {name: ins[name].type for name in self.weight_inputs}
        out = self.session.get_outputs()[0]
        self.in_dtype = ORT_TYPES[ins["x_in"].type]
        self.out_dtype = ORT_TYPES[out.type]
        shape = ins["x_in"].shape
        self.sample_shape = tuple(d if isinstance(d, int) else None for d in shape[1:])
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.providers = self.session.get_providers()
        self._idle: OrderedDict[tuple, list] = OrderedDict()   # buffers' key -> idle bindings, oldest use first
        self._idle_count = 0
        self._lock = threading.Lock()

    @property
    def cached_bindings(self) -> int:
        """How many idle I/O bindings are kept (at most ``MAX_BINDINGS``)."""
        return self._idle_count

    def _bind(self, x_in, c_noise, cond, out):
        """A new I/O binding of these buffers, after checking them against the protocol and the session."""
        check_backend_args(x_in, c_noise, cond, out, self.cond_inputs, self.in_dtype, self.out_dtype,
                           self.sample_shape, self.batch)
        cond = as_cond(cond)
        dev = x_in.device
        if dev.type == "cuda":
            if "CUDAExecutionProvider" not in self.providers:
                raise ValueError(f"CUDA tensors need the CUDAExecutionProvider; this session runs on {self.providers}")
            device_type, device_id = "cuda", dev.index or 0
        elif dev.type == "cpu":
            device_type, device_id = "cpu", 0
        else:
            raise ValueError(f"ONNX Runtime binds CPU or CUDA tensors, got device {dev}")
        B = x_in.shape[0]
        b = self.session.io_binding()

        def bind_input(name, t, shape):
            b.bind_input(name, device_type, device_id, _NP[t.dtype], list(shape), t.data_ptr())

        bind_input("x_in", x_in, x_in.shape)
        bind_input("c_noise", c_noise, (B,))
        for c in self.cond_inputs:   # dtype and shape checked against the session's above
            bind_input(c.name, cond[c.name], (B,) + c.shape)
        for name, t, shape in self._weights:
            param = self.weight_inputs[name]
            if t.device != dev:
                raise ValueError(f"weight {param!r} is on {t.device}, but x_in is on {dev}: bind the weights on the "
                                 f"device the network runs on")
            if tuple(t.shape) != shape or _ORT_NAMES.get(t.dtype) != self._wtypes[name] or not t.is_contiguous():
                raise ValueError(f"weight {param!r} is now {t.dtype} of shape {list(t.shape)}"
                                 f"{'' if t.is_contiguous() else ', not contiguous'}; the file's input {name!r} takes "
                                 f"{self._wtypes[name]} of shape {list(shape)}, contiguous (was its storage replaced?)")
            bind_input(name, t, shape)
        b.bind_output(OUTPUT_NAME, device_type, device_id, _NP[out.dtype], list(out.shape), out.data_ptr())
        return b

    def _checkout(self, key):
        """An idle binding of the buffers ``key`` names, now held by this call only; None when there is none."""
        with self._lock:
            idle = self._idle.get(key)
            if not idle:
                return None
            binding = idle.pop()
            self._idle_count -= 1
            if not idle:
                del self._idle[key]
            return binding

    def _checkin(self, key, binding) -> None:
        """Return a binding to the pool as the most recently used; drop the least recently used beyond the bound."""
        with self._lock:
            self._idle.setdefault(key, []).append(binding)
            self._idle.move_to_end(key)
            self._idle_count += 1
            while self._idle_count > MAX_BINDINGS:
                oldest, idle = next(iter(self._idle.items()))
                idle.pop(0)
                self._idle_count -= 1
                if not idle:
                    del self._idle[oldest]

    def _key(self, x_in, c_noise, cond, out):
        """What a binding depends on: every buffer's address, shape, dtype, device and layout (cond by name), and
        the weight tensors' (their addresses are read on every call: replacing a parameter's storage rebinds)."""
        def k(t):
            return t.data_ptr(), t.shape, t.dtype, t.device, t.is_contiguous()

        return (k(x_in), k(c_noise), k(out),
                tuple(sorted(((str(n), k(t)) for n, t in as_cond(cond).items()), key=lambda e: e[0])),
                tuple(k(t) for _, t, _ in self._weights))

    def update_weights(self, fused: dict) -> None:
        """``Sampler.set_adapters``' hook: the weight inputs are bound to the live parameters by address, so the
        in-place copy of ``fused`` ({parameter name: tensor}) is what the next run reads; check that every updated
        parameter is one of this file's weight inputs (a parameter baked into the graph would silently not change)."""
        bound = set(self.weight_inputs.values())
        missing = sorted(set(fused) - bound)
        if missing:
            raise ValueError(f"the ONNX file bakes in {missing[:3]}{'...' if len(missing) > 3 else ''}: they are not "
                             "weight inputs, so a swap cannot reach them (rebuild the backend after loading adapters)")

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict | None, out: torch.Tensor) -> None:
        try:
            key = self._key(x_in, c_noise, cond, out)
        except (AttributeError, TypeError):  # not tensors: let the check name the culprit
            key = None
        binding = None if key is None else self._checkout(key)
        if binding is None:
            binding = self._bind(x_in, c_noise, cond, out)
        self.session.run_with_iobinding(binding)  # releases the GIL; concurrent runs on one session are safe
        if key is not None:
            self._checkin(key, binding)


def _check_weights(weights, weight_inputs: dict, ins: dict) -> tuple:
    """((ONNX input name, tensor, shape), ...) for the file's weight inputs, from ``weights`` ({parameter name:
    tensor}); ValueError naming a missing, extra, non-tensor, wrong-shape, wrong-dtype, non-contiguous or
    wrong-device one."""
    if weights is None:
        weights = {}
    if not isinstance(weights, dict):
        raise ValueError(f"weights must be a dict {{parameter name: tensor}}, got {type(weights).__name__}")
    params = {p: name for name, p in weight_inputs.items()}
    missing = [p for p in params if p not in weights]
    if missing:
        raise ValueError(f"the ONNX file takes the weights {list(params)} as inputs; weights lacks "
                         f"{', '.join(map(repr, missing))} (pass the live parameter tensors: weights={{name: tensor}})")
    extra = [p for p in weights if p not in params]
    if extra:
        raise ValueError(f"weights names {', '.join(map(repr, extra))}, which the ONNX file does not take as an "
                         f"input (its weight inputs: {list(params)})")
    out, devices = [], set()
    for p, name in params.items():
        t = weights[p]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"weight {p!r} must be a torch.Tensor, got {type(t).__name__}")
        arg = ins[name]
        shape = tuple(arg.shape)
        if tuple(t.shape) != shape:
            raise ValueError(f"weight {p!r} has shape {list(t.shape)}; the file's input {name!r} takes {list(shape)}")
        if _ORT_NAMES.get(t.dtype) != arg.type:
            raise ValueError(f"weight {p!r} has dtype {t.dtype}; the file's input {name!r} takes {arg.type}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"weight {p!r} is on {t.device}; ONNX Runtime binds CPU or CUDA tensors")
        if not t.is_contiguous():
            raise ValueError(f"weight {p!r} is not contiguous; it is bound by address (pass a contiguous tensor)")
        devices.add(t.device)
        out.append((name, t, shape))
    if len(devices) > 1:
        raise ValueError(f"the weights must all be on one device, got {sorted(map(str, devices))}")
    return tuple(out)


def onnx_weight_inputs(meta: dict | None) -> dict:
    """{ONNX input name: parameter name} of the file's weight inputs (its ``edmrt.weight_inputs`` metadata); {} without
    that entry; ValueError when it is not a JSON object of strings."""
    if not meta or "edmrt.weight_inputs" not in meta:
        return {}
    import json

    try:
        entries = json.loads(meta["edmrt.weight_inputs"])
    except ValueError as exc:
        raise ValueError(f"the ONNX file's edmrt.weight_inputs metadata is not JSON: {str(exc)[:200]}") from None
    if not isinstance(entries, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
        raise ValueError(f"the ONNX file's edmrt.weight_inputs metadata is not a JSON object {{input name: parameter "
                         f"name}}: {meta['edmrt.weight_inputs'][:200]!r}")
    return entries


def _check_weight_args(ins: dict, weights: dict) -> None:
    """Every weight input the metadata names is a graph input after c_noise, floating-point, of fixed shape."""
    for name, param in weights.items():
        if name not in ins or name in INPUT_NAMES:
            raise ValueError(f"the ONNX file's edmrt.weight_inputs metadata names the input {name!r} (parameter "
                             f"{param!r}), which is not a weight input of the graph (inputs: {list(ins)})")
        arg = ins[name]
        if arg.type not in _FLOAT_TYPES:
            raise ValueError(f"ONNX weight input {name!r} must have type {' or '.join(_FLOAT_TYPES)}, got {arg.type}")
        if not all(isinstance(d, int) and d >= 0 for d in arg.shape):
            raise ValueError(f"ONNX weight input {name!r} must have a fixed shape, got {list(arg.shape)}")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _stored_cond(meta: dict | None) -> list | None:
    """The conditioning inputs the file's ``edmrt.cond`` metadata declares, as CondInputs; None without that entry."""
    from ..model import CondInput

    if not meta or "edmrt.cond" not in meta:
        return None
    import json

    try:
        entries = json.loads(meta["edmrt.cond"])
        return [CondInput(e["name"], tuple(e["shape"]), _dtype(e["dtype"]), e.get("null"), int(e.get("num_classes", 0)))
                for e in entries]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"the ONNX file's edmrt.cond metadata is not a list of conditioning inputs: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _same(a: tuple, b: tuple) -> bool:
    """Shapes equal where both are known (a symbolic dim, a str or None, matches any)."""
    return len(a) == len(b) and all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b))


def _check_image_args(ins: dict, outs: dict) -> int | None:
    """x_in, c_noise and F: ranks, types, F shaped like x_in; returns x_in's fixed batch (None when dynamic)."""
    rules = [("x_in", ins["x_in"], 4, _FLOAT_TYPES), ("c_noise", ins["c_noise"], 1, _FLOAT_TYPES),
             ("F", outs[OUTPUT_NAME], 4, _FLOAT_TYPES)]
    for name, arg, rank, types in rules:
        if len(arg.shape) != rank:
            raise ValueError(f"ONNX {name!r} must have rank {rank}, got shape {list(arg.shape)}")
        if arg.type not in types:
            raise ValueError(f"ONNX {name!r} must have type {' or '.join(types)}, got {arg.type}")
    x, f = ins["x_in"], outs[OUTPUT_NAME]
    if f.type != x.type:
        raise ValueError(f"ONNX output 'F' must have x_in's type {x.type}, got {f.type}")
    for k in (1, 2, 3):
        if isinstance(x.shape[k], int) and isinstance(f.shape[k], int) and x.shape[k] != f.shape[k]:
            raise ValueError(f"ONNX output 'F' must have x_in's shape, got {list(f.shape)} for x_in {list(x.shape)}")
    return x.shape[0] if isinstance(x.shape[0], int) else None


def _graph_cond(ins: dict, names: list, batch: int | None) -> dict:
    """{name: (per-sample shape, torch dtype)} of every input after c_noise, checked as conditioning inputs."""
    x = ins["x_in"]
    found = {}
    for name in names[2:]:
        arg = ins[name]
        if name == "F" or not name.isidentifier():
            raise ValueError(f"ONNX conditioning input {name!r} must be named by a Python identifier other than F "
                             f"(the network takes it as a keyword); inputs are named {names}")
        if arg.type not in ORT_TYPES:
            raise ValueError(f"ONNX conditioning input {name!r} must have type {' or '.join(ORT_TYPES)}, got {arg.type}")
        shape = tuple(arg.shape)
        if len(shape) < 1 or (batch is not None and isinstance(shape[0], int) and shape[0] != batch):
            raise ValueError(f"ONNX conditioning input {name!r} must have the batch as its first axis, got shape "
                             f"{list(shape)} (x_in {list(x.shape)})")
        if name == "class_labels" and (arg.type != "tensor(int64)" or len(shape) != 1):
            if len(shape) != 1:
                raise ValueError(f"ONNX 'class_labels' must have rank 1, got shape {list(shape)}")
            raise ValueError(f"ONNX 'class_labels' must have type tensor(int64), got {arg.type}")
        found[name] = (shape[1:], ORT_TYPES[arg.type])
    return found


def check_onnx_signature(inputs, outputs, conditional: bool | None = None, cond_inputs=None, meta: dict | None = None):
    """Check ONNX Runtime's ``get_inputs()`` / ``get_outputs()`` against the declared signature (module docstring) and
    return the file's conditioning inputs (a tuple of ``edmrt.CondInput``, in the file's order; empty when it has
    none).  Raises ValueError naming the first mismatch.

    ``conditional``: True/False also requires/forbids ``class_labels``.  ``cond_inputs``: the conditioning inputs the
    caller's model declares (``Model.cond``): the file must have exactly these (names, per-sample shapes, dtypes), and
    they are returned.  ``meta``: the file's metadata map (``edmrt.cond`` and ``edmrt.num_classes`` give the inputs'
    null rows and class counts, and fill symbolic per-sample dims; the inputs ``edmrt.weight_inputs`` names are
    weight inputs, checked as such (floating-point, fixed shape) and not returned: ``onnx_weight_inputs(meta)``).
    """
    from ..model import CondInput

    ins = {i.name: i for i in inputs}
    outs = {o.name: o for o in outputs}
    names = list(ins)
    if names[:2] != list(INPUT_NAMES):
        raise ValueError(f"ONNX inputs must be named {list(INPUT_NAMES)}, in that order, then the conditioning inputs "
                         f"(e.g. 'class_labels'); got {names}")
    if list(outs) != [OUTPUT_NAME]:
        raise ValueError(f"ONNX outputs must be [{OUTPUT_NAME!r}], got {list(outs)}")
    batch = _check_image_args(ins, outs)
    weights = onnx_weight_inputs(meta)   # inputs that are network parameters, not conditioning inputs
    _check_weight_args(ins, weights)
    found = _graph_cond(ins, [n for n in names if n not in weights], batch)
    has_labels = "class_labels" in found
    if conditional is not None and bool(conditional) != has_labels:
        raise ValueError(f"expected a {'conditional' if conditional else 'unconditional'} model, but the ONNX file "
                         f"{'has' if has_labels else 'lacks'} the input 'class_labels'")

    def agree(c, where):
        shape, dtype = found[c.name]
        if not _same(shape, c.shape) or dtype != c.dtype:
            raise ValueError(f"ONNX conditioning input {c.name!r} is {_ORT_NAMES[dtype]} of per-sample shape "
                             f"{list(shape)}, but {where} declares {c.dtype} of shape {list(c.shape)}")

    if cond_inputs is not None:
        cond_inputs = (cond_inputs,) if isinstance(cond_inputs, CondInput) else tuple(cond_inputs)
        want = [c.name for c in cond_inputs]
        if set(want) != set(found) or len(want) != len(found):
            raise ValueError(f"the ONNX file's conditioning inputs {list(found)} are not the model's {want}")
        for c in cond_inputs:
            agree(c, "the model")
        return cond_inputs
    stored = _stored_cond(meta)
    if stored is not None:
        if [c.name for c in stored] != list(found):
            raise ValueError(f"the ONNX file's edmrt.cond metadata names the inputs {[c.name for c in stored]}, but "
                             f"the graph has {list(found)}")
        for c in stored:
            agree(c, "its edmrt.cond metadata")
        return tuple(stored)
    result = []
    for name, (shape, dtype) in found.items():
        if not all(isinstance(d, int) and d >= 1 for d in shape):
            raise ValueError(f"ONNX conditioning input {name!r} must have fixed per-sample dims, got shape "
                             f"{['B', *shape]} (and no edmrt.cond metadata to fill them)")
        n = 0
        if name == "class_labels" and meta and str(meta.get("edmrt.num_classes", "")).isdigit():
            n = int(meta["edmrt.num_classes"])
        result.append(CondInput(name, shape, dtype, null=n if n else None, num_classes=n))
    return tuple(result)


def onnx_cond_inputs(path) -> tuple:
    """The conditioning inputs of the ONNX file at ``path`` (``check_onnx_signature`` on the graph and its metadata),
    read without loading its weights or building a session."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a valid ONNX model (truncated or corrupt?): "
                         f"{type(exc).__name__}: {str(exc).strip()[:300]}") from None
    graph = model.graph
    return check_onnx_signature(_graph_args(graph.input, {t.name for t in graph.initializer}),
                                _graph_args(graph.output, ()), meta={p.key: p.value for p in model.metadata_props})


@dataclass(frozen=True)
class _Arg:
    """An ONNX graph input/output described like ONNX Runtime's ``NodeArg`` (name, shape, type string)."""

    name: str
    shape: tuple
    type: str


def _graph_args(values, skip) -> list[_Arg]:
    import onnx

    args = []
    for v in values:
        if v.name in skip:  # initializers listed as inputs (IR < 4) are weights, not inputs
            continue
        t = v.type.tensor_type
        elem = onnx.helper.tensor_dtype_to_string(t.elem_type).removeprefix("TensorProto.").lower() if t.elem_type else "?"
        type_str = "tensor(float)" if elem == "float" else f"tensor({elem})"
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
        args.append(_Arg(v.name, shape, type_str))
    return args


def check_onnx_file(path, conditional: bool | None = None, cond_inputs=None) -> tuple[tuple, dict]:
    """(conditioning inputs, metadata map) of the ONNX file at ``path`` after ``onnx.checker`` and the declared
    signature (``check_onnx_signature``); ValueError when it is missing, not a valid ONNX model or off-signature.
    What every runtime that opens an edmrt file (ONNX Runtime, OpenVINO) checks first."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ONNX file {str(path)!r} does not exist")
    try:
        onnx.checker.check_model(str(path))  # parses the file (protobuf), checks the graph; by path: > 2 GB works
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, ValidationError, ...: all mean "not a usable ONNX file"
        raise ValueError(f"{str(path)!r} is not a valid ONNX model (truncated or corrupt?): "
                         f"{type(exc).__name__}: {str(exc).strip()[:300]}") from None
    graph, meta = proto.graph, {p.key: p.value for p in proto.metadata_props}
    cond = check_onnx_signature(_graph_args(graph.input, {t.name for t in graph.initializer}),
                                _graph_args(graph.output, ()), conditional, cond_inputs, meta)
    return cond, meta


def default_providers() -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]


def load_onnx_session(path, providers=None, conditional: bool | None = None, sess_options=None, cond_inputs=None):
    """An ``onnxruntime.InferenceSession`` on ``path`` after checking the file and its signature.

    Raises ValueError when the file is missing, is not a valid ONNX model (truncated, corrupt), the session
    cannot be built, or its inputs/outputs are not the declared ones (names, ranks, types, conditioning inputs; see
    the module docstring).  ``providers``: default CUDA (when this onnxruntime build has it) then CPU;
    ``conditional``: True/False also requires/forbids ``class_labels``; ``cond_inputs``: the conditioning inputs the
    file must have (``Model.cond``: names, per-sample shapes, dtypes).  A file with external data (a network over
    2 GB) is read with its data file beside it.
    """
    import onnxruntime as ort

    path = Path(path)
    # The signature first, from the file itself: a mismatch is named as such, not as a runtime load error.
    _, meta = check_onnx_file(path, conditional, cond_inputs)
    avail = ort.get_available_providers()
    providers = default_providers() if providers is None else list(providers)
    for p in providers:
        name = p[0] if isinstance(p, tuple) else p
        if name not in avail:
            raise ValueError(f"ONNX Runtime provider {name!r} is not available in this build; available: {avail}")
    try:
        session = ort.InferenceSession(str(path), sess_options=sess_options, providers=providers)
    except Exception as exc:
        raise ValueError(f"ONNX Runtime cannot load {str(path)!r}: {type(exc).__name__}: {str(exc).strip()[:300]}") from None
    check_onnx_signature(session.get_inputs(), session.get_outputs(), conditional, cond_inputs, meta)
    return session
