"""Argument helpers shared by the ``edmrt`` sub-commands."""
from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["solver_options", "schedule_args", "int_list", "command_line"]


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


def int_list(text: str, what: str) -> list[int]:
    """"0-39" or "0,5,7" (or a mix: "0-3,9") -> list of ints."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise ValueError(f"{what} must look like 0-39 or 0,5,7, got {text!r}") from None
    if not out:
        raise ValueError(f"{what} is empty: {text!r}")
    return out


def command_line(args) -> str:
    """The command as typed (``edmrt train ...``), for model cards."""
    argv = args.argv if getattr(args, "argv", None) is not None else sys.argv[1:]
    return "edmrt " + shlex.join(argv)
