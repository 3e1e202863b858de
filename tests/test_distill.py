"""Consistency distillation (edmrt.lab.distill, `edmrt distill`): the teacher's Heun step, a tiny run end to end,
resume, the student's model card and loading, and the shipped digits-cd student's measured rates."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

import edmrt  # noqa: E402
from edmrt.cli import main  # noqa: E402
from edmrt.lab.distill import (DistillOptions, heun_step, distill, export_student, karras_levels,  # noqa: E402
                           self_consistency, student_model)
from edmrt.models.bundled import WEIGHTS_DIR  # noqa: E402
from edmrt.lab.common import SIGMA_DATA, load_digits_split
from edmrt.lab.train import TrainOptions, train  # noqa: E402


@pytest.fixture(scope="module")
def tiny_teacher():
    r = train(TrainOptions(config="tiny", iters=60, batch=32, lr=3e-3, warmup=5, seed=2), progress=False)
    return edmrt.Model(r.ema, edmrt.EDMPrecond(SIGMA_DATA), sample_shape=(1, 8, 8), num_classes=10,
                       metadata={"name": "tiny-teacher"})


def test_karras_levels_are_edm_schedule_reversed():
    for N in (2, 7, 18):
        t = karras_levels(N, 0.002, 80.0)
        ref = edmrt.make_sigmas("karras", N, 0.002, 80.0)[:-1][::-1]
        np.testing.assert_allclose(t.numpy(), ref, rtol=1e-13)
        assert t[0] == 0.002 and t[-1] == 80.0 and bool((t.diff() > 0).all())


def test_teacherheun_step_is_third_order_locally():
    """One step of heun_step on the exact mixture denoiser (Identity preconditioning) against the exact ODE:
    local error O(h^3), so halving h divides it by ~8."""
    from edmrt.models import GaussianMixture

    g = GaussianMixture.random(K=4, D=64, seed=3)
    teacher = edmrt.Model(lambda x_in, c_noise, class_labels=None: g(x_in, c_noise), edmrt.Identity(), sample_shape=(1, 8, 8))
    gen = torch.Generator().manual_seed(11)
    x0 = g.sample(16, seed=4).reshape(16, 1, 8, 8) + 3.0 * torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    errs = []
    for h in (0.4, 0.2, 0.1):
        t_cur, t_next = torch.full((16,), 3.0, dtype=torch.float64), torch.full((16,), 3.0 - h, dtype=torch.float64)
        got = heun_step(teacher, x0, t_cur, t_next, None)
        exact = g.ode(x0, 3.0, 3.0 - h)
        errs.append(float((got - exact).norm()))
    assert 5.0 < errs[0] / errs[1] < 11.0 and 5.0 < errs[1] / errs[2] < 11.0, errs


def test_tiny_distillation_loss_falls_and_student_exports(tiny_teacher, tmp_path):
    opts = DistillOptions(iters=60, batch=32, lr=1e-3, warmup=5, N=8, loss="l2", seed=1)
    r = distill(tiny_teacher, opts, progress=False)
    assert r.step == 60 and len(r.losses) == 60 and all(np.isfinite(r.losses))
    # the per-batch loss is noisy (random levels); the self-consistency on one fixed probe batch must fall
    y, lab = load_digits_split("test")
    before = self_consistency(tiny_teacher.network, r.precond, tiny_teacher, y, lab, opts, seed=9)
    after = self_consistency(r.student, r.precond, tiny_teacher, y, lab, opts, seed=9)
    assert after < 0.8 * before, (before, after)  # measured 0.64
    # the target is an EMA of the student, the student moved away from the teacher
    sd_t, sd_s = tiny_teacher.network.state_dict(), r.student.state_dict()
    assert any(not torch.equal(sd_t[k], sd_s[k]) for k in sd_t if sd_t[k].is_floating_point())
    card = export_student(r, tiny_teacher, tmp_path / "digits-cd.safetensors", {"command": "test"},
                          {"levels": {"1": [80.0, 0.0], "2": [80.0, 1.5, 0.0]}, "fd_train": {"1": 9.0, "2": 8.0}})
    assert card["precond"] == {"name": "cm", "sigma_data": SIGMA_DATA, "sigma_min": 0.002}
    assert card["distillation"]["iterations_done"] == 60 and card["teacher"] == "tiny-teacher"
    assert json.loads((tmp_path / "digits-cd.json").read_text()) == json.loads(json.dumps(card))
    m = edmrt.load("digits-cd", root=tmp_path)
    assert m.precond == edmrt.ConsistencyPrecond(SIGMA_DATA, 0.002) and m.num_classes == 10
    s = edmrt.Sampler(m, backend="torch", device="cpu")           # the card's defaults: consistency, 2 steps
    assert (s.solver, s.steps, s.plan.nfe) == ("consistency", 2, 2)
    np.testing.assert_array_equal(s.plan.sigmas, [80.0, 1.5, 0.0])
    x = s.sample(range(6), cond=[0, 1, 2, 3, 4, 5])
    assert x.shape == (6, 1, 8, 8) and bool(torch.isfinite(x).all())
    # the loaded student is the exported EMA network, sample for sample
    direct = student_model(r, tiny_teacher, card)
    y = edmrt.Sampler(direct, backend="torch", device="cpu").sample(range(6), cond=[0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    # tcd on the same levels; an explicit solver without a card entry falls back to Karras' levels
    assert edmrt.Sampler(m, solver="tcd", backend="torch", device="cpu", gamma=0.3).plan.sigmas[1] == 1.5
    assert edmrt.Sampler(m, solver="euler", steps=2, backend="torch", device="cpu").plan.sigmas[1] == pytest.approx(0.002)


def test_select_levels_is_greedy_on_training_fd(tiny_teacher):
    """Each step count keeps the previous levels and adds the grid level with the lowest FD to the training split."""
    from edmrt.lab.distill import select_levels
    from edmrt.lab.metrics import digits_features, frechet_distance, load_classifier

    r = distill(tiny_teacher, DistillOptions(iters=2, batch=4, N=6), progress=False)
    m = student_model(r, tiny_teacher)
    out = select_levels(m, max_steps=3, grid=3, samples=40, progress=False)
    lv = out["levels"]
    assert lv["1"] == [80.0, 0.0] and lv["2"][:1] == [80.0] and lv["3"][:2] == lv["2"][:2]
    assert all(len(lv[k]) == int(k) + 1 and all(np.diff(lv[k]) < 0) for k in lv)
    # recompute the three candidates for step 2 and check the choice
    clf = load_classifier()
    x_train, y_train = load_digits_split("train")
    ref = digits_features(x_train, clf)
    grid = np.exp(np.linspace(np.log(80.0e-3), np.log(0.95 * 80.0), 3))
    fds = []
    for tau in grid:
        x = edmrt.Sampler(m, solver="consistency", steps=2, schedule=[80.0, float(tau), 0.0], backend="torch",
                          device="cpu").sample(range(10_000, 10_040), cond=y_train[:40].tolist())
        fds.append(frechet_distance(digits_features(x, clf), ref))
    assert lv["2"][1] == pytest.approx(grid[int(np.argmin(fds))]) and out["fd_train"]["2"] == pytest.approx(min(fds))


def test_resume_equals_uninterrupted(tiny_teacher, tmp_path):
    opts = dict(batch=8, N=6, warmup=2, seed=4)
    full = distill(tiny_teacher, DistillOptions(iters=6, **opts), progress=False)
    distill(tiny_teacher, DistillOptions(iters=3, **opts), checkpoint=tmp_path / "ck", progress=False)
    resumed = distill(tiny_teacher, DistillOptions(iters=6, **opts), resume=tmp_path / "ck", progress=False)
    assert resumed.step == 6 and resumed.losses == full.losses
    for name in ("student", "target", "ema"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="cannot resume"):
        distill(tiny_teacher, DistillOptions(iters=2), resume=tmp_path / "nothing", progress=False)
    # the improved-CT weighting 1 / (t_{n+1} - t_n) on the same draws: a different, finite loss
    weighted = distill(tiny_teacher, DistillOptions(iters=1, weighting="inverse_gap", **opts), progress=False)
    assert np.isfinite(weighted.losses[0]) and weighted.losses[0] != full.losses[0]


@pytest.mark.parametrize("kw,match", [
    (dict(iters=-1), "iters"), (dict(N=1), "N"), (dict(loss="lpips"), "loss"), (dict(weighting="snr"), "weighting"),
    (dict(mu=1.0), "mu"), (dict(sigma_min=0.0), "sigma_min"), (dict(batch=True), "batch"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillOptions(**kw)


def test_bad_teacher_and_data(tiny_teacher):
    with pytest.raises(ValueError, match="teacher must be an edmrt Model"):
        distill(lambda x, s: x, DistillOptions(iters=1), progress=False)
    with pytest.raises(ValueError, match="contradicts the network's num_classes=10"):  # the Model checks first
        edmrt.Model(tiny_teacher.network, tiny_teacher.precond, sample_shape=(1, 8, 8), num_classes=0)

    class Wrapped(torch.nn.Module):  # a network that does not state its classes
        def __init__(self, net, scale=1.0):
            super().__init__()
            self.net, self.scale = net, scale

        def forward(self, x, c_noise, class_labels=None):
            labels = class_labels
            return self.net(x, c_noise, labels) * self.scale

    uncond = edmrt.Model(Wrapped(tiny_teacher.network), tiny_teacher.precond, sample_shape=(1, 8, 8), num_classes=0)
    with pytest.raises(ValueError, match="class-conditional"):
        distill(uncond, DistillOptions(iters=1), progress=False)

    # A teacher whose output is NaN: stop at once, never train on it.
    poisoned = edmrt.Model(Wrapped(tiny_teacher.network, float("nan")), tiny_teacher.precond, sample_shape=(1, 8, 8),
                           num_classes=10)
    with pytest.raises(FloatingPointError, match="distillation loss is nan at iteration 1"):
        distill(poisoned, DistillOptions(iters=3, batch=4), progress=False)
    with pytest.raises(ValueError, match="data must be images"):
        distill(tiny_teacher, DistillOptions(iters=1), data=(torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.int64)),
                progress=False)


def test_cli_distill_two_iterations(tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert main(["distill", "--iters", "2", "--batch", "4", "--max-steps", "1", "--quiet", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "distilled digits for 2 iterations" in text and out.exists()
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["command"].startswith("edmrt distill --iters 2") and card["teacher"] == "digits"
    assert card["sampling"]["solver"] == "consistency" and "levels" not in card["sampling"]
    with pytest.raises(SystemExit):
        main(["distill", "--iters", "2", "--loss", "lpips"])              # argparse names the choices
    assert main(["distill", "--teacher", "cifar", "--iters", "1"]) == 2   # unknown bundled model: a clear error


def _card(name="digits-cd"):
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


def test_shipped_student_loads_with_its_card():
    m = edmrt.load("digits-cd")
    card = _card()
    assert m.precond == edmrt.ConsistencyPrecond(card["precond"]["sigma_data"], card["precond"]["sigma_min"])
    assert m.num_classes == 10 and m.sample_shape == (1, 8, 8) and not m.network.training
    for key in ("architecture", "command", "machine", "distillation", "metrics", "sampling", "teacher"):
        assert key in card
    assert card["teacher"] == "digits" and card["distillation"]["iterations_done"] == card["distillation"]["iters"]
    levels = card["sampling"]["levels"]
    assert sorted(levels) == ["1", "2", "3", "4"]
    for k, lv in levels.items():
        assert len(lv) == int(k) + 1 and lv[0] == 80.0 and lv[-1] == 0.0 and all(np.diff(lv) < 0)
    assert (WEIGHTS_DIR / "digits-cd.safetensors").stat().st_size < 10_000_000


@pytest.mark.parametrize("solver,steps", [("consistency", 1), ("consistency", 2), ("tcd", 2)])
def test_shipped_student_samples_at_the_card_rate(solver, steps):
    """Seeds 0..196 with test half A's labels (edmrt.lab.metrics.evaluate_digits): the card's accuracy and FD."""
    from edmrt.lab.metrics import evaluate_digits

    run = next(r for r in _card()["metrics"]["runs"] if r["solver"] == solver and r["steps"] == steps)
    got = evaluate_digits(edmrt.load("digits-cd"), solver, steps, **run["options"])
    assert got["nfe"] == steps and got["sigmas"] == run["sigmas"]
    assert got["class_accuracy"] >= run["class_accuracy"] - 0.02 and got["class_accuracy"] >= 0.9
    assert abs(got["fd_digits"] - run["fd_digits"]) <= 0.1 * run["fd_digits"]


def test_cli_sample_student_uses_its_card(tmp_path, capsys):
    out = tmp_path / "cd.png"
    assert main(["sample", "--model", "digits-cd", "--seeds", "0-9", "--backend", "torch", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "with consistency, 2 steps, NFE 2" in text and out.stat().st_size > 1000
    assert main(["sample", "--model", "digits-cd", "--seeds", "0-3", "--solver", "tcd", "--steps", "4", "-O",
                 "gamma=0.3", "--backend", "torch", "-o", str(out)]) == 0
    assert "with tcd, 4 steps, NFE 4" in capsys.readouterr().out


def test_quality_digits_runs_the_student():
    from edmrt.lab.quality_digits import goals, run_quality_digits

    res = run_quality_digits(solvers=("heun",), nfes=(35,), student_steps=(2,), blocks=1, progress=False)
    assert [(r["role"], r["solver"], r["nfe"]) for r in res["rows"]] == [
        ("teacher", "heun", 35), ("student", "consistency", 2), ("student", "tcd", 2)]
    g = goals(res)
    assert g["student_2_step_over_teacher_35"] == pytest.approx(res["rows"][1]["fd_digits"] / res["rows"][0]["fd_digits"])
