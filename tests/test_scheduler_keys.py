"""Every config key of every scheduler ``from_diffusers`` accepts, walked: honoured or refused by name, never ignored.

For each scheduler class and each key of its config, every other value of ``ALT`` that diffusers itself runs is
tried (the rest of the config at the class's defaults; DDIM with ``clip_sample=False``, since its default clips,
which is refused: ``test_x0_clipping_is_refused_by_name``).  Then either ``from_diffusers`` (or ``sampler_args``,
which follows the scheduler's own timesteps) raises ValueError naming the key, or the key is honoured:

- a scheduler whose method edmrt runs (the card's default solver): ``Sampler(model, **sampler_args(sched))`` equals
  diffusers' own loop (``scale_model_input``, the network, ``step``) on the same network and latents, with the same
  fresh noise where the method draws it (diffusers' ``randn_tensor`` returns edmrt's Philox draws: draw k is stream
  k + 1, the noise the engine adds after stage k).  The pipelines' state is the VP x / sqrt(sigma^2 + 1) for the
  discrete schedulers but Euler-type ones: compared in edmrt's VE state.  TCD stops at timestep 0, not at x0: its x0
  is recomputed from the last step's inputs with the scheduler's own rule (as tests/test_diffusers.py does);
- a scheduler whose method edmrt does not run: the model gets no default solver, the preconditioning is built from
  the scheduler's own alphas_cumprod and prediction type, and a schedule key's levels are the scheduler's own
  (``scheduler_sigmas``) or refused there by name.

The network is a tiny random ``UNet2DModel`` (3 x 8 x 8), 6 steps.  Tolerance: max abs difference over the largest
|x|, 1e-4.  Measured 1e-7 .. 2e-6 for most cases; x0-predicting networks reach 3.4e-5 (the random network's
x0 output is the state itself, so the float32 rounding of its inputs passes straight through); a schedule from
sigma_max 2e4 (squaredcos_cap_v2 betas; states near 6e4) 2.1e-4 against 1e-3 (there another method is 0.16
away); another method is
2e-3 .. 1e2 away (the divergences this walk found: DPM-Solver's order 3 and solver_type='heun', UniPC's orders 1
and 3 without their options, exponential and beta sigmas' fractional timesteps, DDIM's x0 clipping).
"""
import importlib
import math
import warnings

import numpy as np
import pytest
import torch

import edmrt

diffusers = pytest.importorskip("diffusers", reason="diffusers==0.42.1 (the 'test' extra) is not installed")

from edmrt.adapters.diffusers import (SCHEDULER_KEYS, SUPPORTED_SCHEDULERS, from_diffusers, initial_noise,  # noqa: E402
                                      keeps_ve_state, sampler_args, scheduler_sigmas)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-4   # 1e-3 from sigma_max > 1000 (below)
STEPS = 6
SEEDS = [3, 4]
SHAPE = (3, 8, 8)
CLASSES = list(SUPPORTED_SCHEDULERS)
BASE = {"DDIMScheduler": {"clip_sample": False}}
# Values other than the defaults, per key (a value equal to a class's default is not a case for that class).
ALT = {
    "num_train_timesteps": [500], "beta_start": [0.0003], "beta_end": [0.015],
    "beta_schedule": ["scaled_linear", "squaredcos_cap_v2"], "trained_betas": [np.linspace(1e-4, 2e-2, 1000).tolist()],
    "prediction_type": ["epsilon", "v_prediction", "sample"], "rescale_betas_zero_snr": [True], "sigma_data": [0.7],
    "timestep_scaling": [5.0], "timestep_spacing": ["linspace", "leading", "trailing"], "steps_offset": [1],
    "use_karras_sigmas": [True], "use_exponential_sigmas": [True], "use_beta_sigmas": [True], "use_lu_lambdas": [True],
    "sigma_schedule": ["exponential", "karras"], "rho": [5.0], "sigma_min": [0.05], "sigma_max": [20.0],
    "set_alpha_to_one": [False, True], "final_sigmas_type": ["sigma_min", "zero"], "original_inference_steps": [20],
    "interpolation_type": ["log_linear"], "timestep_type": ["continuous"], "lambda_min_clipped": [-5.0],
    "skip_prk_steps": [True], "use_flow_sigmas": [True], "flow_shift": [3.0], "shift_terminal": [0.1],
    "use_dynamic_shifting": [True], "time_shift_type": ["linear"], "shift": [3.0], "base_shift": [0.3],
    "max_shift": [1.5], "base_image_seq_len": [128], "max_image_seq_len": [1024], "invert_sigmas": [True],
    "stochastic_sampling": [True],
    "solver_order": [1, 2, 3], "algorithm_type": ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"],
    "solver_type": ["midpoint", "heun", "bh1", "bh2"], "lower_order_final": [False, True], "euler_at_final": [True],
    "predict_x0": [False], "solver_p": [None], "disable_corrector": [[1]], "corrector_order": [1],
    "predictor_order": [1], "tau_func": [None], "noise_sampler_seed": [7], "variance_type": ["learned_range"],
    "clip_sample": [True, False], "clip_sample_range": [0.5], "thresholding": [True],
    "dynamic_thresholding_ratio": [0.9], "sample_max_value": [2.0],
}


def _config(cls: str, **kw) -> dict:
    return {**BASE.get(cls, {}), **kw}


def _runs_in_diffusers(cls: str, cfg: dict) -> bool:
    with warnings.catch_warnings():   # diffusers' own deprecation warnings, at collection
        warnings.simplefilter("ignore")
        try:
            getattr(diffusers, cls)(**cfg).set_timesteps(STEPS)
            return True
        except Exception:   # a combination diffusers itself refuses is no config a user can have
            return False


def _cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield from _walk()


def _walk():
    for cls in CLASSES:
        default = getattr(diffusers, cls)(**_config(cls)).config
        for key in (k for k in default if not k.startswith("_")):
            for value in ALT.get(key, []):
                cfg = _config(cls, **{key: value})
                if value != default[key] and _runs_in_diffusers(cls, cfg):
                    yield pytest.param(cls, key, value, id=f"{cls}-{key}={value!r:.20}")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=3,
                                 out_channels=3, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def _diffusers_loop(unet, sched, L: torch.Tensor) -> torch.Tensor:
    """diffusers' own loop from latents L, with edmrt's Philox draws as its fresh noise; the final state in edmrt's
    VE form (TCD: the x0 of its last step)."""
    sched.set_timesteps(STEPS)
    module = importlib.import_module(type(sched).__module__)
    draws, count = edmrt.SeededNoise(SEEDS, SHAPE, torch.float32), []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        count.append(shape)
        return draws(len(count)).to(dtype)

    patched = getattr(module, "randn_tensor", None)
    if patched is not None:
        module.randn_tensor = randn_tensor
    try:
        x = L * getattr(sched, "init_noise_sigma", 1.0)   # flow matching: none (its state starts at the noise)
        for t in sched.timesteps:
            with torch.no_grad():
                out = unet(sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x, t).sample
            last = (x, out, t)
            x = sched.step(out, t, x).prev_sample
    finally:
        if patched is not None:
            module.randn_tensor = patched
    if type(sched).__name__ == "TCDScheduler":   # x0 of the last step, by the scheduler's prediction type
        x_t, out, t = last
        a = sched.alphas_cumprod[t]
        pred = sched.config.prediction_type
        return out if pred == "sample" else (a.sqrt() * x_t - (1 - a).sqrt() * out) if pred == "v_prediction" \
            else (x_t - (1 - a).sqrt() * out) / a.sqrt()
    final = float(scheduler_sigmas(sched)[-1])
    if type(sched).__name__ == "FlowMatchEulerDiscreteScheduler":   # x_t = x / (1 + sigma)
        return x * (1.0 + final)
    return x if keeps_ve_state(sched) else x * math.sqrt(final ** 2 + 1.0)


def _rel(x, ref) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


def test_every_key_of_every_scheduler_is_classified():
    """A key diffusers adds is a failure here until it is classified (from_diffusers refuses it at other values)."""
    unknown = {cls: sorted(k for k in getattr(diffusers, cls)().config if not k.startswith("_") and k not in
                           SCHEDULER_KEYS) for cls in CLASSES}
    assert not any(unknown.values()), unknown


@pytest.mark.parametrize("cls,key,value", list(_cases()))
def test_each_key_is_honoured_or_refused_by_name(unet, cls, key, value):
    cfg = _config(cls, **{key: value})
    sched = getattr(diffusers, cls)(**cfg)
    try:
        model = from_diffusers(unet, sched)
    except ValueError as exc:
        assert key in str(exc), f"refused without naming {key!r}: {exc}"
        return
    sampling = model.metadata.get("sampling") or {}
    sched.set_timesteps(STEPS)
    if sampling.get("solver") is None:   # edmrt does not run this scheduler's method
        _check_parameterisation(model, sched)
        if SCHEDULER_KEYS[key] == "schedule":
            _check_schedule(sched, key)
        return
    try:
        args = sampler_args(sched)
    except ValueError as exc:
        assert key in str(exc), f"sampler_args refused without naming {key!r}: {exc}"
        return
    if cls == "UniPCMultistepScheduler" and cfg.get("solver_type") == "bh1" and args["schedule"][-1] == 0.0:
        # diffusers' bh1 returns NaN on the step to sigma = 0 (B(h) = -h with h = inf; edmrt's step there is D):
        # the variant is compared where diffusers' is finite, on the schedule that stops at sigma_min.
        cfg = dict(cfg, final_sigmas_type="sigma_min")
        sched = getattr(diffusers, cls)(**cfg)
        sched.set_timesteps(STEPS)
        args = sampler_args(sched)
    L = torch.randn(len(SEEDS), *SHAPE, generator=torch.Generator().manual_seed(1))
    theirs = _diffusers_loop(unet, getattr(diffusers, cls)(**cfg), L.clone())
    ours = edmrt.Sampler(model, backend="torch", device="cpu", **args).sample(
        SEEDS, noise=initial_noise(L, sched), output="latent")
    # A schedule from above 1000 (squaredcos_cap_v2 betas: sigma_max 2e4, states near 6e4) loses float32 digits.
    tol = TOL if args["schedule"][0] < 1000 else 10 * TOL
    assert _rel(ours, theirs) <= tol, (_rel(ours, theirs), args["solver"], {k: v for k, v in args.items()
                                                                           if k != "schedule"})


PRECONDS = {"epsilon": edmrt.EpsilonPrecond, "v_prediction": edmrt.VPredictionPrecond, "sample": edmrt.X0Precond}


def _check_parameterisation(model, sched):
    """The preconditioning of a scheduler edmrt does not run: built from its own alphas_cumprod and prediction."""
    pred = sched.config.get("prediction_type", "epsilon")
    pre = model.precond
    if isinstance(pre, edmrt.EDMPrecond):
        assert pre.sigma_data == sched.config.sigma_data and pre.prediction == pred
        return
    assert type(pre) is PRECONDS[pred]
    np.testing.assert_array_equal(np.asarray(pre.alphas_cumprod), sched.alphas_cumprod.double().numpy())


def _check_schedule(sched, key):
    """A schedule key: scheduler_sigmas gives the scheduler's own levels, or says by name why it cannot."""
    try:
        sig = scheduler_sigmas(sched)
    except ValueError as exc:
        assert key in str(exc) or "scheduler" in str(exc), exc
        return
    own = getattr(sched, "sigmas", None)
    if isinstance(own, torch.Tensor) and own.numel() == sched.timesteps.numel() + 1 and \
            type(sched).__name__ != "HeunDiscreteScheduler":
        np.testing.assert_array_equal(sig[:own.numel()], own.double().numpy()[:sig.size])


@pytest.mark.parametrize("cls,cfg", [("DDIMScheduler", {}), ("DDIMScheduler", {"thresholding": True, "clip_sample": False}),
                                     ("DPMSolverMultistepScheduler", {"thresholding": True}),
                                     ("UniPCMultistepScheduler", {"thresholding": True}),
                                     ("LCMScheduler", {"clip_sample": True}), ("TCDScheduler", {"thresholding": True})])
def test_x0_clipping_is_refused_by_name(unet, cls, cfg):
    """x0 clipping (DDIM's default, and DiT's DDIM config) and dynamic thresholding are not linear in D: refused,
    naming the key and the value that runs (clip_sample=False gives the scheduler's method without clipping)."""
    sched = getattr(diffusers, cls)(**cfg)
    key = next((k for k, v in cfg.items() if v is True), "clip_sample")
    with pytest.raises(ValueError, match=f"{key}=True is not supported.*{key}=False"):
        from_diffusers(unet, sched)


def test_a_folder_whose_ddim_clips_is_refused_then_loaded_with_the_override(tmp_path, unet):
    """DiT's default DDIM config clips x0: load_diffusers refuses it by name, and takes scheduler_overrides to load
    it without clipping (edmrt's Euler is then DDIM's method)."""
    from edmrt.adapters.diffusers import load_diffusers

    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    with pytest.raises(ValueError, match=r"clip_sample=True is not supported.*scheduler_overrides=\{'clip_sample': False\}"):
        load_diffusers(tmp_path / "pipe")
    model = load_diffusers(tmp_path / "pipe", scheduler_overrides={"clip_sample": False})
    assert model.metadata["sampling"]["solver"] == "euler"
    with pytest.raises(ValueError, match="scheduler_overrides must be a dict"):
        load_diffusers(tmp_path / "pipe", scheduler_overrides=[("clip_sample", False)])
