"""The bundled digits teacher: edmrt.load, its model card's measured rates, load errors, `edmrt sample`."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

pytest.importorskip("sklearn")

import edmrt  # noqa: E402
from edmrt.cli import main  # noqa: E402
from edmrt.models.bundled import WEIGHTS_DIR  # noqa: E402


def _card(name="digits"):
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


def test_shipped_model_loads_with_its_card():
    m = edmrt.load("digits")
    assert isinstance(m, edmrt.Model)
    assert m.num_classes == 10 and m.null_label == 10 and m.sample_shape == (1, 8, 8)
    card = _card()
    assert m.precond == edmrt.EDMPrecond(card["precond"]["sigma_data"])
    for key in ("architecture", "command", "machine", "training", "metrics"):
        assert key in card
    assert card["training"]["seed"] == 0 and card["training"]["final_loss_mean_last_100"] > 0
    assert (WEIGHTS_DIR / "digits.safetensors").stat().st_size < 10_000_000
    assert not m.network.training
    s = edmrt.Sampler(m, backend="torch", device="cpu")  # the card's sampling defaults: Heun, 18 steps, Karras
    assert (s.solver, s.steps, s.plan.nfe) == ("heun", 18, 35) == (card["sampling"]["solver"],
                                                                   card["sampling"]["steps"], 35)
    assert s.plan.sigmas[0] == 80.0 and s.plan.sigmas[-2] == pytest.approx(0.002)


def test_conditional_samples_are_classified_at_the_card_rate():
    """Heun, 18 steps (35 NFE), seeds 0..196 with test half A's labels: the card's class accuracy and FD."""
    from edmrt.lab.metrics import evaluate_digits

    run = next(r for r in _card()["metrics"]["runs"] if r["solver"] == "heun" and r["guidance"] is None)
    got = evaluate_digits(edmrt.load("digits"), "heun", 18)
    assert got["nfe"] == 35 == run["nfe"]
    assert got["class_accuracy"] >= run["class_accuracy"] - 0.02
    assert got["class_accuracy"] >= 0.9
    assert abs(got["fd_digits"] - run["fd_digits"]) <= 0.1 * run["fd_digits"]
    assert got["fd_digits_floor"] == pytest.approx(run["fd_digits_floor"], rel=1e-6)


def test_guided_samples_follow_their_class():
    m = edmrt.load("digits")
    x = edmrt.Sampler(m, solver="heun", steps=8, backend="torch", device="cpu").sample(range(20), cond=3, guidance=2.0)
    from edmrt.lab.metrics import class_accuracy

    assert class_accuracy(x, [3] * 20) >= 0.9


@pytest.fixture
def weights_copy(tmp_path):
    shutil.copy(WEIGHTS_DIR / "digits.json", tmp_path / "digits.json")
    shutil.copy(WEIGHTS_DIR / "digits.safetensors", tmp_path / "digits.safetensors")
    return tmp_path


def test_load_copy_equals_shipped(weights_copy):
    a, b = edmrt.load("digits"), edmrt.load("digits", root=weights_copy)
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'cifar'"):
        edmrt.load("cifar")
    with pytest.raises(ValueError, match="unknown model"):
        edmrt.load(None)


def test_load_truncated_weights(weights_copy):
    p = weights_copy / "digits.safetensors"
    p.write_bytes(p.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        edmrt.load("digits", root=weights_copy)


def test_load_pickle_is_refused_never_unpickled(weights_copy):
    (weights_copy / "digits.safetensors").write_bytes(pickle.dumps({"x": torch.zeros(3)}))
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        edmrt.load("digits", root=weights_copy)


def test_load_mismatched_weights(weights_copy):
    from safetensors.torch import save_file

    from edmrt.models import build_unet

    save_file(build_unet("tiny").state_dict(), str(weights_copy / "digits.safetensors"))
    with pytest.raises(ValueError, match="does not fit its model card's architecture"):
        edmrt.load("digits", root=weights_copy)


def test_load_missing_or_bad_card(weights_copy):
    (weights_copy / "digits.safetensors").unlink()
    with pytest.raises(ValueError, match="does not exist"):
        edmrt.load("digits", root=weights_copy)
    (weights_copy / "digits.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        edmrt.load("digits", root=weights_copy)
    (weights_copy / "digits.json").write_text(json.dumps({"format": "edmrt-model-card-1"}))
    with pytest.raises(ValueError, match="incomplete or invalid"):
        edmrt.load("digits", root=weights_copy)
    (weights_copy / "digits.json").unlink()
    with pytest.raises(ValueError, match="cannot be read"):
        edmrt.load("digits", root=weights_copy)


def test_cli_sample_digits_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--seeds", "0-9", "--solver", "euler", "--steps", "4", "--backend", "torch",
                 "--guidance", "1.5", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "images/s" in text and str(out) in text and out.stat().st_size > 1000
    assert main(["sample", "--seeds", "0-1", "--class", "7", "--steps", "2", "--solver", "euler", "--backend",
                 "torch", "-o", str(out)]) == 0
    assert main(["sample", "--model", "nope"]) == 2
    assert main(["sample", "--seeds", "a-b"]) == 2


def test_cli_sample_gmm_still_reports_the_ode_error(capsys):
    assert main(["sample", "--model", "gmm", "--batch", "4", "--dim", "2", "--steps", "6"]) == 0
    assert "error against it: RMSE" in capsys.readouterr().out
