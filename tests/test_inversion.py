"""Plans that run upward and ODE inversion (``edmrt.invert``): the probability-flow ODE from an image to noise by the
same solvers, plans, engine and fused step as sampling.

- On the exact Gaussian mixture, every upward solver's endpoint converges to the exact upward ODE solution at its
  order (error ratio per doubling of steps, 16 -> 32 -> 64).
- The fused step (C++ on the CPU) runs an upward plan as the float64 reference does; the plan round-trips through
  JSON and the C reader.
- diffusers' ``DPMSolverMultistepInverseScheduler`` loop on a tiny UNet2DModel equals ``dpmpp_2m`` on its sigmas
  with ``first_order_last`` below 15 steps (its lower_order_final): measured 2.0e-6 (6 steps), 1.4e-6 (20).
- Inverting real digits (the test split, which no model saw) and sampling back reconstructs them with an error that
  falls with the steps.
"""
import math

import numpy as np
import pytest
import torch

import edmrt
from edmrt import schedules as S

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
from edmrt.models import GaussianMixture
from edmrt.solvers import UPWARD_SOLVERS


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(K=4, D=16, seed=1)


def test_upward_solvers_converge_at_their_order_to_the_exact_ode(mixture):
    x0 = mixture.sample(64, seed=2)
    lo, hi = 0.05, 20.0
    exact = mixture.ode(x0, lo, hi)
    # Measured ratios (16 -> 32, 32 -> 64): euler 2.0, heun 4.0, dpmpp_2m 3.9, dpmpp_3m 4.6-5.1, ipndm 4.7-5.4,
    # lms 35-40 (its start is first order; from there it is high order).
    least = {"euler": 1.8, "heun": 3.5, "dpmpp_2m": 3.5, "dpmpp_3m": 3.5, "ipndm": 3.5, "lms": 3.5}
    for solver in UPWARD_SOLVERS:
        errs = []
        for n in (16, 32, 64):
            plan = edmrt.plan(solver, S.upward(edmrt.make_sigmas("karras", n, lo, hi), lo))
            assert plan.direction == "up"
            x = edmrt.execute(plan, lambda x, sig: mixture.denoise(x, sig), x0.clone())
            errs.append((x - exact).pow(2).mean().sqrt().item())
        ratios = [errs[0] / errs[1], errs[1] / errs[2]]
        assert min(ratios) >= least[solver], (solver, errs, ratios)


def test_other_solvers_refuse_to_run_upward():
    up = S.upward(edmrt.make_sigmas("karras", 8), 0.002)
    for solver in sorted(set(edmrt.SOLVERS) - set(UPWARD_SOLVERS)):
        with pytest.raises(ValueError, match=rf"solver '{solver}' does not run a schedule upward"):
            edmrt.plan(solver, up)
    with pytest.raises(ValueError, match="with S_churn does not run a schedule upward"):
        edmrt.plan("euler", up, S_churn=1.0)


def test_upward_schedules_are_checked():
    np.testing.assert_array_equal(S.upward([80.0, 10.0, 0.5, 0.0], 0.002), [0.002, 0.5, 10.0, 80.0])
    np.testing.assert_array_equal(S.upward([80.0, 10.0, 0.002, 0.0], 0.002), [0.002, 10.0, 80.0])
    for bad, match in (([0.0, 1.0, 2.0], "runs upward"), ([0.5, 2.0, 2.0], "strictly ascending"),
                       ([0.5, 2.0, 1.0], "strictly ascending"), ([2.0, 2.0], "strictly descending"),
                       ([1e-9, 2.0], r"runs upward .* must lie in")):
        with pytest.raises(ValueError, match=match):
            S.check_sigmas(bad)
    with pytest.raises(ValueError, match="descending"):
        S.upward([0.1, 1.0], 0.002)


def test_the_fused_step_runs_an_upward_plan_as_the_reference(mixture):
    """The C++ fused step through an Engine (float32) against the float64 reference loop, with guidance off."""
    plan = edmrt.plan("dpmpp_2m", S.upward(edmrt.make_sigmas("karras", 12, 0.05, 20.0), 0.05))
    x0 = mixture.sample(8, seed=3).float()
    net = edmrt.backends.CallableBackend(lambda x, sig: mixture.denoise(x.double(), sig.double()).float(),
                                         pass_through=True)
    engine = edmrt.Engine(net, plan, 8, (16,), "cpu", impl="cpp")
    got = engine.run(torch.arange(8), x_init=x0)
    want = edmrt.execute(plan, lambda x, sig: mixture.denoise(x, sig), x0.double())
    assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    again = edmrt.Plan.from_json(plan.to_json())
    assert again.direction == "up" and np.array_equal(again.sigmas, plan.sigmas)


def test_dpm_solver_inverse_scheduler_parity():
    diffusers = pytest.importorskip("diffusers")
    from edmrt.adapters.diffusers import from_diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=3,
                                 out_channels=3, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = from_diffusers(unet, diffusers.DPMSolverMultistepScheduler(**sd))
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for steps in (6, 20):
        inv = diffusers.DPMSolverMultistepInverseScheduler(**sd)
        inv.set_timesteps(steps)
        x = img.clone()
        for t in inv.timesteps:
            with torch.no_grad():
                x = inv.step(unet(inv.scale_model_input(x, t), t).sample, t, x).prev_sample
        sig = inv.sigmas.double().numpy()   # sigma(0) = 0.029 up to sigma_max: the image is the state at sigma(0)
        theirs = x * math.sqrt(sig[-1] ** 2 + 1)   # its VP state, in edmrt's VE form
        plan = edmrt.plan("dpmpp_2m", sig, model.precond, first_order_last=steps < 15)
        ours = edmrt.Sampler(model, plan=plan, backend="torch", device="cpu").sample(
            [0, 1], x_init=img * math.sqrt(sig[0] ** 2 + 1), output="latent")
        err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        assert err <= 1e-5, (steps, err)
        other = edmrt.Sampler(model, plan=edmrt.plan("euler", sig, model.precond), backend="torch",
                              device="cpu").sample([0, 1], x_init=img * math.sqrt(sig[0] ** 2 + 1), output="latent")
        assert ((other - theirs).abs().max() / theirs.abs().max()).item() > 100 * 1e-5  # the check can fail


@pytest.fixture(scope="module")
def digits():
    from edmrt.lab.common import load_digits_split

    x, y = load_digits_split("test")
    return edmrt.load("digits"), torch.as_tensor(x[:24]).float(), [int(v) for v in y[:24]]


def test_inverting_real_digits_and_sampling_back_reconstructs_them(digits):
    model, x, y = digits
    errs = {}
    for steps in (5, 20, 50):
        inv = edmrt.invert(model, x, solver="dpmpp_2m", steps=steps, cond=y, backend="torch")
        assert inv.nfe == steps - 1 and inv.latents.shape == x.shape and inv.sigma_end == 80.0
        rec = edmrt.Sampler(model, backend="torch", **inv.sampler_args).sample(range(24), cond=y, inversion=inv)
        errs[steps] = (rec - x).pow(2).mean().sqrt().item()
    # Measured (RMSE, images in [-1, 1]): 0.22 / 0.0068 / 0.0006.
    assert errs[5] > errs[20] > errs[50] and errs[50] < 0.01, errs


def test_invert_and_reconstruct_refuse_what_does_not_fit(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match="kind must be one of"):
        edmrt.invert(model, x, kind="sde")
    with pytest.raises(ValueError, match="does not run upward"):
        edmrt.invert(model, x, solver="tcd")
    with pytest.raises(ValueError, match=r"images must be floating point .* of shape \(N, 1, 8, 8\)"):
        edmrt.invert(model, x[:, :, :4], cond=y)
    with pytest.raises(ValueError, match="finite"):
        edmrt.invert(model, x.clone().fill_(float("nan")), cond=y)
    with pytest.raises(ValueError, match=r"of shape \(N, 1, 8, 8\)"):   # latents are checked as images are
        edmrt.invert(model, x[:, :, :4], cond=y, latents=True)
    with pytest.raises(ValueError, match="finite"):
        edmrt.invert(model, x.clone().fill_(float("inf")), cond=y, latents=True)
    inv = edmrt.invert(model, x[:2], steps=4, cond=y[:2], backend="torch")
    with pytest.raises(ValueError, match="inversion ended at sigma = 80"):
        edmrt.Sampler(model, plan=edmrt.plan("euler", [40.0, 1.0, 0.0], model.precond),
                      backend="torch").sample([0, 1], cond=y[:2], inversion=inv)
    with pytest.raises(ValueError, match="without noise or x_init"):
        edmrt.Sampler(model, backend="torch", **inv.sampler_args).sample([0, 1], cond=y[:2], inversion=inv,
                                                                          noise=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="plan is the whole sampler"):
        edmrt.Sampler(model, plan=edmrt.plan("euler", [40.0, 1.0, 0.0], model.precond), steps=3)
    with pytest.raises(ValueError, match="built for the preconditioning"):
        edmrt.Sampler(model, plan=edmrt.plan("euler", [40.0, 1.0, 0.0]))


def test_edmrt_invert_draws_the_reconstruction_and_refuses_bad_arguments(tmp_path, capsys):
    from PIL import Image

    from edmrt.cli import main

    out = tmp_path / "inv.png"
    assert main(["invert", "--digits", "0-3", "--steps", "6", "--backend", "torch", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 1000 and "RMSE per image" in text and "(5 NFE)" in text
    assert main(["invert", "--kind", "ddpm", "--digits", "0-3", "--steps", "6", "--backend", "torch", "-o",
                 str(out)]) == 0
    mean = float(capsys.readouterr().out.split("(mean ")[1].split(",")[0])
    assert mean < 1e-5   # DDPM inversion: exact
    Image.fromarray(((torch.rand(8, 8) * 255).to(torch.uint8)).numpy()).save(tmp_path / "a.png")
    assert main(["invert", "--image", str(tmp_path / "a.png"), "--steps", "4", "--backend", "torch", "-o",
                 str(tmp_path / "b.png")]) == 0
    Image.fromarray(np.zeros((5, 8), dtype=np.uint8)).save(tmp_path / "small.png")
    for argv in (["--solver", "tcd"], ["--digits", "5000"], ["--image", str(tmp_path / "small.png")],
                 ["--steps", "0"], ["-o", str(tmp_path)]):
        with pytest.raises(SystemExit) if argv[0] == "--steps" else _no_raise():
            assert main(["invert", "--backend", "torch", *argv]) == 2


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
