"""ONNX Runtime as the backend: an edmrt ONNX file checked against its declared signature, run with I/O binding.

The declared signature of every edmrt ONNX file (``check_onnx_signature``; ``edmrt.export.onnx`` writes it):

=============  =============================  ==========================================================
name           shape                          dtype
=============  =============================  ==========================================================
x_in           (B, C, H, W)                   float32 (float16 accepted from foreign files)
c_noise        (B,)                           float32 (float16 accepted from foreign files)
class_labels   (B,), only when conditional    int64, in [0, num_classes]; num_classes is the null label
F              (B, C, H, W)  (output)         x_in's dtype
=============  =============================  ==========================================================

The declared metadata (``edmrt.KEY`` entries; ``edmrt.export.onnx`` writes them): ``num_classes``, ``sample_shape``
(``C,H,W``), ``dtype`` (fp32 / fp16), ``weights_sha256`` (``weights_sha256`` of the exported network: which weights
the file holds) and, for a named model, ``model``.

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

from .base import check_backend_args

__all__ = ["OnnxRuntimeBackend", "load_onnx_session", "check_onnx_signature", "default_providers", "weights_sha256",
           "sha256_file", "INPUT_NAMES", "OUTPUT_NAME", "ORT_TYPES", "MAX_BINDINGS"]

INPUT_NAMES = ("x_in", "c_noise", "class_labels")
OUTPUT_NAME = "F"
# ONNX Runtime's type strings and the torch dtypes they bind to.
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}
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


def sha256_file(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class OnnxRuntimeBackend:
    """An edmrt ONNX file (or a checked ``InferenceSession``) run with ONNX Runtime's I/O binding.

    Inputs and ``out`` are bound by ``data_ptr``: ORT reads the caller's tensors and writes F straight into
    ``out``, with no copy and no allocation per call.  A binding is made (and the buffers checked) once per set
    of buffers (addresses, shapes, dtypes), so an engine loop on static buffers binds once.  Bindings are taken
    from a pool and returned after the run: no two calls in flight share one, so the engines of a ``Sampler``
    (one per batch size and guidance) run from several threads at once; up to ``MAX_BINDINGS`` idle bindings
    are kept, the least recently used dropped first.
    CPU tensors with the CPU provider; CUDA tensors need the CUDA provider (the session then runs on torch's
    current stream, so no host sync is needed between the fused step and the network).
    """

    name = "onnxruntime"

    def __init__(self, path_or_session, providers=None):
        import onnxruntime as ort

        if isinstance(path_or_session, ort.InferenceSession):
            self.session = path_or_session
            self.conditional = check_onnx_signature(self.session.get_inputs(), self.session.get_outputs())
            if providers is not None:
                raise ValueError("providers are fixed by the given InferenceSession; pass a path to choose them")
        else:
            if providers is None and torch.cuda.is_available():
                stream = str(torch.cuda.current_stream().cuda_stream)
                providers = [("CUDAExecutionProvider", {"has_user_compute_stream": "1", "user_compute_stream": stream})
                             if p == "CUDAExecutionProvider" else p for p in default_providers()]
            self.session = load_onnx_session(path_or_session, providers=providers)
            self.conditional = check_onnx_signature(self.session.get_inputs(), self.session.get_outputs())
        ins = {i.name: i for i in self.session.get_inputs()}
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

    def _bind(self, x_in, c_noise, class_labels, out):
        """A new I/O binding of these buffers, after checking them against the protocol and the session."""
        check_backend_args(x_in, c_noise, class_labels, out, self.conditional, self.in_dtype, self.out_dtype,
                           self.sample_shape, self.batch)
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
        if self.conditional:
            bind_input("class_labels", class_labels, (B,))
        b.bind_output("F", device_type, device_id, _NP[out.dtype], list(out.shape), out.data_ptr())
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

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                 out: torch.Tensor) -> None:
        try:
            key = (x_in.data_ptr(), x_in.shape, x_in.dtype, x_in.device, c_noise.data_ptr(), c_noise.shape, c_noise.dtype,
                   None if class_labels is None else (class_labels.data_ptr(), class_labels.shape, class_labels.dtype,
                                                      class_labels.device, class_labels.is_contiguous()),
                   out.data_ptr(), out.shape, out.dtype, out.device,
                   x_in.is_contiguous(), c_noise.is_contiguous(), out.is_contiguous())
        except AttributeError:  # not tensors: let the check name the culprit
            key = None
        binding = None if key is None else self._checkout(key)
        if binding is None:
            binding = self._bind(x_in, c_noise, class_labels, out)
        self.session.run_with_iobinding(binding)  # releases the GIL; concurrent runs on one session are safe
        self._checkin(key, binding)


def check_onnx_signature(inputs, outputs, conditional: bool | None = None) -> bool:
    """Check ONNX Runtime's ``get_inputs()`` / ``get_outputs()`` against the declared signature (module docstring).

    Returns whether the model is conditional (has ``class_labels``); raises ValueError naming the first mismatch.
    """
    ins = {i.name: i for i in inputs}
    outs = {o.name: o for o in outputs}
    expected = ["x_in", "c_noise"] + (["class_labels"] if "class_labels" in ins else [])
    if list(ins) != expected or (set(ins) - set(INPUT_NAMES)):
        raise ValueError(f"ONNX inputs must be named {list(INPUT_NAMES[:2])} (+ 'class_labels' when conditional), "
                         f"in that order; got {list(ins)}")
    if list(outs) != [OUTPUT_NAME]:
        raise ValueError(f"ONNX outputs must be [{OUTPUT_NAME!r}], got {list(outs)}")
    has_labels = "class_labels" in ins
    if conditional is not None and bool(conditional) != has_labels:
        raise ValueError(f"expected a {'conditional' if conditional else 'unconditional'} model, but the ONNX file "
                         f"{'has' if has_labels else 'lacks'} the input 'class_labels'")
    rules = [("x_in", ins["x_in"], 4, _FLOAT_TYPES), ("c_noise", ins["c_noise"], 1, _FLOAT_TYPES),
             ("F", outs[OUTPUT_NAME], 4, _FLOAT_TYPES)]
    if has_labels:
        rules.append(("class_labels", ins["class_labels"], 1, ("tensor(int64)",)))
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
    return has_labels


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


def default_providers() -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]


def load_onnx_session(path, providers=None, conditional: bool | None = None, sess_options=None):
    """An ``onnxruntime.InferenceSession`` on ``path`` after checking the file and its signature.

    Raises ValueError when the file is missing, is not a valid ONNX model (truncated, corrupt), the session
    cannot be built, or its inputs/outputs are not the declared ones (names, ranks, types; see the module
    docstring).  ``providers``: default CUDA (when this onnxruntime build has it) then CPU; ``conditional``:
    True/False also requires/forbids ``class_labels``.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ONNX file {str(path)!r} does not exist")
    try:
        onnx.checker.check_model(str(path))  # parses the file (protobuf), checks the graph; by path: > 2 GB works
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # DecodeError, ValidationError, ...: all mean "not a usable ONNX file"
        raise ValueError(f"{str(path)!r} is not a valid ONNX model (truncated or corrupt?): "
                         f"{type(exc).__name__}: {str(exc).strip()[:300]}") from None
    # The signature first, from the file itself: a mismatch is named as such, not as a runtime load error.
    check_onnx_signature(_graph_args(graph.input, {t.name for t in graph.initializer}), _graph_args(graph.output, ()),
                         conditional)
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
    check_onnx_signature(session.get_inputs(), session.get_outputs(), conditional)
    return session
