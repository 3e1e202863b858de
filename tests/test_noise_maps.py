"""Given noise maps and the edit-friendly DDPM inversion (``edmrt.invert(kind="ddpm")``).

- The fused step takes a stage's noise z from a given map in place of its Philox draw, the same in the torch
  reference, the C++ core and Triton (interpreted on the CPU); a map is checked (shape, dtype, device, aliasing).
- An engine run with maps equal to its own Philox draws is the ordinary run (to the ulps by which the C++ core's
  normal transform differs from torch's): the maps reach the stage they are for.
- DDPM inversion of real digits (the test split, which no model saw) reconstructs them to float precision at any
  step count (Huberman-Spiegelglas et al. 2024: exact by construction); its maps are for one plan and refused by
  another; and sampling with the same maps under another class label is an edit that keeps the image's layout.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

import edmrt
from edmrt import kernels as Kn
from edmrt.kernels.philox import philox_normal, stage_stream

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _buffers(plan, shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    table = Kn.plan_table(plan, device)
    seeds = torch.tensor([11, 2 ** 35 + 1, 5, 7][:B], dtype=torch.int64, device=device)
    x = torch.randn(shape, generator=g).to(device)
    bufs = dict(x=x, x_eval=x.clone(), Y=torch.randn((plan.history,) + shape, generator=g).to(device),
                x_in=torch.full(shape, math.nan, device=device), sigma_in=torch.full((B,), math.nan, device=device))
    F = torch.randn(shape, generator=g).to(device)
    return table, seeds, bufs, F


def _impls(triton_ok):
    return ["reference", "cpp"] + (["triton"] if triton_ok else [])


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 61)])
def test_the_fused_step_takes_given_noise_in_every_implementation(shape, request):
    try:
        request.getfixturevalue("triton_device")
        triton_ok = True
    except pytest.skip.Exception:
        triton_ok = False
    plan = edmrt.plan("dpmpp_2m_sde", edmrt.make_sigmas("karras", 6)[:-1])
    z = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    for stage in (0, 3):
        outs = {}
        for impl in _impls(triton_ok):
            for given in (z, torch.zeros(shape), None):
                table, seeds, b, F = _buffers(plan, shape, "cpu", seed=stage)
                Kn.fused_step(table, stage, b["x"], b["x_eval"], F, b["Y"], b["x_in"], b["sigma_in"], seeds,
                              impl=impl, noise=given)
                outs[impl, None if given is None else float(given.abs().sum())] = b["x"].clone()
        ref_z, ref_0 = outs["reference", float(z.abs().sum())], outs["reference", 0.0]
        n = float(plan.n[stage])
        assert n > 0
        # z enters as n z: with z the state moves from the noiseless mean by exactly n z.
        torch.testing.assert_close(ref_z - ref_0, n * z, rtol=0, atol=1e-5)
        for impl in _impls(triton_ok):
            assert (outs[impl, float(z.abs().sum())] - ref_z).abs().max() <= 1e-6, impl
            assert (outs[impl, 0.0] - ref_0).abs().max() <= 1e-6, impl
            # Without a map the stage draws its Philox noise, which is not z.
            assert (outs[impl, None] - ref_z).abs().max() > 1e-2, impl


def test_given_noise_is_checked():
    plan = edmrt.plan("dpmpp_2m_sde", edmrt.make_sigmas("karras", 4)[:-1])
    shape = (2, 3, 4)
    table, seeds, b, F = _buffers(plan, shape, "cpu", seed=0)
    args = (table, 0, b["x"], b["x_eval"], F, b["Y"], b["x_in"], b["sigma_in"], seeds)
    for bad in (torch.zeros(2, 3, 5), torch.zeros(shape, dtype=torch.float64), [0.0] * 24):
        with pytest.raises(ValueError, match="noise"):
            Kn.fused_step(*args, impl="cpp", noise=bad)
    with pytest.raises(ValueError, match="noise"):   # a buffer the step writes is not a map
        Kn.fused_step(*args, impl="cpp", noise=b["x_eval"])
    step = Kn.Stepper(table, b["x"], b["x_eval"], b["Y"], b["x_in"], b["sigma_in"], seeds, impl="cpp")
    with pytest.raises(ValueError, match="noise"):
        step(0, F, torch.zeros(2, 3))


@pytest.fixture(scope="module")
def digits():
    from edmrt.lab.common import load_digits_split

    x, y = load_digits_split("test")
    return edmrt.load("digits"), torch.as_tensor(x[:24]).float(), [int(v) for v in y[:24]]


def test_maps_equal_to_the_philox_draws_are_the_ordinary_run(digits):
    model = digits[0]
    s = edmrt.Sampler(model, solver="dpmpp_2m_sde", steps=7, backend="torch")
    engine = s.engine(4, False)
    seeds = torch.tensor([3, 1 << 40, 12, 5])
    labels = torch.tensor([1, 2, 3, 4])
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80.0
    maps = torch.stack([philox_normal(seeds, stage_stream(k), (1, 8, 8)) for k in range(s.plan.stages)])
    plain = engine.run(seeds, labels, x_init=x0)
    given = engine.run(seeds, labels, x_init=x0, noise_maps=maps)
    # The C++ step draws the same Philox words; its float32 log / cos may differ from torch's by ulps.
    assert (plain - given).abs().max().item() <= 1e-5
    other = engine.run(seeds, labels, x_init=x0, noise_maps=maps.roll(1, dims=0))   # maps at the wrong stages
    assert (other - plain).abs().max() > 1e-2
    for bad in (maps[1:], maps.double(), maps.clone().fill_(math.nan)):
        with pytest.raises(ValueError, match="noise_maps must be a finite float32 tensor of shape"):
            engine.run(seeds, labels, x_init=x0, noise_maps=bad)


@pytest.mark.parametrize("steps", [3, 10, 25])
def test_ddpm_inversion_reconstructs_real_digits_to_float_precision(digits, steps):
    model, x, y = digits
    inv = edmrt.invert(model, x, kind="ddpm", steps=steps, cond=y, seed=steps)
    assert inv.kind == "ddpm" and inv.solver == "dpmpp_2m_sde" and inv.nfe == steps
    assert inv.noise_maps.shape == (steps, 24, 1, 8, 8) and inv.sigmas[-1] > 0 and inv.sigma_end == 80.0
    rec = edmrt.Sampler(model, **inv.sampler_args).sample(range(24), cond=y, inversion=inv)
    err = (rec - x).abs().max().item()
    assert err <= 1e-5, err   # measured 1.2e-7 (3 steps), 7e-9 (10), 4e-9 (25)
    # The start is the image plus t_0 noise, not the image: the maps carry it back.
    assert (inv.latents - x).std().item() > 40.0
    # Another seeds' Philox noise instead of the maps does not come back.
    free = edmrt.Sampler(model, **inv.sampler_args).sample(range(24), cond=y, x_init=inv.latents)
    assert (free - x).abs().max().item() > 0.1


def test_maps_fitted_by_one_step_implementation_hold_for_the_others(digits, triton_device):
    from edmrt.engine import Engine

    model, x, y = digits
    s = edmrt.Sampler(model, solver="dpmpp_2m_sde", steps=6, schedule=edmrt.make_sigmas("karras", 7)[:-1].tolist(),
                      backend="torch")
    seeds, labels = torch.arange(4), {"class_labels": torch.tensor(y[:4])}
    sigmas = s.plan.sigmas
    eps = torch.randn((sigmas.size - 1, 4, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x64 = x[:4].double()
    targets = torch.stack([x64 + float(t) * e for t, e in zip(sigmas[1:-1], eps[1:])] + [x64])
    start = (x64 + float(sigmas[0]) * eps[0]).float()
    engines = {impl: Engine(s.backend, s.plan, 4, (1, 8, 8), impl=impl, cond_inputs=model.cond,
                            null_label=model.null_label) for impl in ("reference", "cpp", "triton")}
    maps = {}
    for impl, engine in engines.items():
        req = engine.request(seeds, labels, x_init=start)
        maps[impl] = engine.fit_noise_maps(req, targets)
        assert (engine.run_request(dataclasses.replace(req, noise_maps=maps[impl])) - x[:4]).abs().max() <= 1e-5
    for impl, engine in engines.items():
        for other in engines:
            rec = engine.run(seeds, labels, x_init=start, noise_maps=maps[other])
            assert (rec - x[:4]).abs().max().item() <= 1e-5, (impl, other)
    with pytest.raises(ValueError, match="targets must be a finite floating-point tensor of shape"):
        engines["cpp"].fit_noise_maps(engines["cpp"].request(seeds, labels, x_init=start), targets[1:])
    with pytest.raises(ValueError, match="needs x_init"):
        engines["cpp"].fit_noise_maps(engines["cpp"].request(seeds, labels), targets)


def test_sampling_the_maps_under_another_label_is_an_edit(digits):
    model, x, y = digits
    inv = edmrt.invert(model, x, kind="ddpm", steps=20, cond=y)
    s = edmrt.Sampler(model, **inv.sampler_args)
    target = [(v + 1) % 10 for v in y]
    edited = s.sample(range(24), cond=target, inversion=inv)
    change = (edited - x).pow(2).mean().sqrt().item()
    assert 0.05 < change < 1.0, change    # moved, and not replaced by an unrelated sample
    fresh = s.sample(range(24), cond=target)
    assert (fresh - x).pow(2).mean().sqrt().item() > change


def test_ddpm_inversion_refuses_what_does_not_fit(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match="has stages without noise"):
        edmrt.invert(model, x[:2], kind="ddpm", solver="dpmpp_2m", steps=4, cond=y[:2])
    with pytest.raises(ValueError, match="has stages without noise"):
        edmrt.invert(model, x[:2], kind="ddpm", steps=4, cond=y[:2], eta=0.0)
    with pytest.raises(ValueError, match="must stop at a positive level"):
        edmrt.invert(model, x[:2], kind="ddpm", steps=2, schedule=[80.0, 1.0, 0.0], cond=y[:2])
    with pytest.raises(ValueError, match="seed must be an int"):
        edmrt.invert(model, x[:2], kind="ddpm", steps=2, cond=y[:2], seed=-1)
    inv = edmrt.invert(model, x[:2], kind="ddpm", steps=4, cond=y[:2], schedule=[80.0, 5.0, 0.5, 0.05, 0.01])
    assert inv.nfe == 4 and inv.sigmas[-1] == 0.01
    other = edmrt.invert(model, x[:2], kind="ddpm", steps=4, cond=y[:2]).sampler_args
    with pytest.raises(ValueError, match="noise maps are for the plan it fitted"):
        edmrt.Sampler(model, **other).sample([0, 1], cond=y[:2], inversion=inv)
    with pytest.raises(ValueError, match="the inversion holds 2 images; got 3 seeds"):
        edmrt.Sampler(model, **inv.sampler_args).sample([0, 1, 2], cond=y[:2] + [0], inversion=inv)
    rec = edmrt.Sampler(model, **inv.sampler_args).sample([0, 1], cond=y[:2], inversion=inv)
    assert (rec - x[:2]).abs().max().item() <= 1e-5
