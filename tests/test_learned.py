"""Learned solvers (edmrt.optimize_solver): levels and multistep weights fitted by teacher matching, run as a Plan by
solve, Sampler and the CLI; its cost accounting, cache and argument checks."""
import json
import math

import numpy as np
import pytest
import torch

import edmrt
from edmrt.learned import LearnedSolver, card_path, load_learned, optimize_solver
from edmrt.models.gmm import GaussianMixture

SMALL = dict(budget=150_000, samples=256, heldout=64, warm_samples=64, reference_nfe=60)


@pytest.fixture(scope="module")
def gmm():
    # Not a mixture the defaults were tuned on: another seed, dimension and component count.
    return GaussianMixture.random(K=6, D=24, seed=31, spread=3.0)


class Counter:
    """The denoiser, counting samples through it."""

    def __init__(self, den):
        self.den, self.evaluations = den, 0

    def __call__(self, x, sigma):
        self.evaluations += x.shape[0]
        return self.den(x, sigma)


@pytest.fixture(scope="module")
def fitted(gmm):
    counter = Counter(gmm)
    return optimize_solver(counter, 5, (24,), seed=3, **SMALL), counter


def _rmse(x, exact):
    return float((x - exact).pow(2).mean().sqrt())


def test_the_learned_plan_beats_the_named_solvers_at_the_same_nfe_on_fresh_noise(fitted, gmm):
    opt, _ = fitted
    noise = torch.randn(400, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2024))
    exact = gmm.ode(80.0 * noise, 80.0, 0.0)
    x = edmrt.solve(gmm, noise, **opt.solve_kwargs)
    named = {s: _rmse(edmrt.solve(gmm, noise, solver=s, steps=5), exact) for s in ("dpmpp_2m", "dpmpp_3m", "ipndm")}
    named["heun(3 steps, 5 NFE)"] = _rmse(edmrt.solve(gmm, noise, solver="heun", steps=3), exact)
    assert opt.plan.nfe == 5 and opt.nfe == 5
    assert _rmse(x, exact) < 0.5 * min(named.values()), (_rmse(x, exact), named)
    # The fit's own numbers: it improved on its start, and the held-out error is what it reports.
    assert opt.heldout_loss < 0.5 * opt.initial_loss and math.isfinite(opt.loss)


def test_cost_counts_every_evaluation_and_backward_pass_within_the_budget(fitted):
    opt, counter = fitted
    assert opt.evaluations == counter.evaluations
    assert opt.cost == opt.evaluations + opt.backward <= SMALL["budget"]
    assert opt.reference_cost == (256 + 64) * 60
    assert opt.backward > 0 and opt.backward % 5 == 0
    costs = [c[0] for c in opt.curve]
    assert costs == sorted(costs) and costs[-1] <= opt.cost


def test_solve_runs_the_plan_from_its_first_level_and_the_fused_engine_agrees(fitted, gmm):
    opt, _ = fitted
    s = opt.plan.sigmas
    assert s[-1] == 0.0 and np.all(np.diff(s) < 0) and 0.002 <= s[-2] and s[0] <= 80.0
    noise = torch.randn(7, 24, dtype=torch.float64)
    ref = edmrt.execute(opt.plan, gmm, float(s[0]) * noise)
    assert torch.equal(edmrt.solve(gmm, noise, **opt.solve_kwargs), ref)
    f32 = lambda x, sigma: gmm(x.double(), sigma.double()).float()  # noqa: E731
    fused = edmrt.solve(f32, noise.float(), executor="fused", **opt.solve_kwargs)
    assert torch.allclose(fused.double(), ref, atol=2e-4 * float(ref.abs().max()))


def test_the_plan_and_card_round_trip_through_json_and_files(fitted, tmp_path):
    opt, _ = fitted
    assert edmrt.Plan.from_json(opt.plan.to_json()) == opt.plan
    path = opt.save(tmp_path / "gmm5.json")
    assert edmrt.Plan.load(path) == opt.plan
    back = load_learned(path)
    assert back.plan == opt.plan and back.cost == opt.cost and back.sigmas == opt.sigmas
    # A card whose plan was edited is refused, naming the file.
    card = json.loads(card_path(path).read_text())
    card["plan"]["b"][0][0] += 0.5
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="differs from its card"):
        load_learned(path)


def test_solve_refuses_a_model_plan_and_options_beside_a_plan(fitted, gmm):
    opt, _ = fitted
    noise = torch.randn(2, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match="without the solver options"):
        edmrt.solve(gmm, noise, plan=opt.plan, order=3)
    edm = edmrt.plan("heun", edmrt.make_sigmas("karras", 4), edmrt.EDMPrecond())
    with pytest.raises(ValueError, match="identity preconditioning"):
        edmrt.solve(gmm, noise, plan=edm)
    with pytest.raises(ValueError, match="must be an edmrt Plan"):
        edmrt.solve(gmm, noise, plan={"solver": "heun"})


def test_a_cached_fit_is_reused_and_a_corrupt_one_refitted(gmm, tmp_path):
    kw = dict(SMALL, budget=40_000, samples=64, heldout=32, warm_samples=32, cache=tmp_path)
    first = optimize_solver(gmm, 3, (24,), **kw)
    files = list(tmp_path.glob("learned-*.json"))
    assert len(files) == 1
    counter = Counter(gmm)
    with pytest.raises(ValueError, match="weights can be hashed"):
        optimize_solver(counter, 3, (24,), **kw)   # a bare callable has no weights to key a cache by
    again = optimize_solver(gmm, 3, (24,), **kw)
    assert again.plan == first.plan and again.seconds == first.seconds   # read, not refitted
    other = optimize_solver(gmm, 3, (24,), **dict(kw, seed=1))            # another option: another entry
    assert len(list(tmp_path.glob("learned-*.json"))) == 2 and other.plan != first.plan
    doc = json.loads(files[0].read_text())
    doc["card"]["loss"] = 0.0                                              # tampered: its checksum fails
    files[0].write_text(json.dumps(doc))
    refit = optimize_solver(gmm, 3, (24,), **kw)
    assert refit.loss == first.loss and json.loads(files[0].read_text())["card"]["loss"] == first.loss
    files[0].write_text("{not json")
    assert optimize_solver(gmm, 3, (24,), **kw).plan == first.plan


@pytest.mark.parametrize("kw, match", [
    (dict(nfe=0), "nfe must be an integer >= 1"),
    (dict(history=5), r"history must be an integer in \[1, 4\]"),
    (dict(consistency="loose"), "consistency must be 'kept' or 'relaxed'"),
    (dict(shape=(0,)), "shape must be a non-empty sequence of positive integers"),
    (dict(shape=None), "shape .* is required"),
    (dict(reference_solver="rk45"), "rk45"),
    (dict(budget=400), "leaves nothing for the fit"),
    (dict(warm_share=1.0), r"warm_share must be a number in \[0, 1\)"),
    (dict(sigma_min=-1.0), "sigma_min"),
    (dict(guidance=2.0), "for an edmrt.Model"),
])
def test_bad_arguments_are_refused_naming_them(gmm, kw, match):
    args = dict(nfe=3, shape=(24,), budget=20_000, samples=16, heldout=8, warm_samples=8, reference_nfe=20)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        optimize_solver(gmm, **args)


def test_a_denoiser_returning_nan_is_refused():
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        optimize_solver(lambda x, s: x * float("nan"), 3, (4,), budget=20_000, samples=8, heldout=4, reference_nfe=10)


def test_learned_solver_card_rejects_other_documents():
    with pytest.raises(ValueError, match="not a learned-solver card"):
        LearnedSolver.from_card({"format": "edmrt.plan"})


@pytest.fixture(scope="module")
def digits_fit():
    model = edmrt.load("digits")
    for p in list(model.network.parameters())[::2]:  # some trainable, some not: each keeps its flag
        p.requires_grad_(True)
    opt = optimize_solver(model, 4, cond=torch.tensor([3, 8]), guidance=1.5, seed=5, budget=30_000, samples=32,
                          heldout=16, warm_samples=16, reference_nfe=30)
    yield model, opt
    for p in model.network.parameters():  # as loaded, for the tests after these
        p.requires_grad_(False)


def test_a_model_fit_builds_the_plan_for_its_preconditioning_and_the_sampler_runs_it(digits_fit):
    model, opt = digits_fit
    assert opt.plan.precond == model.precond.to_dict() and opt.plan.nfe == 4
    # Only the solver was trained: the model's weights keep their requires_grad and gained no .grad.
    flags = [p.requires_grad for p in model.network.parameters()]
    assert flags == [i % 2 == 0 for i in range(len(flags))]
    assert all(p.grad is None for p in model.network.parameters())
    sampler = edmrt.Sampler(model, backend="torch", **opt.sampler_args)
    labels = [3, 8, 3]
    z = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    t0 = float(opt.plan.sigmas[0])
    x = sampler.sample([0, 1, 2], cond=labels, guidance=1.5, x_init=t0 * z, output="latent")
    # The float64 reference loop on the same network under the same guidance (F = F_u + w (F_c - F_u)).
    net = model.network.double()
    try:
        lab, null = torch.tensor(labels), torch.full((3,), model.null_label)

        def F(x_in, c_noise):
            c = c_noise.reshape(-1)
            f_c, f_u = net(x_in, c, class_labels=lab), net(x_in, c, class_labels=null)
            return f_u + 1.5 * (f_c - f_u)
        with torch.no_grad():
            ref = edmrt.execute(opt.plan, F, t0 * z.double())
    finally:
        model.network.float()
    assert torch.allclose(x.double().cpu(), ref, atol=1e-3), float((x.double() - ref).abs().max())
    # Another backend, the same plan: ONNX Runtime with the C++ fused step.
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    ort = edmrt.Sampler(model, backend="onnxruntime", **opt.sampler_args)
    y = ort.sample([0, 1, 2], cond=labels, guidance=1.5, x_init=t0 * z, output="latent")
    assert torch.allclose(y.double().cpu(), ref, atol=1e-3), float((y.double() - ref).abs().max())


def test_the_cli_fits_writes_plan_card_and_curve_and_samples_with_learned_file(tmp_path, capsys):
    from edmrt.cli import main

    out = tmp_path / "gmm3.json"
    assert main(["fit-solver", "--model", "gmm", "--dim", "6", "--nfe", "3", "--budget", "40000", "--samples", "64",
                 "--heldout", "32", "--reference-nfe", "40", "--quiet", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "learned a 3-evaluation solver" in said and out.is_file() and card_path(out).is_file()
    assert (tmp_path / "gmm3_loss.png").stat().st_size > 1000
    assert edmrt.Plan.load(out).nfe == 3
    assert main(["sample", "--model", "gmm", "--dim", "6", "--solver", f"learned:{out}"]) == 0
    said = capsys.readouterr().out
    assert "NFE 3" in said and "RMSE" in said
    assert main(["sample", "--model", "gmm", "--dim", "6", "--solver", f"learned:{out}", "--steps", "5"]) == 2
    assert "drop --steps" in capsys.readouterr().err
    assert main(["sample", "--model", "gmm", "--solver", f"learned:{tmp_path / 'none.json'}"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_sample_runs_a_digits_plan_from_learned_file(digits_fit, tmp_path, capsys):
    from edmrt.cli import main

    _, opt = digits_fit
    path = opt.save(tmp_path / "digits4.json")
    grid = tmp_path / "grid.png"
    assert main(["sample", "--solver", f"learned:{path}", "--seeds", "0-3", "--backend", "torch", "-o", str(grid)]) == 0
    assert "NFE 4" in capsys.readouterr().out and grid.stat().st_size > 0
    gmm_plan = optimize_solver(GaussianMixture.random(K=2, D=64, seed=0), 3, (64,), budget=20_000, samples=16,
                               heldout=8, warm_samples=8, reference_nfe=20).plan
    gmm_plan.save(tmp_path / "identity.json")
    assert main(["sample", "--solver", f"learned:{tmp_path / 'identity.json'}", "--seeds", "0-1"]) == 2
    assert "preconditioning" in capsys.readouterr().err


def test_quality_gains_a_learned_row_beside_the_named_solvers(tmp_path, capsys):
    from edmrt.cli import main

    stem = tmp_path / "q"
    assert main(["quality", "--dims", "2", "--nfe", "5", "--solvers", "dpmpp_2m", "ipndm", "--samples", "300",
                 "--learned", "--no-plot", "--quiet", "-o", str(stem)]) == 0
    rows = {r["solver"]: r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]}
    assert rows["learned"]["nfe"] == 5 and rows["learned"]["fit_cost"] <= 1_000_000
    assert rows["learned"]["rmse"] < min(rows["dpmpp_2m"]["rmse"], rows["ipndm"]["rmse"])
    assert "learned" in capsys.readouterr().out
    assert main(["quality", "--learned", "x.json", "--nfe", "5", "-o", str(stem)]) == 2
    assert main(["quality", "--model", "digits", "--learned", "-o", str(stem)]) == 2


def test_digits_quality_runs_a_learned_plan_as_one_more_row(digits_fit, tmp_path):
    from edmrt.lab.quality_digits import run_quality_digits

    _, opt = digits_fit
    path = opt.save(tmp_path / "digits4.json")
    res = run_quality_digits("digits", None, nfes=(4,), solvers=("heun",), blocks=1, progress=False, learned=[path])
    learned = [r for r in res["rows"] if r["role"] == "learned"]
    assert len(learned) == 1 and learned[0]["nfe"] == 4 and learned[0]["solver"] == "learned:digits4"
    assert math.isfinite(learned[0]["fd_train"]) and 0.0 <= learned[0]["class_accuracy"] <= 1.0


def test_a_fit_in_chunks_has_the_gradient_and_cost_of_one_batch(gmm):
    """``batch`` bounds the rows per solve: the loss and gradient are accumulated over chunks, equal to one batch's up
    to rounding, and so is the cost.  The first iterates agree (the second is one L-BFGS step along the first
    gradient); later ones drift by rounding, which the fit's ill-conditioned late steps amplify, so the two plans
    agree in quality, not bit for bit."""
    kw = dict(budget=30_000, samples=64, heldout=32, warm_samples=64, warm_share=0.0, reference_nfe=30, seed=2)
    whole, chunked = optimize_solver(gmm, 3, (24,), **kw), optimize_solver(gmm, 3, (24,), batch=20, **kw)
    assert chunked.evaluations == whole.evaluations and chunked.backward == whole.backward
    assert chunked.initial_loss == pytest.approx(whole.initial_loss, rel=1e-12)
    for a, b in zip(chunked.curve[:3], whole.curve[:3]):
        assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-9)
    assert chunked.heldout_loss == pytest.approx(whole.heldout_loss, rel=0.1)
