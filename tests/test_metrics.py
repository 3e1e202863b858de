"""FD-digits and the digits classifier (edmrt.lab.metrics)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from edmrt.lab import metrics as M  # noqa: E402
from edmrt.models.bundled import WEIGHTS_DIR  # noqa: E402
from edmrt.lab.common import load_digits_split  # noqa: E402


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 4))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    d = np.array([1.0, 2.0, 0.0, -1.0])
    assert M.frechet_distance(a, a + d) == pytest.approx(float(d @ d), abs=1e-8)
    # scale s = 2: ||mu - 2 mu||^2 + Tr(C + s^2 C - 2 s C) = ||mu||^2 + (1 - s)^2 Tr(C)
    mu = a.mean(0)
    assert M.frechet_distance(a, 2 * a) == pytest.approx(mu @ mu + np.trace(np.cov(a, rowvar=False)), rel=1e-8)
    # singular covariances (dead features) stay finite
    z = np.concatenate([a, np.zeros((500, 2))], axis=1)
    assert np.isfinite(M.frechet_distance(z, z + 0.1))


def test_frechet_distance_bad_shapes():
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_classifier_matches_its_card():
    card = json.loads((WEIGHTS_DIR / "digits_classifier.json").read_text())
    clf = M.load_classifier()
    x, y = load_digits_split("test")
    acc = M.class_accuracy(x, y, clf)
    assert acc == pytest.approx(card["metrics"]["test_accuracy"], abs=1e-6) and acc >= 0.97
    assert M.fd_digits_floor(clf) == pytest.approx(card["metrics"]["fd_digits_floor"], rel=1e-6)


def test_fd_digits_ranks_real_below_noise():
    clf = M.load_classifier()
    n = len(M.fd_digits_labels())
    noise = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert M.fd_digits(noise, clf) > 5 * M.fd_digits_floor(clf)
    xt, _ = load_digits_split("train")
    assert M.fd_digits(xt[:n], clf) < 2 * M.fd_digits_floor(clf)


def test_shipped_classifier_is_safetensors_only(tmp_path):
    (tmp_path / "digits_classifier.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        M.load_classifier(tmp_path)
