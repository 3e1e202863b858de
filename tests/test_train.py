"""EDM training on the digits (edmrt.lab.train, `edmrt train`): end to end on the tiny config in seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("sklearn")

import edmrt  # noqa: E402
from edmrt.cli import main  # noqa: E402
from edmrt.lab.common import SIGMA_DATA, load_digits_split
from edmrt.lab.train import TrainOptions, train  # noqa: E402


def test_digits_split_is_fixed_and_scaled():
    x, y = load_digits_split("train")
    xt, yt = load_digits_split("test")
    assert x.shape == (1397, 1, 8, 8) and xt.shape == (400, 1, 8, 8)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    # sigma_data is the data's std (documented choice), not EDM's CIFAR-10 value
    assert abs(float(x.std()) - SIGMA_DATA) < 0.02
    x2, _ = load_digits_split("train")
    assert torch.equal(x, x2)


def test_tiny_training_loss_falls():
    r = train(TrainOptions(config="tiny", iters=80, batch=32, lr=3e-3, warmup=5, seed=1), progress=False)
    assert r.step == 80 and len(r.losses) == 80
    assert np.mean(r.losses[-20:]) < 0.8 * np.mean(r.losses[:20])
    assert all(np.isfinite(r.losses))


def test_resume_equals_uninterrupted(tmp_path):
    opts = dict(config="tiny", batch=8, warmup=2, seed=3)
    full = train(TrainOptions(iters=10, **opts), progress=False)
    train(TrainOptions(iters=5, **opts), checkpoint=tmp_path / "ck", progress=False)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 5
    resumed = train(TrainOptions(iters=10, **opts), resume=tmp_path / "ck", progress=False)
    assert resumed.step == 10 and resumed.losses == full.losses
    for name in ("net", "ema"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_seed_reproducible_and_seed_matters():
    a = train(TrainOptions(config="tiny", iters=3, batch=4, seed=0), progress=False)
    b = train(TrainOptions(config="tiny", iters=3, batch=4, seed=0), progress=False)
    c = train(TrainOptions(config="tiny", iters=3, batch=4, seed=1), progress=False)
    assert a.losses == b.losses and a.losses != c.losses


def test_resume_rejects_a_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="cannot resume"):
        train(TrainOptions(config="tiny", iters=2), resume=tmp_path, progress=False)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown UNet config"):
        TrainOptions(config="nope")
    with pytest.raises(ValueError):
        TrainOptions(batch=0)


def test_cli_train_writes_weights_that_load(tmp_path, capsys):
    out = tmp_path / "digits.safetensors"
    assert main(["train", "--config", "tiny", "--iters", "20", "--batch", "8", "--quiet", "-o", str(out),
                 "--checkpoint", str(tmp_path / "ck")]) == 0
    text = capsys.readouterr().out
    assert "trained tiny for 20 iterations" in text and str(out) in text
    card = json.loads((tmp_path / "digits.json").read_text())
    assert card["training"]["seed"] == 0 and card["command"].startswith("edmrt train --config tiny")
    assert card["machine"] and card["training"]["wall_time_s"] >= 0
    model = edmrt.load("digits", root=tmp_path)
    assert isinstance(model, edmrt.Model) and model.num_classes == 10 and model.sample_shape == (1, 8, 8)
    assert model.precond == edmrt.EDMPrecond(SIGMA_DATA)
    x = edmrt.Sampler(model, solver="euler", steps=4, backend="torch", device="cpu").sample([0, 1], cond=[3, 4])
    assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all())
    # Resume to the same total: no iteration left to run, and the weights exported again are the same, bit for bit.
    again = tmp_path / "again" / "digits.safetensors"
    assert main(["train", "--iters", "20", "--resume", str(tmp_path / "ck"), "--quiet", "-o", str(again)]) == 0
    assert "trained tiny for 20 iterations" in capsys.readouterr().out
    a, b = load_file(str(out)), load_file(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(again.with_suffix(".json").read_text())["training"]["iterations_done"] == 20
