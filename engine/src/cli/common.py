"""Argument helpers shared by the ``edmrt`` sub-commands."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

__all__ = ["solver_options", "schedule_args", "int_list", "command_line", "output_path", "positive_int",
           "read_pngs", "held_out_digits", "solver_choice"]

LEARNED = "learned:"


def solver_options(pairs: list[str] | None) -> dict[str, float]:
    """``-O NAME=VALUE`` pairs as {NAME: float(VALUE)}; ValueError naming a malformed pair."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option must look like NAME=VALUE, got {pair!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--option {key} must be a number, got {value!r}") from None
    return out


def schedule_args(p: argparse.ArgumentParser) -> None:
    """--steps, --schedule, --sigma-min, --sigma-max, --rho and the repeatable -O NAME=VALUE solver option."""
    p.add_argument("--steps", type=int, default=18, help="EDM's N: noise levels before t_N = 0 (default 18)")
    p.add_argument("--schedule", default="karras", help="schedule name (default karras)")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--option", "-O", action="append", metavar="NAME=VALUE",
                   help="solver option, repeatable (e.g. -O S_churn=40)")


MAX_LIST = 1_000_000  # integers an option like --seeds 0-999999 may expand to


def int_list(text: str, what: str) -> list[int]:
    """"0-39" or "0,5,7" (or a mix: "0-3,9") -> list of ints (at most MAX_LIST)."""
    parts = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            parts.append((int(lo), int(hi)) if sep else (int(lo), int(lo)))
    except ValueError:
        raise ValueError(f"{what} must look like 0-39 or 0,5,7, got {text!r}") from None
    if any(hi < lo for lo, hi in parts):
        raise ValueError(f"{what} must list ranges low-high with low <= high, got {text!r}")
    count = sum(hi - lo + 1 for lo, hi in parts)
    if count > MAX_LIST:
        raise ValueError(f"{what} lists {count} integers; at most {MAX_LIST} at a time")
    return [v for lo, hi in parts for v in range(lo, hi + 1)]


def command_line(args) -> str:
    """The command as typed (``edmrt train ...``), for model cards."""
    argv = args.argv if getattr(args, "argv", None) is not None else sys.argv[1:]
    return "edmrt " + shlex.join(argv)


def output_path(path, what: str = "-o", create: bool = False) -> Path:
    """An output file that can be written: not a folder, in a folder that exists (or, with ``create``, whose nearest
    existing ancestor is a folder) and is writable.  Checked before any work starts, so that a long run never ends
    in a FileNotFoundError."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a folder; give a file name")
    parent = p.parent
    if not parent.is_dir():
        if not create:
            raise ValueError(f"{what} {str(p)!r}: the folder {str(parent)!r} does not exist")
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"{what} {str(p)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {str(p)!r}: the folder {str(parent)!r} is not writable")
    return p


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v}")
    return v


def read_pngs(paths, C: int, H: int, W: int):
    """``--image`` files as (N, C, H, W) float32 in [-1, 1] (grayscale for C = 1, else RGB); ValueError naming a file
    of another size than the model's H x W."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for path in paths:
        img = Image.open(path).convert("L" if C == 1 else "RGB")
        if img.size != (W, H):
            raise ValueError(f"--image {path!r} is {img.size[0]}x{img.size[1]}; the model takes {W}x{H}")
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(a.reshape(H, W, C).transpose(2, 0, 1).copy()))
    return torch.stack(out)


def held_out_digits(spec: str | None):
    """``--digits`` (default 0-9): held-out digits of the test split by index, as ((N, 1, 8, 8) in [-1, 1], their
    labels); ValueError naming an index outside the split."""
    import torch

    from edmrt.lab.common import load_digits_split

    x, y = load_digits_split("test")
    idx = int_list(spec or "0-9", "--digits")
    if any(i < 0 or i >= len(x) for i in idx):
        raise ValueError(f"--digits must index the test split's {len(x)} images, got {spec!r}")
    return torch.as_tensor(x[idx]).float(), [int(y[i]) for i in idx]


def solver_choice(args) -> dict:
    """``--solver`` as Sampler / solve keywords: ``learned:FILE`` reads a plan JSON (``edmrt fit-solver -o FILE``, a
    ``Plan.save``) and is the whole solver, so --steps, --schedule and -O are refused beside it; a name passes
    through with its steps, schedule and options."""
    from edmrt.plan import Plan

    solver = args.solver or ""
    if not solver.startswith(LEARNED):
        return {}
    path = solver[len(LEARNED):]
    if not path:
        raise ValueError("--solver learned:FILE needs the plan file, e.g. learned:digits_nfe4.json")
    given = [name for name, v in (("--steps", args.steps), ("--schedule", args.schedule), ("-O", args.option))
             if v is not None and v != []]
    if given:
        raise ValueError(f"--solver {solver} is a whole plan (its levels and coefficients): drop {', '.join(given)}")
    try:
        return {"plan": Plan.load(path)}
    except FileNotFoundError:
        raise ValueError(f"--solver {solver}: no such file {path!r}") from None
