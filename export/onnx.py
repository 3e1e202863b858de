"""ONNX export of a denoiser network F(x_in, c_noise[, class_labels]) with a dynamic batch, verified in ONNX Runtime.

The declared signature of every edmrt ONNX file (what ``load_onnx_session`` checks and the backends bind):

=============  =============================  ==========================================================
name           shape                          dtype
=============  =============================  ==========================================================
x_in           (B, C, H, W)                   float32 (float16 accepted from foreign files)
c_noise        (B,)                           float32 (float16 accepted from foreign files)
class_labels   (B,), only when conditional    int64, in [0, num_classes]; num_classes is the null label
F              (B, C, H, W)  (output)         x_in's dtype
=============  =============================  ==========================================================

``dtype="fp16"`` keeps that float32 I/O and runs the network inside in float16 (``EDMUNet.to_fp16``:
convolutions, linear maps and the label embedding in float16; GroupNorm, the softmax of attention and
the noise embedding in float32, as ADM's mixed precision does).  One I/O dtype for every precision means
one set of engine buffers: the C++ fused step reads and writes float32 only, and the casts at the graph's
two ends cost nothing next to the network.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), with the batch a
``torch.export.Dim`` in ``dynamic_shapes``.  It is the maintained path in torch >= 2.9 and works with
dynamic shapes for this UNet (measured on torch 2.13: opset 20 by default, ORT matches torch to ~1e-6);
the TorchScript-based legacy exporter is deprecated.  It is slower (~7 s for the tiny UNet, ~35 s for
cifar10 on 2 cores, against ~1 s for the legacy one on tiny), which an export done once can afford.
The exported batch symbol is checked by running the file at batch sizes other than the export batch.
"""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("edmrt.export")

__all__ = ["export_onnx", "load_onnx_session", "check_onnx_signature", "OnnxReport", "ExportVerificationError",
           "TOLERANCE", "INPUT_NAMES", "OUTPUT_NAME", "ORT_TYPES"]

INPUT_NAMES = ("x_in", "c_noise", "class_labels")
OUTPUT_NAME = "F"
# ONNX Runtime's type strings and the torch dtypes they bind to.
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)")
_DTYPES = ("fp32", "fp16")

# Verification bound, relative to the output's scale max|F_torch| (floored at 1):
# fp32: the graph is the same arithmetic reordered (fused Conv+bias, GroupNorm as InstanceNorm, a different
#       GEMM blocking); float32 rounding (6e-8 a step) over ~100 layers is ~1e-6 measured, 1e-4 leaves room
#       for larger nets and other CPUs while still catching any wrong op (those err at O(1)).
# fp16: weights and activations rounded to 11 bits (unit roundoff 4.9e-4) at every conv/linear; independent
#       roundings add in quadrature over the net's ~50 sequential layers, while GroupNorm (in float32) renormalises
#       each block's output so the error does not compound.  Measured against the float32 torch net with random
#       weights: 5e-4 to 1.4e-3 relative (tiny, digits, cifar10).  1e-2 leaves ~10x for trained weights, whose
#       activations spread wider, and is still ~100x below a broken graph.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


class ExportVerificationError(ValueError):
    """The exported file's output differs from torch's by more than the dtype's tolerance."""


@dataclass
class OnnxReport:
    """What ``export_onnx`` wrote and how well it matches torch."""

    path: str
    inputs: dict            # name -> (shape with "batch" for the dynamic axis, ONNX type string)
    outputs: dict
    max_abs_err: float | None   # over the verification batches; None when verify=False
    tolerance: float | None     # the absolute bound it was held to (TOLERANCE[dtype] x output scale)
    seconds: float
    opset: int
    dtype: str
    exporter: str = "dynamo"
    verified_batches: tuple = field(default_factory=tuple)


class _Signature(nn.Module):
    """Fixes the exported argument names and order: (x_in, c_noise[, class_labels]) -> F."""

    def __init__(self, net: nn.Module, conditional: bool):
        super().__init__()
        self.net, self.conditional = net, conditional

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None):
        if self.conditional:
            return self.net(x_in, c_noise, class_labels)
        return self.net(x_in, c_noise)


class _HalfInside(nn.Module):
    """float32 I/O around a network converted wholesale to float16 (for nets without ``to_fp16``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.half()

    def forward(self, x_in, c_noise, class_labels=None):
        args = (x_in.half(), c_noise.half()) + (() if class_labels is None else (class_labels,))
        return self.net(*args).float()


def _inputs(B: int, sample_shape, num_classes: int, gen: torch.Generator):
    """Fresh random network inputs: x_in ~ N(0, 1), c_noise = ln(sigma)/4 with ln sigma ~ U[ln 0.002, ln 80],
    labels uniform over [0, num_classes] (the null label included)."""
    x_in = torch.randn((B,) + tuple(sample_shape), generator=gen)
    ln_sigma = torch.empty(B).uniform_(math.log(0.002), math.log(80.0), generator=gen)
    c_noise = 0.25 * ln_sigma
    labels = torch.randint(0, num_classes + 1, (B,), generator=gen) if num_classes > 0 else None
    return x_in, c_noise, labels


def _check_sample_shape(sample_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in sample_shape)
    except (TypeError, ValueError):
        raise ValueError(f"sample_shape must be (C, H, W), got {sample_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1 or any(int(s) != s for s in sample_shape):
        raise ValueError(f"sample_shape must be (C, H, W) of positive ints, got {sample_shape!r}")
    return shape


def export_onnx(net: nn.Module, path, sample_shape=None, num_classes: int | None = None, dtype: str = "fp32",
                opset: int | None = None, batch: int = 2, verify: bool = True, simplify: bool = True,
                verify_batches: tuple = (1, 5), seed: int = 0, metadata: dict | None = None) -> OnnxReport:
    """Export ``net(x_in, c_noise[, class_labels]) -> F`` to ONNX with a dynamic batch, then check it in ONNX Runtime.

    ==============  ==============================================================================
    net             a torch module; exported in eval mode (its mode is restored afterwards)
    path            output file (parent folders are created)
    sample_shape    (C, H, W); default ``net.sample_shape`` (``EDMUNet`` has one)
    num_classes     0 for an unconditional net; > 0 adds the input ``class_labels``. Default
                    ``net.num_classes`` (or 0); a value contradicting ``net.num_classes`` raises
    dtype           "fp32", or "fp16": float16 inside, float32 I/O (see the module docstring)
    opset           ONNX opset; None: the exporter's default (20 with torch 2.13)
    batch           batch size of the example inputs traced (the exported batch is symbolic)
    verify          run the file in ONNX Runtime (CPU) on fresh random inputs at ``verify_batches``
                    (sizes other than ``batch``) and compare with the float32 torch net; raises
                    ``ExportVerificationError`` beyond ``TOLERANCE[dtype]`` x max(1, max|F|)
    simplify        run onnxslim on the file when it is importable (it is not a dependency)
    metadata        extra string entries stored as ``edmrt.KEY`` (e.g. ``{"model": "digits"}``, which
                    ``edmrt sample --onnx`` checks against the model it samples)
    ==============  ==============================================================================
    """
    import onnx

    t0 = time.perf_counter()
    if not isinstance(net, nn.Module):
        raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if sample_shape is None:
        sample_shape = getattr(net, "sample_shape", None)
        if sample_shape is None:
            raise ValueError(f"sample_shape=(C, H, W) is required for a {type(net).__name__} without .sample_shape")
    sample_shape = _check_sample_shape(sample_shape)
    net_classes = getattr(net, "num_classes", None)
    if num_classes is None:
        num_classes = 0 if net_classes is None else int(net_classes)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    if net_classes is not None and int(net_classes) != num_classes:
        raise ValueError(f"num_classes={num_classes} contradicts the net's num_classes={net_classes}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        # torch.export specialises a size-1 example dimension to the constant 1: trace at >= 2.
        raise ValueError(f"batch must be an int >= 2 (a batch of 1 would be traced as a constant), got {batch!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 18):
        raise ValueError(f"opset must be an int >= 18 for the dynamo exporter, or None, got {opset!r}")
    verify_batches = tuple(int(b) for b in verify_batches)
    if verify and (not verify_batches or batch in verify_batches or min(verify_batches) < 1):
        raise ValueError(f"verify_batches must be sizes >= 1 other than the export batch {batch}, got {verify_batches}")
    conditional = num_classes > 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise ValueError(f"export_onnx traces on the CPU: move the net there first (it is on {device})")

    was_training = net.training
    net.eval()
    try:
        # The module to trace: float32, or a float16 copy with float32 I/O.
        if dtype == "fp16":
            half = copy.deepcopy(net)
            traced = half.to_fp16() if hasattr(half, "to_fp16") else _HalfInside(half)
        else:
            traced = net
        module = _Signature(traced, conditional).eval()
        gen = torch.Generator().manual_seed(seed)
        x_in, c_noise, labels = _inputs(batch, sample_shape, num_classes, gen)
        args = (x_in, c_noise) + ((labels,) if conditional else ())
        names = list(INPUT_NAMES[:len(args)])
        B = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = tuple({0: B} for _ in args)
        nbytes = sum(p.numel() * p.element_size() for p in traced.parameters())
        # The exporter warns about every torchvision op it cannot register (torchvision is not installed, by
        # design) and about deprecations of its own: neither concerns this model.
        noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = noisy.level
        noisy.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=[OUTPUT_NAME],
                                  dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False,
                                  external_data=nbytes > 1_800_000_000, optimize=True)
        finally:
            noisy.setLevel(level)

        if simplify:
            _simplify(path)
        # Metadata for loaders (an engine reads the sample shape and classes from the file).  External data, if
        # any, is not loaded: the proto keeps its references to the weights file beside it.
        model = onnx.load(str(path), load_external_data=False)
        del model.metadata_props[:]
        extra = {f"edmrt.{k}": str(v) for k, v in (metadata or {}).items()}
        for k, v in {**extra, "edmrt.num_classes": str(num_classes),
                     "edmrt.sample_shape": ",".join(map(str, sample_shape)), "edmrt.dtype": dtype}.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(path))
        opset_used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)

        session = load_onnx_session(path, providers=["CPUExecutionProvider"], conditional=conditional)
        def describe(args):  # name -> (shape with "batch" for the symbolic axis, type)
            return {a.name: (tuple(d if isinstance(d, int) else "batch" for d in a.shape), a.type) for a in args}

        inputs, outputs = describe(session.get_inputs()), describe(session.get_outputs())

        max_err = tol = None
        try:
            if verify:
                max_err, scale = 0.0, 0.0
                for b in verify_batches:
                    x_in, c_noise, labels = _inputs(b, sample_shape, num_classes, gen)
                    with torch.no_grad():
                        ref = net(x_in, c_noise, labels) if conditional else net(x_in, c_noise)
                    feed = {"x_in": x_in.numpy(), "c_noise": c_noise.numpy()}
                    if conditional:
                        feed["class_labels"] = labels.numpy()
                    got = session.run([OUTPUT_NAME], feed)[0]
                    if got.shape != tuple(ref.shape):
                        raise ExportVerificationError(f"ONNX output at batch {b} has shape {got.shape}, "
                                                      f"torch {tuple(ref.shape)}")
                    if not np.all(np.isfinite(got)):
                        raise ExportVerificationError(f"ONNX output at batch {b} ({dtype}) contains NaN or Inf")
                    max_err = max(max_err, float(np.abs(got.astype(np.float64) - ref.double().numpy()).max()))
                    scale = max(scale, float(ref.abs().max()))
                tol = TOLERANCE[dtype] * max(1.0, scale)
                if not max_err <= tol:
                    raise ExportVerificationError(
                        f"ONNX Runtime output differs from torch by max abs {max_err:.3e} > tolerance {tol:.3e} "
                        f"({dtype}: {TOLERANCE[dtype]:g} x max(1, max|F| = {scale:.3g})) at batch sizes {verify_batches}")
        except ExportVerificationError as exc:
            del session
            path.unlink()  # a file that failed its check must not be picked up later (by a cache, an engine)
            raise ExportVerificationError(f"{exc}; {path} removed") from None
    finally:
        net.train(was_training)

    report = OnnxReport(path=str(path), inputs=inputs, outputs=outputs, max_abs_err=max_err, tolerance=tol,
                        seconds=time.perf_counter() - t0, opset=opset_used, dtype=dtype,
                        verified_batches=verify_batches if verify else ())
    log.info("exported %s (%s, opset %d) in %.1f s, max abs err %s", path, dtype, opset_used, report.seconds, max_err)
    return report


def _simplify(path: Path) -> None:
    """onnxslim (constant folding, dead-node removal, fusion of shape ops) when importable; a failure is logged."""
    try:
        import onnxslim
    except ImportError:
        log.debug("onnxslim is not installed: skipping simplification")
        return
    try:
        import onnx

        onnx.save(onnxslim.slim(str(path)), str(path))
    except Exception as exc:  # an optional optimisation: keep the exporter's file, say why
        log.warning("onnxslim failed on %s (%s: %s); keeping the unsimplified file", path, type(exc).__name__, exc)


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
