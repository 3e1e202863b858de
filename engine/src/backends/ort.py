"""ONNX Runtime as the backend: an edmrt ONNX file checked against its declared signature (``edmrt.onnx_contract``),
run with I/O binding.

Threads: ONNX Runtime runs one session from several threads at once, each with its own I/O binding (a binding is
not thread-safe; ``Session::Run`` is).  ``OnnxRuntimeBackend`` hands every call a binding no other call holds.

``onnx`` and ``onnxruntime`` are imported where used, never by ``import edmrt``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from ..onnx_contract import (ORT_TYPE_NAMES, ORT_TYPES, OUTPUT_NAME, check_onnx_signature, default_providers,
                             load_onnx_session, onnx_weight_inputs)
from .base import as_cond, check_backend_args

__all__ = ["OnnxRuntimeBackend", "MAX_BINDINGS"]

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
# Idle I/O bindings an OnnxRuntimeBackend keeps (one per engine's set of buffers; the least recently used is
# dropped first): a Sampler has one engine per (batch size, guidance), far fewer than this.
MAX_BINDINGS = 64


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

    shares_weights = False   # the session holds its own copy; weight inputs bound to the parameters: update_weights

    @classmethod
    def from_model(cls, model, device: torch.device, digest=None, path=None, sess_options=None,
                   live_weights: bool = True):
        """The model's network exported once into the ONNX cache (``onnx_cache.py``) and run here.

        ``live_weights``: a model with adapters gets their target weights as graph inputs bound to the live
        parameters (after the export, which may move the network), so ``Sampler.set_adapters``' in-place copy reaches
        the session; False bakes the fused weights in (``edmrt render``).  ``path``: this edmrt ONNX file instead of
        the cache's.  ``sess_options``: ``onnxruntime.SessionOptions`` (threads) for the session.  ``digest``: a
        callable giving the network's ``weights_sha256`` (memoised by the caller) for the cache's lookup."""
        from .onnx_cache import cached_onnx, check_exportable

        if path is not None:
            return cls(load_onnx_session(path, sess_options=sess_options, cond_inputs=model.cond),
                       cond_inputs=model.cond)
        check_exportable(model, "onnxruntime")
        adapters = getattr(model, "adapters", None)
        targets = tuple(adapters.targets) if adapters is not None and live_weights else ()
        path, session = cached_onnx(model, device, weight_inputs=targets, sess_options=sess_options,
                                    weights=digest() if digest is not None else None)
        if session is None and sess_options is not None:
            session = load_onnx_session(path, sess_options=sess_options, cond_inputs=model.cond)
        params = dict(model.network.named_parameters())
        return cls(session if session is not None else path, cond_inputs=model.cond,
                   weights={t: params[t] for t in targets} or None)

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
            if tuple(t.shape) != shape or ORT_TYPE_NAMES.get(t.dtype) != self._wtypes[name] or not t.is_contiguous():
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
        if ORT_TYPE_NAMES.get(t.dtype) != arg.type:
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
