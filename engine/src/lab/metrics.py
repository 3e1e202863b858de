"""Sample-quality metrics for the bundled digits models: class accuracy and FD-digits.

FD-digits is the Fréchet distance (Heusel et al. 2017, the FID formula)

    FD = ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))

between Gaussians fitted to the penultimate-layer features (64-D, after ReLU) of a small CNN
classifier trained on the digits train split (``DigitsClassifier``, shipped as
``weights/digits_classifier.safetensors``).  It is computed against the held-out test split of the
digits (images the teacher never saw), with sample sizes matched to the real-vs-real floor: the test
split is cut into two class-stratified halves A and B (197 and 203 images); the floor is FD(A, B) and a
model's score is FD(197 generated images with A's class labels, B).  Like FID, FD is biased upward at small sample sizes: compare numbers at the
same sample size only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..models.bundled import WEIGHTS_DIR, read_weights
from .common import held_out_halves, load_digits_split

__all__ = ["DigitsClassifier", "train_classifier", "load_classifier", "frechet_distance", "digits_features",
           "fd_digits", "fd_digits_floor", "fd_digits_labels", "class_accuracy", "evaluate_digits",
           "record_card_metrics", "write_classifier", "CLASSIFIER"]

CLASSIFIER = "digits_classifier"


class DigitsClassifier(nn.Module):
    """conv3x3(1->32) ReLU conv3x3(32->64) ReLU maxpool2 -> 4x4x64 -> linear 64 (features, ReLU) -> linear 10."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc0 = nn.Linear(64 * 4 * 4, 64)
        self.fc1 = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) in [-1, 1] -> (B, 64)
        h = F.relu(self.conv1(F.relu(self.conv0(x))))
        h = F.max_pool2d(h, 2).flatten(1)
        return F.relu(self.fc0(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits (B, 10)
        return self.fc1(self.features(x))


def train_classifier(epochs: int = 40, batch: int = 64, lr: float = 1e-3, seed: int = 0, noise: float = 0.1):
    """Train on the digits train split with Gaussian input noise (std ``noise``, for robustness to generated
    samples); returns (classifier in eval mode, held-out test accuracy, seconds)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits_split("train")
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    t0 = time.perf_counter()
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            xb = x[idx] + noise * torch.randn(x[idx].shape, generator=g)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    xt, yt = load_digits_split("test")
    acc = class_accuracy(xt, yt, net)
    return net, acc, time.perf_counter() - t0


def load_classifier(root: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits classifier (safetensors only)."""

    net = DigitsClassifier()
    read_weights(Path(root or WEIGHTS_DIR) / f"{CLASSIFIER}.safetensors", net)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels, classifier: DigitsClassifier | None = None) -> float:
    """Fraction of ``images`` (B, 1, 8, 8), clamped to [-1, 1], that the classifier assigns to ``labels``."""
    clf = classifier or load_classifier()
    pred = clf(images.float().clamp(-1, 1)).argmax(1)
    return float((pred == torch.as_tensor(labels).reshape(-1)).float().mean())


@torch.no_grad()
def digits_features(images: torch.Tensor, classifier: DigitsClassifier | None = None) -> np.ndarray:
    clf = classifier or load_classifier()
    return clf.features(images.float().clamp(-1, 1)).double().numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 sqrtm(C_a C_b)) of Gaussians fitted to two (N, D) feature sets."""
    import warnings

    from scipy import linalg

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N >= 2, D) feature arrays of the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    C_a, C_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # a singular product (dead ReLU features) is handled just below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(C_a @ C_b)
    if not np.all(np.isfinite(covmean)):  # singular product: offset both (as pytorch-fid does)
        eps = 1e-6 * np.eye(len(C_a))
        covmean = linalg.sqrtm((C_a + eps) @ (C_b + eps))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(C_a) + np.trace(C_b) - 2 * np.trace(covmean))


def fd_digits_labels() -> list[int]:
    """Class labels to generate for ``fd_digits``: those of test half A (so the samples match A's class mix)."""
    (_, ya), _ = held_out_halves()
    return ya.tolist()


def fd_digits_floor(classifier: DigitsClassifier | None = None) -> float:
    """Real-vs-real floor: FD between the two halves of the held-out test split."""
    clf = classifier or load_classifier()
    (xa, _), (xb, _) = held_out_halves()
    return frechet_distance(digits_features(xa, clf), digits_features(xb, clf))


def fd_digits(samples: torch.Tensor, classifier: DigitsClassifier | None = None) -> float:
    """FD between ``samples`` and test half B; generate ``fd_digits_labels()`` (test half A's labels) to compare
    with ``fd_digits_floor()``."""
    clf = classifier or load_classifier()
    _, (xb, _) = held_out_halves()
    return frechet_distance(digits_features(samples, clf), digits_features(xb, clf))


def evaluate_digits(model, solver: str = "heun", steps: int = 18, guidance: float | None = None,
                    backend: str = "torch", **options) -> dict:
    """Class accuracy and FD-digits of conditional samples with seeds 0..n-1 and labels ``fd_digits_labels()``."""
    from ..sampler import Sampler

    clf = load_classifier()
    labels = fd_digits_labels()
    n = len(labels)
    seeds = list(range(n))
    sampler = Sampler(model, solver=solver, steps=steps, backend=backend, device="cpu", **options)
    t0 = time.perf_counter()
    x = sampler.sample(seeds, cond=labels, guidance=guidance)
    secs = time.perf_counter() - t0
    return {"solver": solver, "steps": steps, "nfe": sampler.plan.nfe, "sigmas": [float(v) for v in sampler.plan.sigmas],
            "guidance": guidance, "backend": backend,
            "options": options, "samples": n, "seeds": f"0-{n - 1}", "labels": "fd_digits_labels()",
            "class_accuracy": class_accuracy(x, labels, clf), "fd_digits": fd_digits(x, clf),
            "fd_digits_floor": fd_digits_floor(clf), "seconds": round(secs, 2)}


def record_card_metrics(name: str, root: str | Path | None = None) -> list[dict]:
    """Measure the bundled model ``name`` (``evaluate_digits``: the teacher's Heun 18 with and without guidance and
    Euler 10; a distilled student's 1, 2 and 4 steps and TCD) and write the runs into its model card.  A bundled
    adapter (``BUNDLED_ADAPTERS``) is measured fused into its base model, with its card's levels."""
    from ..loading import load
    from ..models.bundled import BUNDLED_ADAPTERS
    from .common import machine_name

    root = Path(root or WEIGHTS_DIR)
    if name in BUNDLED_ADAPTERS:  # a few-step adapter: its card is NAME/edmrt.json, measured on its base model
        path = root / name / "edmrt.json"
        model = load(json.loads(path.read_text())["base"], adapters={str(root / name): 1.0})
    else:
        path = root / f"{name}.json"
        model = load(name, root=root)
    if model.precond.name == "cm":  # a distilled student: its card's levels for 1, 2 and 4 steps
        runs = [evaluate_digits(model, "consistency", k) for k in (1, 2, 4)]
        runs.append(evaluate_digits(model, "tcd", 2, gamma=0.3))
    else:
        runs = [evaluate_digits(model, "heun", 18), evaluate_digits(model, "heun", 18, guidance=2.0),
                evaluate_digits(model, "euler", 10)]
    card = json.loads(path.read_text())
    card["metrics"] = {"machine": machine_name(), "classifier": f"{CLASSIFIER}.safetensors", "runs": runs}
    path.write_text(json.dumps(card, indent=1) + "\n")
    return runs


def write_classifier(output: str | Path, epochs: int = 40, seed: int = 0, command: str = "") -> dict:
    """Train the digits classifier (``train_classifier``) and write it with its card at ``output``; returns the card."""
    from ..models.bundled import write_model
    from .common import machine_name

    net, acc, secs = train_classifier(epochs=epochs, seed=seed)
    card = {"format": "edmrt-model-card-1", "kind": "classifier", "architecture": DigitsClassifier.__doc__,
            "training": {"command": command, "data": "sklearn load_digits, train split (edmrt.lab.common."
                                                     "load_digits_split)",
                         "seed": seed, "epochs": epochs, "wall_time_s": round(secs, 1), "machine": machine_name()},
            "metrics": {"test_accuracy": acc, "test_images": len(held_out_halves()[0][1]) * 2,
                        "fd_digits_floor": fd_digits_floor(net)}}
    return write_model(net, Path(output), card, fmt="edmrt-clf-1")
