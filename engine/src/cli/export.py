"""``edmrt export onnx|tensorrt``: a network to an ONNX file (verified in ONNX Runtime), or an ONNX file to a
cached TensorRT engine."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .common import output_path


def _export_batch(text: str) -> int:
    """argparse type of --batch: an integer >= 2 (a traced batch of 1 becomes a constant in the graph)."""
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or v < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2 (a batch of 1 would be traced as a constant), "
                                         f"got {text!r}")
    return v

HELP = "export a model (ONNX, TensorRT)"
log = logging.getLogger("edmrt")


def register(sub) -> None:
    export = sub.add_parser("export", help=HELP).add_subparsers(dest="format", required=True)
    p = export.add_parser("onnx", help="export a bundled model's network or a UNet config to ONNX with a dynamic "
                                       "batch, verified in ONNX Runtime")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a bundled model (digits, digits-cd): its network and weights")
    which.add_argument("--model-config", choices=("tiny", "digits", "cifar10"), help="a UNet config (with --weights)")
    p.add_argument("--weights", metavar="FILE.safetensors", help="weights (safetensors only; default: random)")
    p.add_argument("--fp16", action="store_true", help="float16 inside, float32 inputs and output")
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="default NAME_fp32.onnx / NAME_fp16.onnx")
    p.add_argument("--batch", type=_export_batch, default=2, help="batch of the traced example (>= 2; the file's batch is dynamic)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check against torch")
    p.set_defaults(fn=run_onnx)
    p = export.add_parser("tensorrt", help="build (or fetch from the cache) a TensorRT engine from an edmrt ONNX file")
    p.add_argument("onnx", help="an ONNX file written by `edmrt export onnx`")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--cache", help="cache root (default $EDMRT_CACHE or ~/.cache/edmrt)")
    p.set_defaults(fn=run_tensorrt)


def run_onnx(args) -> int:
    import edmrt
    from edmrt.export import export_onnx
    from edmrt.models import build_unet
    from edmrt.models.bundled import read_weights

    if args.model is not None:  # a bundled model's network, with its weights
        if args.weights:
            raise ValueError("--weights goes with --model-config; --model NAME exports the bundled weights")
        net, name = edmrt.load(args.model).network, args.model
    else:
        net, name = build_unet(args.model_config), args.model_config
        if args.weights:  # safetensors only: never torch.load of a pickle
            read_weights(Path(args.weights), net, f"UNet config {name!r}")
        else:
            log.warning("no --weights: exporting randomly initialised weights")
    dtype = "fp16" if args.fp16 else "fp32"
    out = output_path(args.output or f"{name}_{dtype}.onnx", create=True)
    r = export_onnx(net, Path(out), dtype=dtype, batch=args.batch, opset=args.opset, verify=not args.no_verify,
                    metadata={"model": name} if args.model is not None else None)
    sig = ", ".join(f"{k} {list(v[0])} {v[1]}" for k, v in {**r.inputs, **r.outputs}.items())
    err = "not verified" if r.max_abs_err is None else \
        f"max abs err vs torch {r.max_abs_err:.3e} <= {r.tolerance:.3e} at batch {list(r.verified_batches)}"
    print(f"wrote {r.path} ({dtype}, opset {r.opset}, {r.exporter} exporter) in {r.seconds:.1f} s: {sig}; {err}")
    return 0


def run_tensorrt(args) -> int:
    from edmrt.export.tensorrt import EngineCache, Profile

    onnx = Path(args.onnx)
    if not onnx.is_file():
        raise ValueError(f"ONNX file not found: {onnx}")
    import onnx as onnx_lib

    try:
        m = onnx_lib.load(str(onnx), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: a truncated or foreign file
        raise ValueError(f"{onnx} is not a valid ONNX model ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in m.metadata_props}
    if "edmrt.sample_shape" not in meta:
        raise ValueError(f"{onnx} is not an edmrt ONNX export (no edmrt.sample_shape metadata)")
    shape = tuple(int(v) for v in meta["edmrt.sample_shape"].strip("()[] ").split(",") if v.strip())
    profile = Profile(shape, args.min_batch, args.opt_batch, args.max_batch)
    engine = EngineCache(args.cache).get(onnx, profile, args.precision)
    print(f"TensorRT engine: {engine} (manifest beside it)")
    return 0
