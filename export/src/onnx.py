"""ONNX export of a denoiser network F = net(x_in, c_noise, **cond) with a dynamic batch, verified in ONNX Runtime.

The file has the declared signature of every edmrt ONNX file: x_in, c_noise, then one input per conditioning input
of the network (``edmrt.CondInput``: class labels, text embeddings, ...), in the declared order, -> F, the batch a
symbolic first axis of every input and of F (``edmrt.onnx_contract`` defines and checks it, ``edmrt.backends.ort``
runs the file).

``dtype="fp16"`` keeps that I/O (float32 x_in, c_noise and F; every conditioning input in its declared dtype) and
runs the network inside in float16 (``EDMUNet.to_fp16``: convolutions, linear maps and the label embedding in
float16; GroupNorm, the softmax of attention and the noise embedding in float32, as ADM's mixed precision does; a
network without ``to_fp16`` is converted wholesale, its floating-point conditioning inputs cast to float16 inside).
One I/O dtype for every precision means one set of engine buffers: the C++ fused step reads and writes float32
only, the Sampler's conditioning buffers are the model's, and the casts at the graph's ends cost nothing next to
the network.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), with the batch a
``torch.export.Dim`` in ``dynamic_shapes``.  It is the maintained path in torch >= 2.9 and works with
dynamic shapes for this UNet (measured on torch 2.13: opset 20 by default, ORT matches torch to ~1e-6);
the TorchScript-based legacy exporter is deprecated.  It is slower (~7 s for the tiny UNet, ~35 s for
cifar10 on 2 cores, against ~1 s for the legacy one on tiny), which an export done once can afford.
The exported batch symbol is checked by running the file at batch sizes other than the export batch.

Weight inputs (``weight_inputs=``): chosen parameters (those an adapter swap rewrites) are graph inputs instead of
initializers, float32 of fixed shape after the conditioning inputs, named ``w__<name>`` and listed in
``edmrt.weight_inputs`` (JSON {input name: parameter name}).  The traced module calls the network through
``torch.func.functional_call`` with those inputs in place of the parameters, which the dynamo exporter traces like any
other input (``dynamic_shapes`` ``{}``: every dim fixed).  ``OnnxRuntimeBackend(weights=...)`` binds the live
parameters by address, so an in-place copy into them changes the next run, with no new session and no new binding.

External data: a network over ``EXTERNAL_DATA_BYTES`` (protobuf's 2 GB limit, with room for the graph) is written
as the model file plus one data file beside it, ``<name>.<random>.data``, named anew by every export.

Writing: everything is built and verified in a private folder beside the target (``tempfile.mkdtemp``), then
moved into place with ``os.replace``, the data file first and the model file last: a reader sees the old model or
the new one, never half of one, and the new model's data file is in place before it is (the old model keeps its
own data file until it is replaced, then that file is removed); a file that fails verification is never at the
target; a symbolic link at the target is replaced, never written through; a directory there is refused.  Every file
carries ``edmrt.weights_sha256`` (``edmrt.onnx_contract.weights_sha256`` of the network), so a loader can tell which
weights it holds, and ``edmrt.cond`` (its conditioning inputs, JSON), so a loader knows what to bind.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from edmrt.backends.cachefile import sha256_file
from edmrt.onnx_contract import INPUT_NAMES, OUTPUT_NAME, load_onnx_session, weights_sha256
from edmrt.model import CondInput, check_cond_inputs

log = logging.getLogger("edmrt.export")

__all__ = ["export_onnx", "OnnxReport", "ExportVerificationError", "TOLERANCE", "EXTERNAL_DATA_BYTES"]

_DTYPES = ("fp32", "fp16")
# Weights above this many bytes go to an external data file (a protobuf message is limited to 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000
# Conditioning-input dtypes an ONNX file can take and ONNX Runtime can bind (bfloat16 has no numpy type).
_COND_DTYPES = (torch.float32, torch.float16, torch.int64)

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
    files: dict = field(default_factory=dict)   # file name -> sha256 of every file written (the model, external data)
    cond_inputs: tuple = field(default_factory=tuple)   # the CondInputs exported, in the file's order
    external_data: bool = False
    weight_inputs: dict = field(default_factory=dict)   # ONNX input name -> parameter name (``weight_inputs``)


class _Signature(nn.Module):
    """Fixes the exported argument names and order: (x_in, c_noise, *cond, *weights) -> F, ``cond`` in ``names``'
    order, passed to the network by keyword (an unconditional network is called ``net(x_in, c_noise)``); ``weights``
    (float32 graph inputs) replace the network's parameters ``params`` (names in ``net``) through
    ``torch.func.functional_call``, each cast to that parameter's dtype inside (float16 in an fp16 export)."""

    def __init__(self, net: nn.Module, names: tuple, params: tuple = ()):
        super().__init__()
        self.net, self.names, self.params = net, tuple(names), tuple(params)
        state = {**dict(net.named_buffers()), **dict(net.named_parameters())}
        self.dtypes = tuple(state[p].dtype for p in self.params)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, *rest: torch.Tensor):
        n = len(self.names)
        cond = dict(zip(self.names, rest[:n]))
        if not self.params:
            return self.net(x_in, c_noise, **cond)
        weights = {p: w if w.dtype == d else w.to(d) for p, w, d in zip(self.params, rest[n:], self.dtypes)}
        return torch.func.functional_call(self.net, weights, (x_in, c_noise), cond)


class _HalfInside(nn.Module):
    """float32 I/O around a network converted wholesale to float16 (for nets without ``to_fp16``); floating-point
    conditioning inputs are cast to float16 inside, integer ones (class labels) passed as they are."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.half()

    def forward(self, x_in, c_noise, **cond):
        cond = {k: v.half() if v.is_floating_point() else v for k, v in cond.items()}
        return self.net(x_in.half(), c_noise.half(), **cond).float()


def _inputs(B: int, sample_shape, cond: tuple, gen: torch.Generator):
    """Fresh random network inputs: x_in ~ N(0, 1), c_noise = ln(sigma)/4 with ln sigma ~ U[ln 0.002, ln 80], and
    per conditioning input: labels uniform over [0, num_classes] (the null label included; [0, 1] for an integer
    input without classes), embeddings ~ N(0, 1) in their dtype."""
    x_in = torch.randn((B,) + tuple(sample_shape), generator=gen)
    ln_sigma = torch.empty(B).uniform_(math.log(0.002), math.log(80.0), generator=gen)
    c_noise = 0.25 * ln_sigma
    values = {}
    for c in cond:
        shape = (B,) + c.shape
        if c.dtype == torch.int64:
            values[c.name] = torch.randint(0, max(c.num_classes, 1) + 1, shape, generator=gen)
        else:
            values[c.name] = torch.randn(shape, generator=gen).to(c.dtype)
    return x_in, c_noise, values


def _call(net, x_in, c_noise, cond: dict):
    return net(x_in, c_noise, **cond) if cond else net(x_in, c_noise)


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
                verify_batches: tuple = (1, 5), seed: int = 0, metadata: dict | None = None, cond_inputs=None,
                external_data: bool | None = None, weight_inputs: Sequence[str] = ()) -> OnnxReport:
    """Export ``net(x_in, c_noise, **cond) -> F`` to ONNX with a dynamic batch, then check it in ONNX Runtime.

    ==============  ==============================================================================
    net             a torch module; exported in eval mode (its mode is restored afterwards)
    path            output file (parent folders are created); written atomically: a symbolic link
                    there is replaced (its target is not written), a directory raises ValueError
    sample_shape    (C, H, W); default ``net.sample_shape`` (``EDMUNet`` has one)
    num_classes     0 for a net without class labels; > 0 adds the input ``class_labels`` (int64, null
                    label num_classes). Default ``net.num_classes``, else the class_labels in
                    ``cond_inputs``, else 0; a value contradicting ``net.num_classes`` raises
    cond_inputs     the conditioning inputs (``edmrt.CondInput``s: ``Model.cond``), each a named ONNX
                    input of shape (batch, *shape) and its declared dtype (float32, float16 or int64),
                    in this order after x_in and c_noise; class labels are prepended when num_classes > 0
                    and they are missing.  Default ``net.cond_inputs``, else the class labels alone
    dtype           "fp32", or "fp16": float16 inside, the same I/O (see the module docstring)
    opset           ONNX opset; None: the exporter's default (20 with torch 2.13)
    batch           batch size of the example inputs traced (the exported batch is symbolic)
    verify          run the file in ONNX Runtime (CPU) on fresh random inputs at ``verify_batches``
                    (sizes other than ``batch``) and compare with the float32 torch net; raises
                    ``ExportVerificationError`` beyond ``TOLERANCE[dtype]`` x max(1, max|F|)
    simplify        run onnxslim on the file when it is importable (it is not a dependency)
    metadata        extra string entries stored as ``edmrt.KEY`` (e.g. ``{"model": "digits"}``, which
                    ``edmrt sample --onnx`` checks against the model it samples); ``edmrt.weights_sha256``
                    (the net's weights), ``num_classes``, ``cond`` (JSON list of ``CondInput.to_dict()``),
                    ``sample_shape`` and ``dtype`` are always written
    external_data   write the weights to a data file beside the model (``<name>.<random>.data``, listed
                    in ``OnnxReport.files``): True, False, or None (default) for networks over
                    ``EXTERNAL_DATA_BYTES``, which a single protobuf file cannot hold
    weight_inputs   names of the net's parameters (keys of ``net.named_parameters()``; floating-point
                    buffers too) exported as graph INPUTS instead of initializers, so that a caller
                    binds the live tensors by address (``OnnxRuntimeBackend(weights=...)``) and an in-place
                    update (an adapter swap: ``p.data.copy_(new)``) takes effect on the next run, with no
                    new session.  Each is an input of its fixed shape (no batch axis), float32, after the
                    conditioning inputs, named ``w__`` + the name with every non-identifier character
                    replaced by ``_`` (made unique); metadata ``edmrt.weight_inputs`` maps the input names
                    to the parameter names (JSON).  With ``dtype="fp16"`` the inputs stay float32 and are
                    cast inside to the parameter's dtype in the float16 network (float16 for convolutions
                    and linear maps): one cast per run of each such weight.  Verification feeds the
                    parameters' current values.  ValueError names an unknown or non-floating one
    ==============  ==============================================================================
    """
    t0 = time.perf_counter()
    sample_shape, num_classes, cond, verify_batches = _check_args(net, sample_shape, num_classes, cond_inputs, dtype,
                                                                  batch, opset, verify, verify_batches)
    external_data = _check_external_data(net, external_data)
    weights = _check_weight_inputs(net, weight_inputs, cond)
    path = _check_target(Path(path))
    entries = _metadata_entries(net, metadata, num_classes, cond, sample_shape, dtype, weights)
    gen = torch.Generator().manual_seed(seed)
    location = f"{path.name}.{uuid.uuid4().hex[:12]}.data" if external_data else None
    # Trace, simplify, label and verify in a private folder beside the target, then publish.
    with _eval_mode(net), _staging_folder(path) as staging:
        staged = staging / path.name
        _trace(net, staged, sample_shape, cond, dtype, batch, opset, gen, location, weights)
        if simplify:
            _simplify(staged, location)
        opset_used = _write_metadata(staged, entries)
        inputs, outputs, max_err, tol = _check_staged(staged, path, net, sample_shape, cond, dtype,
                                                      verify_batches if verify else (), gen, weights)
        files = _publish(staging, path)
    report = OnnxReport(path=str(path), inputs=inputs, outputs=outputs, max_abs_err=max_err, tolerance=tol,
                        seconds=time.perf_counter() - t0, opset=opset_used, dtype=dtype,
                        verified_batches=verify_batches if verify else (), files=files, cond_inputs=cond,
                        external_data=len(files) > 1, weight_inputs=dict(weights))
    log.info("exported %s (%s, opset %d) in %.1f s, max abs err %s", path, dtype, opset_used, report.seconds, max_err)
    return report


def _check_external_data(net: nn.Module, external_data) -> bool:
    """``external_data`` checked; None becomes True for a network over ``EXTERNAL_DATA_BYTES``."""
    if external_data is not None and not isinstance(external_data, bool):
        raise ValueError(f"external_data must be True, False or None (automatic), got {external_data!r}")
    if external_data is None:
        return sum(p.numel() * p.element_size() for p in net.parameters()) > EXTERNAL_DATA_BYTES
    return external_data


def _metadata_entries(net: nn.Module, metadata, num_classes: int, cond: tuple, sample_shape, dtype: str,
                      weights: dict) -> dict:
    """The ``edmrt.KEY`` entries every file carries, after the caller's ``metadata``."""
    entries = {**{k: str(v) for k, v in (metadata or {}).items()}, "num_classes": str(num_classes),
               "cond": json.dumps([c.to_dict() for c in cond]),
               "sample_shape": ",".join(map(str, sample_shape)), "dtype": dtype, "weights_sha256": weights_sha256(net)}
    if weights:
        entries["weight_inputs"] = json.dumps(weights)
    return entries


@contextlib.contextmanager
def _eval_mode(net: nn.Module):
    """The net in eval mode inside the block, its own mode restored after it."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


@contextlib.contextmanager
def _staging_folder(path: Path):
    """A private (0700) folder beside ``path``, removed with whatever is left in it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_staged(staged: Path, path: Path, net: nn.Module, sample_shape, cond: tuple, dtype: str, batches, gen,
                  weights: dict) -> tuple[dict, dict, float | None, float | None]:
    """(inputs, outputs, max abs error, bound) of the staged file, opened in ONNX Runtime and verified at ``batches``
    (none: not verified, error and bound None); ExportVerificationError says that nothing reached ``path``."""
    session = load_onnx_session(staged, providers=["CPUExecutionProvider"], cond_inputs=cond)
    inputs, outputs = _describe(session.get_inputs()), _describe(session.get_outputs())
    if not batches:
        return inputs, outputs, None, None
    try:
        max_err, tol = _verify(session, net, sample_shape, cond, dtype, batches, gen, weights)
    except ExportVerificationError as exc:  # nothing reaches the target: a cache or engine cannot pick it up
        raise ExportVerificationError(f"{exc}; nothing written to {path}") from None
    return inputs, outputs, max_err, tol


def _weight_values(net: nn.Module, weights: dict) -> dict:
    """{ONNX input name: the parameter's current value as a contiguous float32 CPU tensor} for ``weights``."""
    state = {**dict(net.named_buffers()), **dict(net.named_parameters())}
    return {k: state[p].detach().to("cpu", torch.float32).contiguous() for k, p in weights.items()}


def _check_weight_inputs(net: nn.Module, weight_inputs, cond: tuple) -> dict:
    """{ONNX input name: parameter name} for ``weight_inputs``, in their order; ValueError naming an unknown,
    repeated or non-floating-point one."""
    if isinstance(weight_inputs, str) or not isinstance(weight_inputs, (tuple, list)):
        raise ValueError(f"weight_inputs must be a sequence of parameter names, got {weight_inputs!r:.200}")
    state = {**dict(net.named_buffers()), **dict(net.named_parameters())}
    taken = {*INPUT_NAMES, OUTPUT_NAME, *(c.name for c in cond)}
    out = {}
    for name in weight_inputs:
        if not isinstance(name, str) or name not in state:
            raise ValueError(f"weight_inputs: {name!r} is not a parameter of the {type(net).__name__} (its "
                             f"parameters: {', '.join(list(state)[:20])}{', ...' if len(state) > 20 else ''})")
        if name in out.values():
            raise ValueError(f"weight_inputs: {name!r} is listed twice")
        if not state[name].is_floating_point():
            raise ValueError(f"weight_inputs: {name!r} has dtype {state[name].dtype}; a weight input is floating-point")
        base = "w__" + re.sub(r"\W", "_", name)
        onnx_name, i = base, 2
        while onnx_name in taken:
            onnx_name, i = f"{base}_{i}", i + 1
        taken.add(onnx_name)
        out[onnx_name] = name
    return out


def _check_target(path: Path) -> Path:
    """``path`` with its parent folders created; ValueError when a directory is there (a link is replaced later)."""
    if path.is_dir() and not path.is_symlink():
        raise ValueError(f"path {str(path)!r} is a directory; expected the ONNX file's path")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _own_data_files(path: Path) -> set:
    """The external data files the edmrt ONNX file at ``path`` refers to (``<name>.<random>.data`` beside it, as
    ``export_onnx`` names them); empty when there is no such regular file or it cannot be read."""
    if path.is_symlink() or not path.is_file():
        return set()
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        names = {e.value for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    except Exception:  # not a readable ONNX file: nothing of ours to clean up
        return set()
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{12}\.data")
    return {n for n in names if pattern.fullmatch(n)}


def _all_tensors(model):
    """Every tensor of a model: each graph's initializers and its nodes' tensor attributes, subgraphs included."""
    import onnx

    out, graphs = [], [model.graph]
    while graphs:
        g = graphs.pop()
        out += list(g.initializer)
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    out.append(a.t)
                out += list(a.tensors)
                graphs += ([a.g] if a.type == onnx.AttributeProto.GRAPH else []) + list(a.graphs)
    return out


def _publish(staging: Path, path: Path) -> dict:
    """Move every staged file (external data first, the model last) into ``path``'s folder with ``os.replace``, which
    replaces a symbolic link at the name instead of following it; then remove the data file of the model replaced
    (``export_onnx`` names each export's data file anew, so the old model never reads the new data).  Returns
    {file name: sha256}."""
    names = sorted(f.name for f in staging.iterdir() if f.name != path.name) + [path.name]
    for name in names:
        if (path.parent / name).is_dir() and not (path.parent / name).is_symlink():
            raise ValueError(f"{str(path.parent / name)!r} is a directory; the export cannot write its file {name!r} there")
    old_data = _own_data_files(path) - set(names)
    files = {}
    for name in names:
        src, dst = staging / name, path.parent / name
        if dst.is_symlink():
            log.warning("replacing the symbolic link %s (to %s) with the exported file; its target is not written",
                        dst, os.readlink(dst))
        files[name] = sha256_file(src)
        os.replace(src, dst)
    for name in old_data:
        old = path.parent / name
        if old.is_file() and not old.is_symlink():
            old.unlink()
    return files


def _check_cond(net, cond_inputs, num_classes) -> tuple[tuple, int]:
    """(cond inputs, num_classes): ``cond_inputs`` (default ``net.cond_inputs``) with class labels added when
    num_classes > 0 (default ``net.num_classes``, else the class labels' own count); ValueError otherwise."""
    net_classes = getattr(net, "num_classes", None)
    if cond_inputs is None:
        cond_inputs = getattr(net, "cond_inputs", None)
        cond_inputs = tuple(cond_inputs) if isinstance(cond_inputs, (tuple, list)) else ()
    if isinstance(cond_inputs, CondInput):
        cond_inputs = (cond_inputs,)
    if not isinstance(cond_inputs, (tuple, list)) or not all(isinstance(c, CondInput) for c in cond_inputs):
        raise ValueError(f"cond_inputs must be a sequence of edmrt.CondInput, got {cond_inputs!r:.200}")
    if num_classes is None:
        labels = [c for c in cond_inputs if c.name == "class_labels"]
        num_classes = (int(net_classes) if net_classes is not None
                       else labels[0].num_classes if labels else 0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    if net_classes is not None and int(net_classes) != num_classes:
        raise ValueError(f"num_classes={num_classes} contradicts the net's num_classes={net_classes}")
    cond = check_cond_inputs(tuple(cond_inputs), num_classes)
    for c in cond:
        if c.dtype not in _COND_DTYPES:
            raise ValueError(f"conditioning input {c.name!r} has dtype {c.dtype}; an ONNX export takes "
                             f"{', '.join(map(str, _COND_DTYPES))} (declare it float32: the file casts inside)")
    return cond, num_classes


def _check_args(net, sample_shape, num_classes, cond_inputs, dtype, batch, opset, verify, verify_batches):
    """(sample_shape, num_classes, cond inputs, verify_batches) checked, defaults filled from the net; ValueError
    otherwise."""
    if not isinstance(net, nn.Module):
        raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    if sample_shape is None:
        sample_shape = getattr(net, "sample_shape", None)
        if sample_shape is None:
            raise ValueError(f"sample_shape=(C, H, W) is required for a {type(net).__name__} without .sample_shape")
    sample_shape = _check_sample_shape(sample_shape)
    cond, num_classes = _check_cond(net, cond_inputs, num_classes)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        # torch.export specialises a size-1 example dimension to the constant 1: trace at >= 2.
        raise ValueError(f"batch must be an int >= 2 (a batch of 1 would be traced as a constant), got {batch!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 18):
        raise ValueError(f"opset must be an int >= 18 for the dynamo exporter, or None, got {opset!r}")
    verify_batches = tuple(int(b) for b in verify_batches)
    if verify and (not verify_batches or batch in verify_batches or min(verify_batches) < 1):
        raise ValueError(f"verify_batches must be sizes >= 1 other than the export batch {batch}, got {verify_batches}")
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise ValueError(f"export_onnx traces on the CPU: move the net there first (it is on {device})")
    return sample_shape, num_classes, cond, verify_batches


def _trace(net: nn.Module, path: Path, sample_shape, cond: tuple, dtype: str, batch: int, opset, gen,
           location: str | None, weights: dict | None = None) -> None:
    """torch.onnx.export(dynamo=True) of the net (float32, or a float16 copy with the same I/O), batch symbolic on
    every input; ``weights`` ({ONNX input name: parameter name}) become float32 inputs of fixed shape after the
    conditioning inputs; with ``location``, the weights are then moved to that external data file."""
    weights = dict(weights or {})
    if dtype == "fp16":
        half = copy.deepcopy(net)
        traced = half.to_fp16() if hasattr(half, "to_fp16") else _HalfInside(half)
    else:
        traced = net
    names = tuple(c.name for c in cond)
    prefix = "net." if isinstance(traced, _HalfInside) else ""   # the parameter names inside the traced module
    module = _Signature(traced, names, tuple(prefix + p for p in weights.values())).eval()
    x_in, c_noise, values = _inputs(batch, sample_shape, cond, gen)
    args = (x_in, c_noise) + tuple(values[n] for n in names) + tuple(_weight_values(net, weights).values())
    B = torch.export.Dim("batch", min=1, max=4096)
    rest = tuple({0: B} for _ in names) + tuple({} for _ in weights)   # a weight input: every dim fixed
    dynamic = ({0: B}, {0: B}) + ((rest,) if rest else ())  # *cond, *weights: one nested tuple
    # The exporter warns about every torchvision op it cannot register (torchvision is not installed, by
    # design) and about deprecations of its own: neither concerns this model.
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=[*INPUT_NAMES, *names, *weights],
                              output_names=[OUTPUT_NAME], dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                              external_data=location is not None, optimize=True)
    finally:
        noisy.setLevel(level)
    if location is not None:  # the exporter's own data file (name and threshold its choice) -> ours
        import onnx

        _save(onnx.load(str(path)), path, location)


def _save(model, path: Path, location: str | None) -> None:
    """Write ``model`` (its weights in memory) to ``path``; with ``location``, every tensor over 1 KiB to that one
    data file beside it (removed first: ONNX appends to an existing one), any other file beside it removed."""
    import onnx

    if location is None:
        onnx.save(model, str(path))
        return
    for f in path.parent.iterdir():  # the staging folder: only this export's files
        if f.name != path.name:
            f.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)


def _write_metadata(path: Path, entries: dict) -> int:
    """Store ``entries`` as ``edmrt.KEY`` metadata (loaders read the sample shape and classes from the file); returns
    the opset.  External data, if any, is not loaded: the proto keeps its references to the weights file beside it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for k, v in entries.items():
        model.metadata_props.add(key=f"edmrt.{k}", value=v)
    onnx.save(model, str(path))
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def _describe(args) -> dict:
    """name -> (shape with "batch" for the symbolic axis, type) of ONNX Runtime's inputs or outputs."""
    return {a.name: (tuple(d if isinstance(d, int) else "batch" for d in a.shape), a.type) for a in args}


def _verify(session, net: nn.Module, sample_shape, cond: tuple, dtype: str, batches, gen,
            weights: dict | None = None) -> tuple[float, float]:
    """(max abs error, bound) of the file against the float32 torch net on fresh inputs at ``batches`` (weight inputs
    fed the parameters' current values); ExportVerificationError beyond ``TOLERANCE[dtype]`` x max(1, max|F|) or on
    a wrong shape or NaN."""
    max_err, scale = 0.0, 0.0
    wfeed = {k: v.numpy() for k, v in _weight_values(net, weights or {}).items()}
    for b in batches:
        x_in, c_noise, values = _inputs(b, sample_shape, cond, gen)
        with torch.no_grad():
            ref = _call(net, x_in, c_noise, values)
        feed = {"x_in": x_in.numpy(), "c_noise": c_noise.numpy(), **{k: v.numpy() for k, v in values.items()}, **wfeed}
        got = session.run([OUTPUT_NAME], feed)[0]
        if got.shape != tuple(ref.shape):
            raise ExportVerificationError(f"ONNX output at batch {b} has shape {got.shape}, torch {tuple(ref.shape)}")
        if not np.all(np.isfinite(got)):
            raise ExportVerificationError(f"ONNX output at batch {b} ({dtype}) contains NaN or Inf")
        max_err = max(max_err, float(np.abs(got.astype(np.float64) - ref.double().numpy()).max()))
        scale = max(scale, float(ref.abs().max()))
    tol = TOLERANCE[dtype] * max(1.0, scale)
    if not max_err <= tol:
        raise ExportVerificationError(
            f"ONNX Runtime output differs from torch by max abs {max_err:.3e} > tolerance {tol:.3e} "
            f"({dtype}: {TOLERANCE[dtype]:g} x max(1, max|F| = {scale:.3g})) at batch sizes {tuple(batches)}")
    return max_err, tol


def _simplify(path: Path, location: str | None = None) -> None:
    """onnxslim (constant folding, dead-node removal, fusion of shape ops) when importable; a failure is logged."""
    try:
        import onnxslim
    except ImportError:
        log.debug("onnxslim is not installed: skipping simplification")
        return
    try:
        slim = onnxslim.slim(str(path))
    except Exception as exc:  # an optional optimisation: keep the exporter's file, say why
        log.warning("onnxslim failed on %s (%s: %s); keeping the unsimplified file", path, type(exc).__name__, exc)
        return
    _save(slim, path, location)
