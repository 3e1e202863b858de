"""Argument helpers shared by the ``edmrt`` sub-commands."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

__all__ = ["solver_options", "schedule_args", "int_list", "command_line", "output_path", "positive_int"]


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
