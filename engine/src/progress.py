"""Progress over a run's stages: ``progress=True`` draws a tqdm bar, a callable is given the stages done since its
last call, False draws nothing.  The engine calls it after every stage (once, with all of them, after a CUDA graph's
replay)."""
from __future__ import annotations

from contextlib import contextmanager

__all__ = ["stage_progress"]


@contextmanager
def stage_progress(progress, total: int, desc: str):
    """Yield the callable the engine ticks (or None for no progress); a bar is closed on the way out."""
    if progress is False or progress is None:
        yield None
    elif progress is True:
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True) as bar:
            yield bar.update
    elif callable(progress):
        yield progress
    else:
        raise ValueError(f"progress must be True, False or a callable taking a number of stages, got {progress!r}")
