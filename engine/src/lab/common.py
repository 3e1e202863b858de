"""What the lab modules share: the machine's name, the digits data and its fixed split, the preconditioned
denoiser of a training step, checkpoints, EMA and the loss record."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from ..backends.auto import cpu_name

__all__ = ["machine_name", "write_json_md", "load_digits_split", "held_out_halves", "SIGMA_DATA", "N_TEST", "NUM_CLASSES", "denoise",
           "save_checkpoint_folder", "load_checkpoint_folder", "ema_update_", "record_loss"]

# The digits: ``load_digits`` (1797 images, values 0..16) scaled to [-1, 1]; a fixed split (permutation seed 0)
# keeps N_TEST images out of training.  The standard deviation of the scaled training pixels is 0.752 (mean
# -0.39): SIGMA_DATA = 0.75 (EDM's 0.5 is CIFAR-10's std in [-1, 1]; sigma_data is meant to be the data's std).
SIGMA_DATA = 0.75
N_TEST = 400
NUM_CLASSES = 10


def machine_name() -> str:
    """CPU model (or GPU name when CUDA is present) for result files."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def write_json_md(stem: Path, result: dict, markdown: str) -> tuple[Path, Path]:
    """A benchmark's result as STEM.json (indented) and its table as STEM.md; creates the folder."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown)
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def cpu_flags() -> list[str]:
    """Which of ``CPU_FLAGS`` (the vector / matrix extensions that decide fp32 vs bf16 speed) the CPU reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 8, 8) float32 in [-1, 1], labels (N,) int64) of the fixed train / test split or all."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise RuntimeError("the digits data set needs scikit-learn (pip install scikit-learn)") from None
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    if split == "all":
        return x, y
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    idx = perm[:N_TEST] if split == "test" else perm[N_TEST:]
    return x[idx].contiguous(), y[idx].contiguous()


def held_out_halves():
    """The held-out test split cut into two class-stratified halves A, B (per class: first half to A)."""
    x, y = load_digits_split("test")
    a, b = [], []
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten().tolist()
        a += idx[:len(idx) // 2]
        b += idx[len(idx) // 2:]
    return (x[a], y[a]), (x[b], y[b])



def denoise(net, precond, x: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out net(c_in x, c_noise, labels) for per-sample ``sigma`` (B,), with the
    preconditioning's float64 coefficients cast to ``x``'s dtype (EDM Eq. 7): the training-side D, with gradients."""
    c_skip, c_out, c_in, c_noise = (torch.as_tensor(c, dtype=x.dtype)
                                    for c in precond.coefficients(sigma.double().numpy()))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return c_skip.view(shape) * x + c_out.view(shape) * net(c_in.view(shape) * x, c_noise, labels)


def save_checkpoint_folder(path: Path, nets: dict, g: torch.Generator, optimizer: torch.optim.Optimizer,
                           state: dict) -> None:
    """A checkpoint folder: ``model.safetensors`` (each net's tensors under "NAME." and the generator state),
    ``optimizer.pt`` (a plain tensor dict) and ``state.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous() for name, net in nets.items() for k, v in net.state_dict().items()}
    tensors["rng"] = g.get_state()
    save_file(tensors, str(path / "model.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint_folder(path: Path, fmt: str):
    """(state, tensors, optimizer state) of a folder written by ``save_checkpoint_folder``; ValueError otherwise.
    The optimizer's file is read with ``torch.load(weights_only=True)``: plain tensors, never a pickle of code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "model.safetensors"))
        optim = torch.load(path / "optimizer.pt", weights_only=True)
    except (OSError, ValueError, SafetensorError, RuntimeError, pickle.UnpicklingError) as exc:
        # torch.load(weights_only=True) refuses anything but plain tensors with an UnpicklingError: say so in a line.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot resume from {str(path)!r}: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"cannot resume from {str(path)!r}: not an {fmt} folder")
    return state, tensors, optim


def ema_update_(dst: torch.nn.Module, src: torch.nn.Module, decay: float) -> None:
    """dst <- decay dst + (1 - decay) src, parameter by parameter (in place)."""
    with torch.no_grad():
        for p_d, p_s in zip(dst.parameters(), src.parameters()):
            p_d.lerp_(p_s.detach(), 1.0 - decay)


def record_loss(losses: list, loss: torch.Tensor, step: int, iters: int, bar, what: str) -> None:
    """Append the iteration's loss, stop on NaN / Inf, and update the progress bar (mean of the last 100)."""
    losses.append(float(loss.detach()))
    if not math.isfinite(losses[-1]):
        raise FloatingPointError(f"{what} loss is {losses[-1]} at iteration {step}")
    bar.update(1)
    if step % 20 == 0 or step == iters:
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
