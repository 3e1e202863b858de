"""The edmrt ONNX file: what every file ``edmrt.export.onnx`` writes declares, and what every runtime that opens one
checks first (``check_onnx_file``, ``load_onnx_session``; ONNX Runtime and OpenVINO backends, the ONNX cache).

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

``onnx`` and ``onnxruntime`` are imported where used, never by ``import edmrt``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["load_onnx_session", "check_onnx_file", "check_onnx_signature", "onnx_cond_inputs", "onnx_weight_inputs",
           "default_providers", "weights_sha256", "INPUT_NAMES", "OUTPUT_NAME", "ORT_TYPES", "ORT_TYPE_NAMES"]

INPUT_NAMES = ("x_in", "c_noise")   # the leading inputs; conditioning inputs follow, by name
OUTPUT_NAME = "F"
# ONNX Runtime's type strings and the torch dtypes they bind to.
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}
ORT_TYPE_NAMES = {v: k for k, v in ORT_TYPES.items()}
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)")


def weights_sha256(net: torch.nn.Module) -> str:
    """sha256 of a network's state (every tensor's name, dtype, shape and bytes, by name): which weights it holds.

    The ONNX cache keys files by it and every export stores it as ``edmrt.weights_sha256``."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype (bfloat16 too)
    return h.hexdigest()


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
    from .model import CondInput

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
    from .model import CondInput

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
            raise ValueError(f"ONNX conditioning input {c.name!r} is {ORT_TYPE_NAMES[dtype]} of per-sample shape "
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
