"""The GPU check: correctness of the Triton kernel on CUDA and the fused step's bandwidth.

Run by benchmarks/gpu_check.sh; writes gpu_check_<device>.json to $OUT (when set) or
benchmarks/results/.  Needs only torch, triton and numpy.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    import triton

    from edmrt.kernels.selfcheck import compare_impls, measure_bandwidth, philox_bits_match

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(device=name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    t0 = time.perf_counter()
    rows = compare_impls("triton", dev, f_dtypes=(torch.float32, torch.float16, torch.bfloat16))
    result["triton_vs_reference"] = dict(cases=len(rows), failed=[r for r in rows if not r["ok"]],
                                         max_rel_err=max(r["rel_err"] for r in rows))
    result["philox"] = philox_bits_match(dev)
    print(f"correctness: {len(rows)} cases, {len(result['triton_vs_reference']['failed'])} failed, max rel err "
          f"{result['triton_vs_reference']['max_rel_err']:.2e}; philox {result['philox']}", flush=True)
    bw = []
    for shape in [(64, 3, 32, 32), (4, 4, 128, 128), (64, 4, 128, 128), (8, 16, 128, 128)]:
        for solver in ("euler", "dpmpp_2m", "unipc"):
            r = measure_bandwidth("triton", dev, shape, solver)
            bw.append(r)
            print(f"fused step {solver:9s} {str(shape):20s} {r['step_us']:8.1f} us {r['step_gbps']:7.1f} GB/s; "
                  f"copy {r['copy_gbps']:7.1f} GB/s; step/copy {r['step_over_copy']:.2f}", flush=True)
    result["bandwidth"] = bw
    result["seconds"] = round(time.perf_counter() - t0, 1)
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    path = out_dir / f"gpu_check_{slug}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    ok = not result["triton_vs_reference"]["failed"] and result["philox"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
