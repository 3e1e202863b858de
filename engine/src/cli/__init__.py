"""The ``edmrt`` command line: one module per command, one table of them (``COMMANDS``).

    edmrt sample     a bundled model to a PNG grid (the main job), or the exact mixture vs its ODE  (sample.py)
    edmrt render     many samples to PNG / Parquet / WebDataset files on Ray Data, resumable      (render.py)
    edmrt serve      a model over HTTP on Ray Serve, dynamic batching, a bounded queue             (serve.py)
    edmrt bench      solvers x steps x backends x batches of a model timed side by side; --peers    (bench.py)
    edmrt plan       a solver's coefficient plan as a table, optionally as JSON                    (plan.py)
    edmrt solvers    the registered solvers, their options and references                          (solvers.py)
    edmrt quality    quality per NFE: the exact Gaussian mixture, or the bundled digits models      (quality.py)
    edmrt train      EDM training of the digits UNet                                               (train.py)
    edmrt distill    consistency distillation of a bundled teacher                                 (distill.py)
    edmrt metrics    the digits classifier behind FD-digits; a bundled model's card metrics        (metrics.py)
    edmrt export     a network to ONNX, an ONNX file to a TensorRT engine                          (export.py)
    edmrt invert     real images to noise and back: the ODE run upward, original | reconstruction  (invert.py)
    edmrt edit       real images edited (LEDITS++) or inpainted towards a class or a prompt        (edit.py)
    edmrt fit-solver a solver's levels and coefficients learned for one model (plan JSON, card)     (fit_solver.py)

Each module has ``register(subparsers)`` (its arguments) and the function it sets as ``fn``; a command checks
every argument before any work starts.  Errors a user can fix (ValueError, RuntimeError, FloatingPointError,
OSError) print one line and exit with status 2 (argparse's own errors too); anything else prints one line
and exits with status 1 (``-v`` shows the traceback); a closed pipe (``edmrt plan ... | head``) ends quietly.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import (bench, distill, edit, export, fit_solver, invert, metrics, plan, quality, render, sample, serve, solvers,
               train)

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {"sample": sample, "render": render, "serve": serve, "bench": bench, "plan": plan, "solvers": solvers, "quality": quality,
            "train": train, "distill": distill, "metrics": metrics, "export": export, "invert": invert,
            "edit": edit, "fit-solver": fit_solver}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: "edmrt sample: error: ... (see edmrt sample --help)", exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="edmrt", description="EDM sampling engine: plans, samplers, exact oracles.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except BrokenPipeError:  # the reader went away (| head): stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, RuntimeError, FloatingPointError, OSError) as exc:
        print(f"edmrt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # an optional extra is missing: its message says what to install
        print(f"edmrt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edmrt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a usage error: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"edmrt {args.command}: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
