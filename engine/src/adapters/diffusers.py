"""diffusers models as ``edmrt.Model``: UNets, DiT and VAEs with the preconditioning of their scheduler.

``from_diffusers(network, scheduler_config, vae)`` wraps a ``UNet2DModel``, ``UNet2DConditionModel`` or
``DiTTransformer2DModel`` as an ``nn.Module`` called ``network(x_in, c_noise, **cond) -> F`` (``cond_inputs``
lists its conditioning) and builds the ``Precond`` of the scheduler that the network was trained with;
``load_diffusers(folder)`` does the same for a local diffusers folder (safetensors weights only).

Conventions (diffusers 0.42.1), mapped onto edmrt's variance-exploding state x = x_vp / sqrt(alpha_bar):

- Discrete-time schedulers (DDPM, DDIM, Euler, DPM-Solver, UniPC, LCM, TCD, ...): sigma_t =
  sqrt((1 - alpha_bar_t) / alpha_bar_t) over the scheduler's own (float32) ``alphas_cumprod``; the network sees
  x_vp = x / sqrt(sigma^2 + 1) and the timestep t of sigma (``EpsilonPrecond``, ``VPredictionPrecond``,
  ``X0Precond`` for prediction_type "epsilon", "v_prediction", "sample"; ``LCMPrecond`` for ``LCMScheduler``,
  whose boundary condition is part of the model's D).  The sigma -> t map follows the scheduler family:
  "interpolate" (ln-sigma interpolation) for the k-diffusion-style ones (Euler, Heun, LMS, KDPM2), "nearest"
  for those that give the network integer timesteps (DPM-Solver and UniPC round, DDIM, LCM, TCD are integer).
- EDM schedulers (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``): already in EDM's state and
  parameterisation, ``EDMPrecond(sigma_data, prediction)`` (c_noise = ln(sigma) / 4 whatever the
  ``sigma_schedule``); ``CosineDPMSolverMultistepScheduler``: the same with c_noise = atan(sigma) * 2 / pi.
- Flow matching (``FlowMatchEulerDiscreteScheduler``: SD3's ``SD3Transformer2DModel``): x_t = (1 - t) x_0 + t eps,
  the network predicting v = eps - x_0 at timestep 1000 t; edmrt's state is x = x_t / (1 - t), sigma = t / (1 - t)
  (``FlowPrecond``), its t = 1 the level ``FLOW_T_MAX`` (sigma 1.7e7).  Its Euler step is edmrt's Euler: both are
  exact for a constant x_0 prediction.  Flux (``FluxTransformer2DModel``, ``edmrt.adapters.flux``): the same, on
  packed 2 x 2 latent patches, its dynamic (resolution-dependent) shift being the shift of the model's sample shape;
  dynamic shifting is refused for other networks.
- Wuerstchen / Stable Cascade (``DDPMWuerstchenScheduler`` with a ``StableCascadeUNet``, ``edmrt.adapters.cascade``):
  epsilon prediction at continuous time t in [0, 1] under the clamped cosine schedule (``WuerstchenPrecond``); its
  DDPM step is edmrt's ``euler_ancestral`` on the ``cosine`` schedule, stopping at t = 0 (sigma 0.01).
- Classifier-free guidance: diffusers' pipelines apply F = F_u + w (F_c - F_u) to the network output, as edmrt.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model import CondInput, Model
from ..precond import EDMPrecond, EpsilonPrecond, FlowPrecond, LCMPrecond, Precond, VPredictionPrecond, \
    WuerstchenPrecond, X0Precond, sigmas_from_alphas_cumprod
from ..schedules import cosine_sigma, flow_sigma

__all__ = ["from_diffusers", "load_diffusers", "load_cascade", "VAEDecoder", "guidance_embedding", "precond_from_scheduler",
           "scheduler_sigmas", "sampler_args", "initial_noise", "keeps_ve_state", "live_config", "SCHEDULER_KEYS",
           "SUPPORTED_SCHEDULERS", "UNetNetwork", "ConditionalUNetNetwork", "DiTNetwork", "SD3Network"]

# Discrete-time schedulers: class -> (sigma -> t map, the edmrt solver running the same method or None).
_DISCRETE = {
    "EulerDiscreteScheduler": ("interpolate", "euler"),
    "EulerAncestralDiscreteScheduler": ("interpolate", None),
    "HeunDiscreteScheduler": ("interpolate", "heun"),
    "LMSDiscreteScheduler": ("interpolate", "lms"),
    "KDPM2DiscreteScheduler": ("interpolate", None),
    "KDPM2AncestralDiscreteScheduler": ("interpolate", None),
    "DPMSolverSDEScheduler": ("interpolate", None),
    "DPMSolverMultistepScheduler": ("nearest", "dpmpp_2m"),
    "DPMSolverSinglestepScheduler": ("nearest", None),
    "DEISMultistepScheduler": ("nearest", None),
    "UniPCMultistepScheduler": ("nearest", "unipc"),
    "SASolverScheduler": ("nearest", None),
    "DDIMScheduler": ("nearest", "euler"),  # deterministic DDIM is Euler on the VE probability-flow ODE
    "DDPMScheduler": ("nearest", None),
    "PNDMScheduler": ("nearest", None),
    "LCMScheduler": ("nearest", "lcm"),
    "TCDScheduler": ("nearest", "tcd"),
}
# EDM-parameterised schedulers: class -> (c_noise form, solver).
_EDM = {
    "EDMEulerScheduler": ("log", "euler"),
    "EDMDPMSolverMultistepScheduler": ("log", "dpmpp_2m"),
    "CosineDPMSolverMultistepScheduler": ("atan", "dpmpp_2m"),
}
# Flow-matching schedulers: class -> solver.
_FLOW = {"FlowMatchEulerDiscreteScheduler": "euler"}
# Continuous-time cosine schedulers (Stable Cascade): class -> solver.
_WUERSTCHEN = {"DDPMWuerstchenScheduler": "euler_ancestral"}
# Schedulers whose state is the VE x itself (their scale_model_input divides by sqrt(sigma^2 + 1) or applies c_in);
# the others keep the VP state x_vp = x / sqrt(sigma^2 + 1).
_VE_STATE = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
             "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
             "DPMSolverSDEScheduler", *_EDM}
_PREDICTIONS = {"epsilon": EpsilonPrecond, "v_prediction": VPredictionPrecond, "sample": X0Precond}
SUPPORTED_SCHEDULERS = tuple(sorted({*_DISCRETE, *_EDM, *_FLOW, *_WUERSTCHEN}))   # the scheduler classes from_diffusers takes
_DEFAULT_STEPS = {"lcm": 4, "tcd": 4}
_FLOW_STEPS = 28   # StableDiffusion3Pipeline's num_inference_steps
_MODEL_KW = ("sample_shape", "sigma_min", "sigma_max", "metadata")
_NETWORKS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "SD3Transformer2DModel",
             "FluxTransformer2DModel", "StableCascadeUNet")
_FLOW_NETWORKS = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError("edmrt.adapters.diffusers needs diffusers: pip install 'edmrt[diffusers]'") from None
    return diffusers


# ----------------------------------------------------------------------------- scheduler -> preconditioning

def _scheduler(scheduler_config):
    """A diffusers scheduler built from ``scheduler_config``: a scheduler (its class and config), or a dict /
    FrozenDict with ``_class_name`` (a saved scheduler_config.json); the class fills in its defaults.  ValueError
    naming an unknown or missing ``_class_name``."""
    if scheduler_config is None:
        scheduler_config = {"_class_name": "DDPMScheduler"}
    if isinstance(scheduler_config, Mapping):
        name, config = scheduler_config.get("_class_name"), scheduler_config
        if name is None:
            raise ValueError("scheduler_config has no '_class_name' (an in-memory scheduler's .config has none): "
                             "pass the scheduler itself, or its saved scheduler_config.json")
    elif isinstance(getattr(type(scheduler_config), "config_name", None), str):  # a diffusers ConfigMixin
        name, config = type(scheduler_config).__name__, scheduler_config.config
    else:
        raise ValueError(f"scheduler_config must be a diffusers scheduler or its config (a dict with _class_name), "
                         f"got {type(scheduler_config).__name__}")
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"scheduler_config: scheduler {name!r} is not supported; expected one of "
                         f"{list(SUPPORTED_SCHEDULERS)}")
    try:
        return getattr(_diffusers(), name).from_config(dict(config))
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"scheduler_config: {name} rejects this config: {exc}") from None


def _alphas_cumprod(sched) -> np.ndarray:
    """The scheduler's alpha_bar_t in float64 (its float32 values).  A zero terminal value (zero-SNR rescaling)
    becomes 2^-24, as diffusers' ``EulerDiscreteScheduler`` sets it, so that sigma_T is finite (4096)."""
    acp = sched.alphas_cumprod.detach().double().cpu().numpy().copy()
    if acp[-1] <= 0.0:
        acp[-1] = 2.0 ** -24
    return acp


def _timestep_map(name: str, cfg) -> str:
    """How the scheduler gives its network the time of a noise level: "interpolate" (ln-sigma interpolation),
    "nearest" (the integer timestep) or "floor".  The integer schedulers (DPM-Solver, UniPC, ...) round their Karras
    and Lu timesteps (but not on squaredcos_cap_v2 betas), and truncate exponential and beta sigmas' fractional
    timesteps (stored as int64)."""
    mode = _DISCRETE[name][0]
    if mode != "nearest":
        return mode
    if cfg.get("use_exponential_sigmas") or cfg.get("use_beta_sigmas") or (
            (cfg.get("use_karras_sigmas") or cfg.get("use_lu_lambdas")) and cfg.get("beta_schedule") == "squaredcos_cap_v2"):
        return "floor"
    return mode


def precond_from_scheduler(scheduler_config, timestep: str | None = None) -> tuple[Precond, float, float]:
    """(precond, sigma_min, sigma_max) of a diffusers scheduler config (module docstring); ``timestep`` overrides
    the sigma -> t map of the discrete-time ones ("interpolate" or "nearest").

    ValueError names an unsupported scheduler class or ``prediction_type``."""
    sched = _scheduler(scheduler_config)
    cfg, name = sched.config, type(sched).__name__
    if name in _WUERSTCHEN:   # the clamp's levels at t = 0 and t = 1
        pre = WuerstchenPrecond(float(cfg["s"]), float(cfg["scaler"]))
        return pre, float(cosine_sigma(0.0, pre.s, pre.scaler)), float(cosine_sigma(1.0, pre.s, pre.scaler))
    if name in _FLOW:   # its sigma_min / sigma_max: the training schedule's ends, shifted (t = 1 at the top)
        pre = FlowPrecond(float(cfg["num_train_timesteps"]))
        return pre, float(flow_sigma(float(sched.sigma_min))), float(flow_sigma(float(sched.sigma_max)))
    pred = cfg.get("prediction_type", "epsilon")
    if name in _EDM:
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {pred!r} is not supported by {name} (its precondition_outputs "
                             "takes 'epsilon' or 'v_prediction')")
        pre = EDMPrecond(float(cfg["sigma_data"]), prediction=pred, noise=_EDM[name][0])
        return pre, float(cfg["sigma_min"]), float(cfg["sigma_max"])
    if pred not in _PREDICTIONS:
        raise ValueError(f"prediction_type {pred!r} of {name} is not supported; expected one of {sorted(_PREDICTIONS)}")
    acp = _alphas_cumprod(sched)
    mode = timestep if timestep is not None else _timestep_map(name, cfg)
    if name == "LCMScheduler":
        pre = LCMPrecond(alphas_cumprod=acp, timestep=mode, prediction=pred,
                         timestep_scaling=float(cfg.get("timestep_scaling", 10.0)))
    else:
        pre = _PREDICTIONS[pred](alphas_cumprod=acp, timestep=mode)
    levels = sigmas_from_alphas_cumprod(acp)
    return pre, float(levels.min()), float(levels.max())


# Every config key of the schedulers from_diffusers accepts, by what edmrt does with it (tests/test_scheduler_keys.py
# walks them all; a key missing here, at a value other than its class's default, is refused by name):
# - "training": the parameterisation the network was trained with.  The preconditioning is built from the scheduler
#   itself: its alphas_cumprod, prediction_type, EDM's sigma_data (and range), LCM's timestep_scaling.
# - "schedule": the noise levels set_timesteps makes, which edmrt samples on when given
#   schedule=scheduler_sigmas(sched), and the timesteps the network is given there (``_timestep_map``).
# - "method": how the scheduler steps.  Where edmrt runs the scheduler's method (the card's default solver and its
#   options, ``_method``), each value maps onto the solver or is refused by name; a scheduler whose method edmrt does
#   not run gives the model no default solver, and its method keys do not enter the model.
SCHEDULER_KEYS = {
    **dict.fromkeys(("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                     "prediction_type", "rescale_betas_zero_snr", "sigma_data", "timestep_scaling", "s", "scaler"),
                    "training"),
    **dict.fromkeys(("timestep_spacing", "steps_offset", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "use_lu_lambdas", "sigma_schedule", "rho", "sigma_min", "sigma_max",
                     "set_alpha_to_one", "final_sigmas_type", "original_inference_steps", "interpolation_type",
                     "timestep_type", "lambda_min_clipped", "skip_prk_steps", "use_flow_sigmas", "flow_shift",
                     "shift_terminal", "use_dynamic_shifting", "time_shift_type", "shift", "base_shift", "max_shift",
                     "base_image_seq_len", "max_image_seq_len", "invert_sigmas"), "schedule"),
    **dict.fromkeys(("solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
                     "predict_x0", "solver_p", "disable_corrector", "corrector_order", "predictor_order", "tau_func",
                     "noise_sampler_seed", "variance_type", "clip_sample", "clip_sample_range", "thresholding",
                     "dynamic_thresholding_ratio", "sample_max_value", "stochastic_sampling"), "method"),
}
# Values edmrt does not sample with, for any scheduler: {key: (the values it takes, why not the others)}.
_UNSUPPORTED = {
    "rescale_betas_zero_snr": ((False,), "a zero-terminal-SNR schedule has an infinite last level (diffusers puts "
                               "alpha_bar_T = 2^-24 in its place, which makes its levels non-monotonic)"),
    "use_flow_sigmas": ((False,), "flow-matching sigmas are a flow model's time, not diffusion noise levels"),
    "use_dynamic_shifting": ((False,), "a resolution-dependent shift of flow-matching time, which edmrt applies to "
                             "a FluxTransformer2DModel's sample shape only"),
    "invert_sigmas": ((False,), "inverted flow sigmas run from data to noise (an inversion: edmrt.invert)"),
    "stochastic_sampling": ((False,), "edmrt's flow Euler is the deterministic step"),
    "interpolation_type": (("linear",), "log-linear interpolation gives the network timesteps that are not the "
                           "time of its noise levels"),
}
# x0 clipping and dynamic thresholding: not linear in D, so not a plan (their values only matter when switched on).
_CLIPPING = {"clip_sample": False, "thresholding": False}


def _config_value(config, key, default=None):
    return config[key] if key in config else default


def _refuse(name: str, key: str, value, takes, why: str):
    raise ValueError(f"scheduler_config: {name} with {key}={value!r} is not supported ({why}); edmrt takes "
                     f"{key} in {list(takes)}: pass a config with one of those, e.g. from_diffusers(net, "
                     f"dict(scheduler.config, {key}={takes[0]!r})) or load_diffusers(folder, "
                     f"scheduler_overrides={{{key!r}: {takes[0]!r}}})")


def _check_keys(sched, allow: tuple = ()) -> None:
    """Every config key of ``sched`` known (``SCHEDULER_KEYS``) or at its class's default; every value edmrt samples
    with (``_UNSUPPORTED``, but for the keys in ``allow``).  ValueError naming the key."""
    name, cfg = type(sched).__name__, sched.config
    defaults = type(sched)().config
    for key in cfg:
        if key.startswith("_"):
            continue
        if key not in SCHEDULER_KEYS and cfg[key] != defaults.get(key):
            raise ValueError(f"scheduler_config: {name}'s {key}={cfg[key]!r} is a key edmrt does not know (a newer "
                             f"diffusers?); leave it at its default {defaults.get(key)!r} or update edmrt")
        if key in _UNSUPPORTED and key not in allow and cfg[key] not in _UNSUPPORTED[key][0]:
            _refuse(name, key, cfg[key], *_UNSUPPORTED[key])


def _method(name: str, config) -> tuple[str | None, dict]:
    """(edmrt solver, options) that run the scheduler's method (the card's default), or (None, {}) for a scheduler
    whose method edmrt does not run; ValueError naming a method key whose value edmrt's solver does not run."""
    if name in _FLOW or name in _WUERSTCHEN:
        return (_FLOW.get(name) or _WUERSTCHEN[name]), {}
    solver = (_DISCRETE.get(name) or _EDM.get(name))[1]
    if solver is None:
        return None, {}
    for key, off in _CLIPPING.items():
        if _config_value(config, key, off) != off:
            _refuse(name, key, config[key], (off,), "x0 clipping / dynamic thresholding is not linear in D, and "
                    "edmrt's solvers do not run it; with it off edmrt runs the scheduler's method")
    if name == "CosineDPMSolverMultistepScheduler":
        return None, {}   # its only method is the 2M SDE on torchsde's Brownian-tree noise, which edmrt does not draw
    if "DPMSolverMultistep" in name:
        return _dpm_method(name, config)
    if name == "UniPCMultistepScheduler":
        return _unipc_method(name, config)
    return solver, {}


def _dpm_method(name: str, config) -> tuple[str, dict]:
    """DPM-Solver++ multistep: order 1 is Euler in VE (the first-order step); 2M (midpoint) ODE and SDE; the
    3M ODE of k-diffusion (diffusers' solver_type "heun" without lower_order_final)."""
    algorithm = _config_value(config, "algorithm_type", "dpmsolver++")
    order, kind = int(_config_value(config, "solver_order", 2)), _config_value(config, "solver_type", "midpoint")
    lower = bool(_config_value(config, "lower_order_final", True))
    if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
        _refuse(name, "algorithm_type", algorithm, ("dpmsolver++", "sde-dpmsolver++"), "edmrt runs DPM-Solver++")
    sde = algorithm == "sde-dpmsolver++"
    if order == 1 and not sde:
        return "euler", {}
    if order == 3:
        if sde or kind != "heun" or lower:
            _refuse(name, "solver_order", 3, (2,), "edmrt's dpmpp_3m is diffusers' order 3 with solver_type='heun' "
                    "and lower_order_final=False (the ODE) only")
        return "dpmpp_3m", {}
    if order != 2:
        _refuse(name, "solver_order", order, (2, 3), "edmrt's SDE variants are 2M and 3M" if sde else
                "no DPM-Solver++ of that order")
    if kind != "midpoint" and not sde:
        _refuse(name, "solver_type", kind, ("midpoint",), "edmrt's dpmpp_2m is the midpoint 2M")
    # lower_order_final / euler_at_final act on the last step only, which on a schedule to 0 is D anyway; on one that
    # stops at a positive level they depend on the steps: sampler_args sets first_order_last from them.
    if sde:
        return "dpmpp_2m_sde", dict(solver_type=kind)
    return "dpmpp_2m", {}


def _unipc_method(name: str, config) -> tuple[str, dict]:
    """UniPC (bh1 / bh2, orders 1-3, data prediction, the corrector on every step, diffusers' lower_order_final)."""
    checks = [("predict_x0", True, "edmrt's UniPC predicts data (x0)"), ("solver_p", None, "another solver as the "
              "predictor"), ("disable_corrector", [], "edmrt's UniPC corrects every step"),
              ("lower_order_final", True, "edmrt's UniPC lowers the order over its last steps, as diffusers' default")]
    for key, want, why in checks:
        value = _config_value(config, key, want)
        if (list(value) if isinstance(value, (list, tuple)) else value) != want:
            _refuse(name, key, value, (want,), why)
    return "unipc", dict(order=int(_config_value(config, "solver_order", 2)),
                         variant=_config_value(config, "solver_type", "bh2"))


def scheduler_sigmas(scheduler) -> np.ndarray:
    """The noise levels of a diffusers scheduler after ``set_timesteps``, as an edmrt schedule (float64, ending in 0).

    Schedulers with ``sigmas`` (Euler, DPM-Solver, UniPC, EDM: VE sigma, one per timestep plus the final one) give
    them as they are (float32 values), ending in 0 or, with ``final_sigmas_type="sigma_min"``, at the positive
    level where their sampling stops; Heun's, which repeats each level for its two evaluations, once each.  The
    others (LCM, TCD, DDIM) give sigma_t of their timesteps, then 0.  LCM's last step returns its denoised sample,
    i.e. sigma = 0; TCD's and DDIM's stop at timestep 0 instead."""
    ts = scheduler.timesteps
    sig = getattr(scheduler, "sigmas", None)
    if type(scheduler).__name__ in _FLOW:   # flow time t, one per timestep plus the final 0, as EDM levels
        return flow_sigma(sig.detach().double().cpu().numpy())
    if type(scheduler).__name__ in _WUERSTCHEN:
        return _wuerstchen_sigmas(scheduler)
    if isinstance(sig, torch.Tensor) and type(scheduler).__name__ == "HeunDiscreteScheduler":
        s = sig.detach().double().cpu().numpy()
        return np.concatenate([s[:1], s[1:-1:2], s[-1:]])   # t_0, then t_1, t_1, t_2, t_2, ..., t_{N-1}, t_{N-1}, 0
    if isinstance(sig, torch.Tensor) and sig.numel() == ts.numel() + 1:
        s = sig.detach().double().cpu().numpy()
        # final_sigmas_type="sigma_min" can repeat the last level (to float32 rounding: EDM's DPM-Solver ends
        # 0.0019999996, 0.0020000001): a step of zero length changes nothing (Euler's x + 0 d, DPM-Solver's h = 0),
        # so it is dropped.
        repeated = s.size > 2 and s[-1] > 0.0 and abs(s[-1] - s[-2]) <= 1e-6 * s[-1]
        return s[:-1] if repeated else s
    levels = sigmas_from_alphas_cumprod(_alphas_cumprod(scheduler))
    steps = ts.long().cpu().numpy()
    final = 0.0
    if type(scheduler).__name__ == "DDIMScheduler":
        # DDIM steps timestep t to t - T // N (then to alpha_bar = 1, or alpha_bar_0 without set_alpha_to_one): a
        # schedule only where that is the next timestep.
        prev = steps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        if not np.array_equal(prev[:-1], steps[1:]):
            raise ValueError(f"scheduler: DDIMScheduler with timestep_spacing={scheduler.config.timestep_spacing!r} "
                             f"steps each timestep to t - {steps[0] - prev[0]}, not to the next one ({steps.tolist()}"
                             "): no schedule of noise levels; use timestep_spacing='leading'")
        if prev[-1] >= 0:
            final = float(levels[prev[-1]])
        elif not scheduler.config.set_alpha_to_one:
            final = float(levels[0])
        if final > 0.0 and final == levels[steps[-1]]:   # from timestep 0 to alpha_bar_0: a step of zero length
            return np.concatenate([levels[steps[:-1]], [final]])
    return np.concatenate([levels[steps], [final]])


def _wuerstchen_sigmas(scheduler) -> np.ndarray:
    """A ``DDPMWuerstchenScheduler``'s levels: sigma of each timestep t (the pipelines step from each to the next and
    stop at the last, t = 0); ValueError for timesteps that do not end at 0 (its last step would add noise)."""
    t = scheduler.timesteps.detach().double().cpu().numpy()
    if t.size < 2 or t[-1] != 0.0:
        raise ValueError(f"scheduler: DDPMWuerstchenScheduler's timesteps must run down to 0 (set_timesteps(N) makes "
                         f"linspace(1, 0, N + 1)), got {t.tolist()}")
    cfg = scheduler.config
    return cosine_sigma(t, float(cfg["s"]), float(cfg["scaler"]))


def sampler_args(scheduler) -> dict:
    """``Sampler`` keywords that run a scheduler's own method on its own schedule, after its ``set_timesteps``: the
    solver and options (``_method``), ``steps`` and ``schedule=scheduler_sigmas(scheduler)``, so that
    ``edmrt.Sampler(model, **sampler_args(sched)).sample(seeds, noise=initial_noise(latents, sched))`` follows
    diffusers' loop.  DPM-Solver's ``lower_order_final`` / ``euler_at_final`` become ``first_order_last`` on a
    schedule that stops at a positive level (on a repeated final level they acted on the zero-length step that
    ``scheduler_sigmas`` drops).  ValueError naming the key where edmrt does not run the method."""
    name = type(scheduler).__name__
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"scheduler: {name} is not supported; expected one of {list(SUPPORTED_SCHEDULERS)}")
    _check_keys(scheduler, allow=("use_dynamic_shifting",))   # set_timesteps(mu=...) put the shift in its sigmas
    solver, options = _method(name, scheduler.config)
    if solver is None:
        raise ValueError(f"scheduler: edmrt does not run {name}'s method; choose an edmrt solver (edmrt.SOLVERS) "
                         "with schedule=scheduler_sigmas(scheduler)")
    sigmas = scheduler_sigmas(scheduler)
    if solver.startswith("dpmpp_2m") and sigmas[-1] > 0.0:
        cfg, steps = scheduler.config, len(scheduler.timesteps)
        first = cfg.get("euler_at_final", False) or (cfg.get("lower_order_final", True) and steps < 15)
        if first and sigmas.size - 1 == steps:
            options["first_order_last"] = True
    return dict(solver=solver, steps=sigmas.size - 1, schedule=sigmas, **options)


def keeps_ve_state(scheduler) -> bool:
    """Whether the scheduler's state (a pipeline's latents) is edmrt's VE x itself (Euler-type and EDM schedulers);
    the others keep x_vp = x / sqrt(sigma^2 + 1), at sigma = 0 the same."""
    return type(scheduler).__name__ in _VE_STATE


def initial_noise(latents: torch.Tensor, scheduler) -> torch.Tensor:
    """The standard-normal ``noise`` for edmrt (whose state starts at sigma_0 noise, sigma_0 the schedule's first
    level) that starts where a diffusers pipeline given ``latents=latents`` starts: the pipeline's state is
    latents * init_noise_sigma (``prepare_latents``), the VE x for Euler-type and EDM schedulers and x_vp =
    x / sqrt(sigma_0^2 + 1) for the others; call after ``set_timesteps``."""
    s0 = float(scheduler_sigmas(scheduler)[0])
    x = latents * float(getattr(scheduler, "init_noise_sigma", 1.0))   # flow matching: none (1)
    if type(scheduler).__name__ in _FLOW:   # x_t = x / (1 + sigma)
        return x * float((1.0 + s0) / s0)
    if not keeps_ve_state(scheduler):
        x = x * float(np.sqrt(s0 ** 2 + 1.0))
    return x / s0


# ----------------------------------------------------------------------------- networks

def _timesteps(c_noise: torch.Tensor, batch: int) -> torch.Tensor:
    """c_noise, (B,) or (B, 1, ..., 1), as diffusers' float32 timestep vector (B,)."""
    t = c_noise.reshape(-1).to(torch.float32)
    return t.expand(batch) if t.numel() == 1 and batch > 1 else t


def _dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _cast(cond: dict, dtype: torch.dtype) -> dict:
    """Floating-point conditioning in the network's dtype; integer inputs (class labels) as they are."""
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in cond.items()}


def _first_channels(out: torch.Tensor, channels: int) -> torch.Tensor:
    """A learned-variance network (2C output channels: DiT, IF) keeps its first C, as DiTPipeline does."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


class UNetNetwork(nn.Module):
    """``UNet2DModel`` as ``network(x_in, c_noise[, class_labels]) -> F`` (``unet(x_in, t, class_labels).sample``)."""

    def __init__(self, unet: nn.Module, cond_inputs: tuple = ()):
        super().__init__()
        self.unet, self.cond_inputs = unet, tuple(cond_inputs)
        self.channels = int(unet.config.in_channels)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None):
        out = self.unet(x_in.to(_dtype(self.unet)), _timesteps(c_noise, x_in.shape[0]), class_labels=class_labels,
                        return_dict=False)[0]
        return _first_channels(out, self.channels).to(x_in.dtype)


class ConditionalUNetNetwork(nn.Module):
    """``UNet2DConditionModel`` as ``network(x_in, c_noise, encoder_hidden_states, **cond) -> F``.

    ``text_embeds`` and ``time_ids`` (SDXL) and ``image_embeds`` / ``image_embeds_<i>`` (IP-Adapters, one tensor
    per adapter, in order) go into ``added_cond_kwargs``; ``ip_adapter_masks`` / ``ip_adapter_masks_<i>`` (one
    (num_images, H, W) mask per sample and adapter) into ``cross_attention_kwargs["ip_adapter_masks"]``, one row
    per UNet row (diffusers' attention processors downsample them per layer); ``timestep_cond`` (LCM's guidance
    embedding) and ``class_labels`` are passed as the UNet's own keywords."""

    def __init__(self, unet: nn.Module, cond_inputs: tuple, image_inputs: tuple = (), mask_inputs: tuple = ()):
        super().__init__()
        self.unet, self.cond_inputs, self.image_inputs = unet, tuple(cond_inputs), tuple(image_inputs)
        self.mask_inputs = tuple(mask_inputs)
        self.channels = int(unet.config.in_channels)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, **cond):
        dtype = _dtype(self.unet)
        cond = _cast(cond, dtype)
        added = {k: cond.pop(k) for k in ("text_embeds", "time_ids") if k in cond}
        if self.image_inputs:
            added["image_embeds"] = [cond.pop(k) for k in self.image_inputs]
        attn = {"ip_adapter_masks": [cond.pop(k) for k in self.mask_inputs]} if self.mask_inputs else None
        out = self.unet(x_in.to(dtype), _timesteps(c_noise, x_in.shape[0]),
                        encoder_hidden_states=cond.pop("encoder_hidden_states", None),
                        class_labels=cond.pop("class_labels", None), timestep_cond=cond.pop("timestep_cond", None),
                        added_cond_kwargs=added or None, cross_attention_kwargs=attn, return_dict=False)[0]
        return _first_channels(out, self.channels).to(x_in.dtype)


class DiTNetwork(nn.Module):
    """``DiTTransformer2DModel`` as ``network(x_in, c_noise, class_labels) -> F``: the first C of its 2C output
    channels (the noise prediction; the rest is the learned variance, unused by DiTPipeline's samplers)."""

    def __init__(self, transformer: nn.Module, cond_inputs: tuple):
        super().__init__()
        self.transformer, self.cond_inputs = transformer, tuple(cond_inputs)
        self.channels = int(transformer.config.in_channels)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor):
        out = self.transformer(x_in.to(_dtype(self.transformer)), timestep=_timesteps(c_noise, x_in.shape[0]),
                               class_labels=class_labels, return_dict=False)[0]
        return _first_channels(out, self.channels).to(x_in.dtype)


class SD3Network(nn.Module):
    """``SD3Transformer2DModel`` as ``network(x_in, c_noise, encoder_hidden_states, pooled_projections) -> F`` (the
    velocity v; StableDiffusion3Pipeline's call: ``timestep`` is 1000 t)."""

    def __init__(self, transformer: nn.Module, cond_inputs: tuple):
        super().__init__()
        self.transformer, self.cond_inputs = transformer, tuple(cond_inputs)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor):
        dtype = _dtype(self.transformer)
        out = self.transformer(hidden_states=x_in.to(dtype), timestep=_timesteps(c_noise, x_in.shape[0]),
                               encoder_hidden_states=encoder_hidden_states.to(dtype),
                               pooled_projections=pooled_projections.to(dtype), return_dict=False)[0]
        return out.to(x_in.dtype)


SD3_TOKENS = 333   # StableDiffusion3Pipeline's prompt embeddings: CLIP's 77 tokens + T5's max_sequence_length 256


# ----------------------------------------------------------------------------- conditioning inputs

def _shape(config, key) -> tuple:
    """A per-sample shape from the config: an int (or a list of one repeated int: per-block cross_attention_dim)."""
    v = config.get(key) if hasattr(config, "get") else getattr(config, key)
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"the UNet's {key} differs per block ({list(v)}): not supported")
        v = v[0]
    return int(v)


def _mask_inputs(image_names: tuple, shapes: dict) -> tuple[list, tuple]:
    """IP-Adapter masks, when ``cond_shapes`` declares them: ``ip_adapter_masks`` (one adapter) or
    ``ip_adapter_masks_<i>`` (each of several; all or none), per sample (num_images, H, W) at the output image's
    resolution, as ``IPAdapterMaskProcessor.preprocess`` makes them (1: the adapter's image conditions that pixel).
    Their unconditional rows are the conditional ones (null "cond"): the pipelines mask both halves of CFG alike."""
    names = tuple(n.replace("image_embeds", "ip_adapter_masks") for n in image_names)
    given = [n for n in names if n in shapes]
    stray = sorted(k for k in shapes if k.startswith("ip_adapter_masks") and k not in names)
    if stray or (given and len(given) != len(names)):
        raise ValueError(f"cond_shapes: IP-Adapter masks are {list(names) or 'none (no IP-Adapter is loaded)'}, one "
                         f"per adapter (all or none); got {sorted(given + stray)}")
    out = []
    for n in given:
        shape = tuple(shapes[n])
        if len(shape) != 3:
            raise ValueError(f"cond_shapes[{n!r}] must be (num_images, H, W), got {shape}")
        out.append(CondInput(n, shape, null="cond"))
    return out, tuple(given)


def _image_inputs(unet, shapes: dict) -> tuple[list, tuple]:
    """IP-Adapter inputs of a UNet whose ``encoder_hid_proj`` is image-typed ("ip_image_proj"): one per adapter
    (``image_embeds``, or ``image_embeds_<i>`` for several).  A plain adapter (``ImageProjection``) takes one image
    embedding per sample, (1, D), and zeros as its unconditional row, as the pipelines'
    ``prepare_ip_adapter_image_embeds`` does; the others take image-encoder hidden states, whose per-sample shape
    (``cond_shapes``) and negative (``uncond``) the caller gives."""
    layers = list(getattr(unet.encoder_hid_proj, "image_projection_layers", []))
    names = ["image_embeds"] if len(layers) == 1 else [f"image_embeds_{i}" for i in range(len(layers))]
    out = []
    for name, layer in zip(names, layers):
        plain = type(layer).__name__ == "ImageProjection"
        if name in shapes:
            shape = shapes[name]
        elif plain:
            shape = (1, layer.image_embeds.in_features)
        else:
            raise ValueError(f"cond_shapes[{name!r}] is required for {type(layer).__name__} (image-encoder hidden "
                             "states: (num_images, tokens, features) per sample)")
        out.append(CondInput(name, shape, null=0.0 if plain else None))
    return out, tuple(names)


def _text_inputs(config, shapes: dict) -> list:
    """encoder_hidden_states (77 tokens unless cond_shapes says otherwise; other lengths run too, ``CondInput.free``:
    the UNet attends over any number of tokens), SDXL's added conditions and LCM's
    timestep_cond, from a ``UNet2DConditionModel`` config; ValueError naming what is not supported."""
    dim = _shape(config, "encoder_hid_dim" if config.get("encoder_hid_dim_type") == "text_proj"
                 else "cross_attention_dim")
    out = [CondInput("encoder_hidden_states", shapes.get("encoder_hidden_states", (77, dim)), free=(0,))]
    add = config.get("addition_embed_type")
    if add == "text_time":
        ids = CondInput("time_ids", shapes.get("time_ids", (6,)), null="cond")  # SDXL base: size, crop, target
        per_id = int(config["addition_time_embed_dim"])
        pooled = int(config["projection_class_embeddings_input_dim"]) - ids.shape[0] * per_id
        out += [CondInput("text_embeds", shapes.get("text_embeds", (pooled,))), ids]
    elif add is not None:
        raise ValueError(f"the UNet's addition_embed_type {add!r} is not supported (None or 'text_time')")
    if config.get("time_cond_proj_dim") is not None:
        out.append(CondInput("timestep_cond", (int(config["time_cond_proj_dim"]),), null="cond"))
    return out


def _class_inputs(config) -> list:
    """Class labels of a UNet with ``num_class_embeds`` (an embedding table without a null row: CFG needs the
    caller's unconditional labels)."""
    kind, n = config.get("class_embed_type"), config.get("num_class_embeds")
    if kind is not None:
        raise ValueError(f"the UNet's class_embed_type {kind!r} is not supported (None with num_class_embeds)")
    return [CondInput("class_labels", (), torch.int64, null=None, num_classes=int(n))] if n else []


def live_config(module: nn.Module) -> dict:
    """A diffusers module's config as its forward reads it: diffusers' loaders change a loaded model's config by
    attribute (``load_ip_adapter`` sets ``unet.config.encoder_hid_dim_type = "ip_image_proj"``, ``unload_ip_adapter``
    sets it back), which ``FrozenDict`` keeps as an attribute beside the unchanged item; the attribute wins."""
    cfg = module.config
    live = dict(cfg)
    live.update({k: v for k, v in vars(cfg).items() if not k.startswith("_")})
    return live


def _ip_adapter_processors(unet) -> list[str]:
    """The attention processors of a UNet that take IP-Adapter image tokens (``load_ip_adapter`` installs them)."""
    return [name for name, proc in getattr(unet, "attn_processors", {}).items() if "IPAdapter" in type(proc).__name__]


def _network(net, shapes: dict) -> tuple[nn.Module, int, tuple]:
    """(wrapped network, num_classes for the Model, sample shape) of a diffusers model; ValueError for others."""
    name = type(net).__name__
    if name not in _NETWORKS:
        raise ValueError(f"network must be a diffusers {', '.join(_NETWORKS)}, got {name}")
    cfg = live_config(net)
    if name == "StableCascadeUNet":
        from .cascade import cascade_network
        wrapped, shape = cascade_network(net, shapes)
        return wrapped, 0, shape
    if name == "FluxTransformer2DModel":
        from .flux import flux_network
        wrapped, shape = flux_network(net, shapes)
        return wrapped, 0, shape
    size = cfg.get("sample_size")
    hw = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    shape = (int(cfg["in_channels"]),) + hw
    if name == "UNet2DModel":
        return UNetNetwork(net, _class_inputs(cfg)), 0, shape
    if name == "SD3Transformer2DModel":
        text = CondInput("encoder_hidden_states", shapes.get("encoder_hidden_states",
                                                             (SD3_TOKENS, int(cfg["joint_attention_dim"]))), free=(0,))
        pooled = CondInput("pooled_projections", shapes.get("pooled_projections",
                                                            (int(cfg["pooled_projection_dim"]),)))
        return SD3Network(net, (text, pooled)), 0, shape
    if name == "UNet2DConditionModel":
        hid = cfg.get("encoder_hid_dim_type")
        if hid not in (None, "text_proj", "ip_image_proj"):
            raise ValueError(f"the UNet's encoder_hid_dim_type {hid!r} is not supported (None, 'text_proj' or "
                             "'ip_image_proj')")
        images, names = _image_inputs(net, shapes) if hid == "ip_image_proj" else ([], ())
        ip_procs = _ip_adapter_processors(net)
        if ip_procs and not images:   # image tokens the network would attend to and edmrt could not give
            raise ValueError(f"the UNet has IP-Adapter attention processors ({ip_procs[0]}, ...) but no IP-Adapter "
                             f"image projection (encoder_hid_dim_type {hid!r}): load the adapter with "
                             "pipe.load_ip_adapter(...) or remove it with pipe.unload_ip_adapter()")
        if hid == "ip_image_proj" and not ip_procs:
            raise ValueError("the UNet has an IP-Adapter image projection (encoder_hid_dim_type 'ip_image_proj') but "
                             "no IP-Adapter attention processors: the image embeddings would be projected and unused")
        masks, mask_names = _mask_inputs(names, shapes)
        return ConditionalUNetNetwork(net, _text_inputs(cfg, shapes) + _class_inputs(cfg) + images + masks, names,
                                      mask_names), 0, shape
    n = int(cfg["num_embeds_ada_norm"])  # DiT: its label embedding has a null row n (class dropout), DiTPipeline's 1000
    labels = CondInput("class_labels", (), torch.int64, null=n, num_classes=n)
    return DiTNetwork(net, (labels,)), n, shape


# ----------------------------------------------------------------------------- the model

def from_diffusers(network, scheduler_config=None, vae=None, *, scheduler=None, timestep: str | None = None,
                   cond_shapes: dict | None = None, **kw) -> Model:
    """An ``edmrt.Model`` from a diffusers network, its scheduler's config and an optional VAE (module docstring).

    ``scheduler``: the network's diffusers scheduler, or its config (a dict / FrozenDict with ``_class_name``, a
    saved scheduler_config.json); ``scheduler_config`` is the same argument under its older name (either, not
    both).  None means DDPM's defaults
    (linear betas 1e-4 .. 0.02, epsilon: DiT's and the unconditional UNets' training schedule).  ``timestep``
    overrides the sigma -> t map ("interpolate" / "nearest").  ``cond_shapes``: per-sample shapes by input name
    where the config does not say (``{"encoder_hidden_states": (77, 768)}`` is the default for text; SDXL's
    refiner has ``{"time_ids": (5,)}``).  ``kw``: ``sample_shape``, ``sigma_min``, ``sigma_max``, ``metadata``
    (merged into the card) for ``Model``.  The sigma range is the scheduler's discrete levels (EDM: its config).

    Every scheduler config key is honoured or refused by name (``SCHEDULER_KEYS``): the parameterisation is read
    from the scheduler; where edmrt runs the scheduler's method the card's default solver and options are it
    (``_method``), and ``sampler_args(scheduler)`` follows its own schedule; x0 clipping and dynamic thresholding,
    zero-terminal-SNR betas, flow-matching sigmas and method variants edmrt does not run raise ValueError naming
    the key and a value that runs."""
    if scheduler is not None and scheduler_config is not None:
        raise ValueError("pass the scheduler once: scheduler=... (or its older name scheduler_config=...), not both")
    scheduler_config = scheduler if scheduler is not None else scheduler_config
    unknown = sorted(set(kw) - set(_MODEL_KW))
    if unknown:
        raise ValueError(f"unknown keyword(s) {unknown} for from_diffusers; expected {list(_MODEL_KW)}, timestep, "
                         "cond_shapes")
    shapes = dict(cond_shapes or {})
    wrapped, num_classes, shape = _network(network, shapes)
    unused = sorted(set(shapes) - {c.name for c in wrapped.cond_inputs})
    if unused:
        raise ValueError(f"cond_shapes names {unused}, which are not inputs of this network "
                         f"({[c.name for c in wrapped.cond_inputs]})")
    sched = _scheduler(scheduler_config)
    net_name = type(network).__name__
    _check_keys(sched, allow=("use_dynamic_shifting",) if net_name == "FluxTransformer2DModel" else ())
    precond, lo, hi = precond_from_scheduler(sched, timestep)
    name = type(sched).__name__
    if name not in _FLOW and net_name in _FLOW_NETWORKS:
        raise ValueError(f"scheduler_config: an {net_name} predicts flow velocity: pass its "
                         f"FlowMatchEulerDiscreteScheduler, got {name}")
    if (name in _WUERSTCHEN) != (net_name == "StableCascadeUNet"):
        raise ValueError(f"scheduler_config: a StableCascadeUNet takes the continuous time of "
                         f"DDPMWuerstchenScheduler, and that scheduler only a StableCascadeUNet; got "
                         f"{net_name} with {name}")
    card = _card(network, sched, precond, tuple(kw.get("sample_shape", shape)))
    card.update(kw.pop("metadata", None) or {})
    decoder = _decoder(vae)
    args = {"sample_shape": shape, "sigma_min": lo, "sigma_max": hi, **kw}
    return Model(wrapped.eval(), precond, num_classes=num_classes, metadata=card, decoder=decoder, **args)


def _card(network, sched, precond: Precond, shape: tuple) -> dict:
    """The model card of a diffusers network: where it came from and, where edmrt runs the scheduler's method, the
    sampling defaults (solver, steps, schedule and its parameters)."""
    name, net_name = type(sched).__name__, type(network).__name__
    solver, options = _method(name, sched.config)
    card = {"name": net_name, "source": "diffusers",
            "diffusers": {"network": net_name, "scheduler": name,
                          "prediction_type": "flow" if name in _FLOW else sched.config.get("prediction_type",
                                                                                             "epsilon")}}
    if name in _FLOW and net_name == "FluxTransformer2DModel":
        from .flux import FLUX_STEPS, dynamic_shift
        shift = dynamic_shift(sched.config, shape) if sched.config.get("use_dynamic_shifting") else \
            float(sched.config.get("shift", 1.0))
        card["sampling"] = {"solver": solver, "steps": FLUX_STEPS, "schedule": "flux", "shift": shift}
    elif name in _FLOW:
        card["sampling"] = {"solver": solver, "steps": _FLOW_STEPS, "schedule": "flow",
                            "shift": float(sched.config.get("shift", 1.0))}
    elif name in _WUERSTCHEN:
        from .cascade import DECODER_STEPS, PRIOR_STEPS, is_prior
        card["sampling"] = {"solver": solver, "steps": PRIOR_STEPS if is_prior(network) else DECODER_STEPS,
                            "schedule": "cosine", "schedule_options": {"s": precond.s, "scaler": precond.scaler}}
    elif solver is not None:
        card["sampling"] = {"solver": solver, "steps": _DEFAULT_STEPS.get(solver, 25), **({"options": options}
                                                                                          if options else {})}
    return card


def _decoder(vae):
    """The Model's decoder: Stable Cascade's VQGAN (``PaellaVQModel``) or a VAE; None for none."""
    if vae is None:
        return None
    if type(vae).__name__ == "PaellaVQModel":
        from .cascade import VQGANDecoder
        return VQGANDecoder(vae)
    return VAEDecoder(vae)


class VAEDecoder(nn.Module):
    """A diffusers VAE's decoder as ``decoder(latents) -> images`` in [-1, 1], ``batch`` latents at a time.

    Latents are unscaled as diffusers' pipelines do before ``vae.decode``: ``latents * latents_std / scaling_factor
    + latents_mean`` when the VAE's config has ``latents_mean`` and ``latents_std`` (Playground v2.5; the SDXL
    pipeline's rule), else ``latents / scaling_factor`` (+ ``shift_factor`` when set: SD3).  The decoded images are
    clamped to [-1, 1], the range the pipelines' postprocessing maps to [0, 1] (``(x / 2 + 0.5).clamp(0, 1)``)."""

    def __init__(self, vae: nn.Module, batch: int = 8):
        super().__init__()
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        if not callable(getattr(vae, "decode", None)) or not hasattr(vae, "config"):
            raise ValueError(f"vae must be a diffusers autoencoder (with .decode and .config), "
                             f"got {type(vae).__name__}")
        self.vae, self.batch = vae, batch
        cfg = vae.config
        self.scaling_factor = float(cfg.get("scaling_factor", 1.0) or 1.0)
        self.shift_factor = cfg.get("shift_factor")
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        both = mean is not None and std is not None
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32) if both else None)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32) if both else None)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """The sampler's (scaled) latents from the VAE's own z: ``unscale``'s inverse, as diffusers' img2img pipelines
        scale ``vae.encode``'s latents (``(z - latents_mean) * scaling_factor / latents_std``, else
        ``(z - shift_factor) * scaling_factor``)."""
        if self.latents_mean is not None:
            view = (1, -1) + (1,) * (z.ndim - 2)
            return (z - self.latents_mean.view(view)) * self.scaling_factor / self.latents_std.view(view)
        z = z - float(self.shift_factor) if self.shift_factor is not None else z
        return z * self.scaling_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) of images (N, 3, H, W) in [-1, 1]: the mode of ``vae.encode``'s latent distribution
        (LEDITS++'s and the img2img pipelines' choice), scaled (``scale``), ``batch`` images at a time."""
        dtype = _dtype(self.vae)
        out = []
        for chunk in images.to(torch.float32).split(self.batch):
            enc = self.vae.encode(chunk.to(dtype))
            dist = enc.latent_dist if hasattr(enc, "latent_dist") else enc[0]
            out.append(dist.mode() if hasattr(dist, "mode") else dist)
        return self.scale(torch.cat(out).to(torch.float32))

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's own latent z from the sampler's (scaled) latents (class docstring)."""
        if self.latents_mean is not None:
            view = (1, -1) + (1,) * (latents.ndim - 2)
            return latents * self.latents_std.view(view) / self.scaling_factor + self.latents_mean.view(view)
        z = latents / self.scaling_factor
        return z + float(self.shift_factor) if self.shift_factor is not None else z

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = _dtype(self.vae)
        z = self.unscale(latents.to(torch.float32)).to(dtype)
        out = []
        for chunk in z.split(self.batch):
            dec = self.vae.decode(chunk)
            out.append(dec.sample if hasattr(dec, "sample") else dec[0])
        return torch.cat(out).to(torch.float32).clamp(-1.0, 1.0)


def guidance_embedding(w, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LCM's guidance-scale embedding (``timestep_cond``), the sinusoidal embedding of VDM (Kingma et al. 2021)
    that diffusers' ``get_guidance_scale_embedding`` computes: for u = 1000 w and f_k = exp(-k ln(10^4) / (h - 1)),
    k < h = dim // 2, [sin(u f_k), cos(u f_k)] (zero-padded to an odd dim).  ``w``: one value per sample (or a
    number); LCM pipelines pass w = guidance_scale - 1 (the paper's omega).  Returns (len(w), dim)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4:
        raise ValueError(f"dim must be an int >= 4 (the UNet's time_cond_proj_dim), got {dim!r}")
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"w must be finite, got {w.tolist()}")
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -step)
    angles = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


# ----------------------------------------------------------------------------- local folders

def _folder(path) -> Path:
    """``path`` as a local diffusers folder (model_index.json inside), or ValueError saying what it is not."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a local diffusers folder (str or Path), got {type(path).__name__}")
    p = Path(path).expanduser()
    try:
        exists = p.exists()
    except (OSError, ValueError):  # too long for a path, or a NUL byte
        exists = False
    if not exists:
        raise ValueError(f"{str(path)!r} is not an existing folder: edmrt loads local diffusers folders only "
                         "(model_index.json, unet/ or transformer/, scheduler/); it downloads nothing, and there is "
                         "no network here to fetch a Hugging Face Hub id from")
    if not p.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a diffusers folder (with model_index.json); single-file "
                         "checkpoints are not supported")
    if not (p / "model_index.json").is_file():
        raise ValueError(f"{str(path)!r} has no model_index.json: not a diffusers pipeline folder")
    return p


def _index(folder: Path) -> dict:
    """model_index.json: component name -> class name (entries [library, class]; absent ones are [null, null])."""
    try:
        raw = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(folder / 'model_index.json')!r} cannot be read as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{str(folder / 'model_index.json')!r} must be a JSON object")
    out = {}
    for k, v in raw.items():
        if isinstance(v, list) and len(v) == 2 and isinstance(v[1], str):
            out[k] = v[1]
    return out


def _check_safetensors(folder: Path, component: str) -> None:
    """The component's weights must include safetensors; a folder with only pickled (.bin / .pt / .ckpt)
    weights is refused before anything is read."""
    sub = folder / component
    names = [f.name for f in sub.iterdir()] if sub.is_dir() else []
    if any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
        return
    pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickled:
        raise ValueError(f"{str(sub)!r} holds only pickled PyTorch weights ({', '.join(pickled)}): edmrt reads "
                         "safetensors only (nothing is unpickled); convert them, e.g. save_pretrained("
                         "safe_serialization=True) where you trust the file")
    raise ValueError(f"{str(sub)!r} holds no weights (*.safetensors)")


def _paella():
    """diffusers' ``PaellaVQModel`` (under pipelines.deprecated.wuerstchen since 0.33, pipelines.wuerstchen before)."""
    for module in ("diffusers.pipelines.deprecated.wuerstchen", "diffusers.pipelines.wuerstchen"):
        try:
            return getattr(importlib.import_module(module), "PaellaVQModel")
        except (ImportError, AttributeError):
            continue
    return None


def _from_pretrained(cls_name: str, folder: Path, component: str, dtype: torch.dtype, variant: str | None):
    diffusers = _diffusers()
    cls = getattr(diffusers, cls_name, None)
    if cls is None and cls_name == "PaellaVQModel":   # Stable Cascade's VQGAN: not exported at the top level
        cls = _paella()
    if cls is None:
        raise ValueError(f"{component}: class {cls_name!r} (model_index.json) is not in diffusers "
                         f"{diffusers.__version__}")
    _check_safetensors(folder, component)
    # low_cpu_mem_usage needs accelerate; asking for it without accelerate only prints a warning.
    lean = importlib.util.find_spec("accelerate") is not None
    return cls.from_pretrained(str(folder), subfolder=component, torch_dtype=dtype, use_safetensors=True,
                               local_files_only=True, variant=variant, low_cpu_mem_usage=lean)


def load_diffusers(path, device=None, dtype: torch.dtype = torch.float32, variant: str | None = None,
                   scheduler_overrides: dict | None = None, **kw) -> Model:
    """An ``edmrt.Model`` from a local diffusers pipeline folder (``pipe.save_pretrained(folder)``): its ``unet``
    or ``transformer``, ``scheduler`` and optional ``vae`` (the Model's decoder), weights from safetensors only
    (``use_safetensors=True``, ``local_files_only=True``: nothing is downloaded).  ``scheduler_overrides``: entries
    that replace the folder's scheduler config (e.g. ``{"clip_sample": False}`` for a DDIM config that clips x0,
    which ``from_diffusers`` refuses).  ``kw`` go to ``from_diffusers``.

    ValueError: a path that is not an existing folder (a Hub id: edmrt loads local folders only), no
    model_index.json, an unsupported network class, or weights only in pickled .bin files."""
    from ..checks import check_device

    folder = _folder(path)
    index = _index(folder)
    if ("prior" in index or "decoder" in index) and "unet" not in index:   # a Stable Cascade stage's folder
        return _cascade_stage(folder, index, "prior" if "prior" in index else "decoder", "", device, dtype, variant,
                              **kw)
    key = next((k for k in ("unet", "transformer") if k in index), None)
    if key is None or "scheduler" not in index:
        raise ValueError(f"{str(folder)!r}: model_index.json must name a unet or transformer and a scheduler, "
                         f"got {sorted(index)}")
    if index[key] not in _NETWORKS:
        raise ValueError(f"{key}: {index[key]!r} is not supported; expected one of {list(_NETWORKS)}")
    dev = check_device(device) if device is not None else torch.device("cpu")
    net = _from_pretrained(index[key], folder, key, dtype, variant).eval().requires_grad_(False).to(dev)
    vae = None
    if index.get("vae"):
        vae = _from_pretrained(index["vae"], folder, "vae", dtype, variant).eval().requires_grad_(False).to(dev)
    sched_cls = getattr(_diffusers(), index["scheduler"], None)
    if sched_cls is None:
        raise ValueError(f"scheduler: class {index['scheduler']!r} (model_index.json) is not in diffusers")
    config = sched_cls.load_config(str(folder), subfolder="scheduler", local_files_only=True)
    if scheduler_overrides is not None:
        if not isinstance(scheduler_overrides, dict) or not all(isinstance(k, str) for k in scheduler_overrides):
            raise ValueError(f"scheduler_overrides must be a dict of config entries, got {scheduler_overrides!r:.100}")
        config = {**config, **scheduler_overrides}
    meta = {"path": str(folder), **(kw.pop("metadata", None) or {})}
    if kw.get("cond_shapes") is None and index.get("text_encoder") and type(net).__name__ == "UNet2DConditionModel":
        kw["cond_shapes"] = _text_shape(folder, net.config)
    return from_diffusers(net, config, vae, metadata=meta, **kw)


def _scheduler_config(folder: Path, index: dict, component: str) -> dict:
    sched_cls = getattr(_diffusers(), index[component], None)
    if sched_cls is None:
        raise ValueError(f"{component}: class {index[component]!r} (model_index.json) is not in diffusers")
    return sched_cls.load_config(str(folder), subfolder=component, local_files_only=True)


def _cascade_shapes(role: str, unet_config, index: dict, height: int, width: int) -> dict:
    """Sample (and ``effnet``) shapes of a Stable Cascade stage at height x width pixels, as the pipelines make
    them: the prior's latents ceil(H / resolution_multiple), the decoder's int(that * latent_dim_scale) (the folder's
    pipeline config, else diffusers' defaults 42.67 and 10.67)."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1 (pixels), got {v!r}")
    multiple = float(index.get("resolution_multiple", 42.67))
    h, w = math.ceil(height / multiple), math.ceil(width / multiple)
    if role == "prior":
        return {"sample_shape": (int(unet_config["in_channels"]), h, w)}
    scale = float(index.get("latent_dim_scale", 10.67))
    return {"sample_shape": (int(unet_config["in_channels"]), int(h * scale), int(w * scale)),
            "cond_shapes": {"effnet": (int(unet_config["effnet_in_channels"]), h, w)}}


def _cascade_stage(folder: Path, index: dict, role: str, prefix: str, device, dtype, variant, height: int = 1024,
                   width: int = 1024, **kw) -> Model:
    """A Stable Cascade stage (``prefix + role``: "prior", "decoder" or the combined folder's "prior_prior"), its
    scheduler and, for the decoder, the VQGAN; shapes for height x width pixels (``_cascade_shapes``)."""
    from ..checks import check_device

    key = prefix + role
    sched_key = "prior_scheduler" if prefix else "scheduler"
    if index.get(key) != "StableCascadeUNet" or sched_key not in index:
        raise ValueError(f"{str(folder)!r}: model_index.json must name a StableCascadeUNet {key!r} and a "
                         f"{sched_key!r}, got {sorted(index)}")
    dev = check_device(device) if device is not None else torch.device("cpu")
    net = _from_pretrained(index[key], folder, key, dtype, variant).eval().requires_grad_(False).to(dev)
    vq = None
    if role == "decoder" and index.get("vqgan"):
        vq = _from_pretrained(index["vqgan"], folder, "vqgan", dtype, variant).eval().requires_grad_(False).to(dev)
    raw = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    shapes = _cascade_shapes(role, net.config, raw, height, width)
    kw = {**shapes, **{k: v for k, v in kw.items() if v is not None}}
    meta = {"path": str(folder), **(kw.pop("metadata", None) or {})}
    return from_diffusers(net, _scheduler_config(folder, index, sched_key), vq, metadata=meta, **kw)


def load_cascade(path, decoder=None, height: int = 1024, width: int = 1024, device=None,
                 dtype: torch.dtype = torch.float32, variant: str | None = None) -> tuple[Model, Model]:
    """(prior, decoder) ``edmrt.Model``s of Stable Cascade for ``edmrt.CascadeSampler``: from a combined pipeline's
    folder (``StableCascadeCombinedPipeline``: prior_prior, prior_scheduler, decoder, scheduler, vqgan), or from a
    prior pipeline's folder ``path`` and a decoder pipeline's folder ``decoder``; shaped for height x width pixels
    (the decoder's ``effnet`` input is the prior's sample shape).  Safetensors only, local folders only."""
    folder = _folder(path)
    index = _index(folder)
    if decoder is None:
        if "prior_prior" not in index:
            raise ValueError(f"{str(folder)!r} is not a combined Stable Cascade folder (no prior_prior): pass the "
                             "prior's folder and the decoder's, load_cascade(prior_dir, decoder_dir)")
        args = (device, dtype, variant, height, width)
        return (_cascade_stage(folder, index, "prior", "prior_", *args),
                _cascade_stage(folder, index, "decoder", "", *args))
    dec = _folder(decoder)
    args = (device, dtype, variant, height, width)
    return (_cascade_stage(folder, index, "prior", "", *args), _cascade_stage(dec, _index(dec), "decoder", "", *args))


def _text_shape(folder: Path, unet_config) -> dict:
    """encoder_hidden_states' per-sample shape from the folder's text encoder: (max_position_embeddings, the UNet's
    cross-attention width); {} (77 tokens) when its config does not say."""
    try:
        cfg = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        tokens = int(cfg.get("text_config", cfg)["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    dim = _text_inputs(unet_config, {})[0].shape[1]
    return {"encoder_hidden_states": (tokens, dim)}
