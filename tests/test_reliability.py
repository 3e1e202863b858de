"""Reliability of the Sampler path and the CLI: no silent NaN, no silent truncation, no broadcast, valid input
accepted, bounded work and caches, one-line CLI errors before any work, and the determinism bound per backend.
Each test names the failure it guards against (issue "Reliability and security")."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import edmrt
from edmrt.cli import main
from edmrt.models import GaussianMixture
from edmrt.models.bundled import WEIGHTS_DIR
from edmrt.engine import MAX_GUIDANCE_VALUES
from edmrt.request import GUIDANCE_MAX

ROOT = Path(__file__).resolve().parents[1]


class ShapeNet(torch.nn.Module):
    """A small conditional network F(x_in, c_noise, labels) = tanh(x_in) * (1 + label) / 4 (deterministic, any batch),
    NaN from the first stage whose sigma is below ``nan_below`` (c_noise = ln(sigma) / 4)."""

    def __init__(self, num_classes: int = 3, nan_below: float | None = None, scale: float = 1.0):
        super().__init__()
        self.num_classes, self.nan_below, self.scale = num_classes, nan_below, scale
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x_in, c_noise, class_labels=None):
        labels = class_labels
        lab = torch.zeros(x_in.shape[0]) if labels is None else labels.float()
        F = torch.tanh(x_in) * (1 + lab.view(-1, 1, 1, 1)) / 4 * self.w * self.scale
        if self.nan_below is not None:
            bad = (torch.exp(4 * c_noise.reshape(-1)) < self.nan_below).view(-1, 1, 1, 1)
            F = torch.where(bad, torch.full_like(F, float("nan")), F)
        return F


def _model(net=None, **kw) -> edmrt.Model:
    return edmrt.Model(net if net is not None else ShapeNet(), edmrt.EDMPrecond(), sample_shape=(1, 4, 4),
                       num_classes=3, **kw)


# ----------------------------------------------------------------------------- silent NaN and garbage

@pytest.mark.parametrize("backend", ["torch", "custom"])
def test_a_network_that_goes_nan_raises_naming_the_stage(backend):
    net = ShapeNet(nan_below=1.0)
    s = edmrt.Sampler(_model(net if backend == "torch" else lambda x, c, class_labels: net(x, c, class_labels)), solver="euler", steps=8,
                      backend=backend)
    first = next(i for i, sig in enumerate(s.plan.sigma) if sig < 1.0)
    with pytest.raises(FloatingPointError, match=rf"network's output at stage {first} of 8 \(sigma = "):
        s.sample(range(3), cond=[0, 1, 2])


def test_finite_but_huge_weights_raise_instead_of_giving_nan_images():
    s = edmrt.Sampler(_model(ShapeNet(scale=3e38)), solver="heun", steps=4, backend="torch")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        s.sample([0, 1], cond=[1, 2])


@pytest.mark.parametrize("w", [1e30, -5.0, float("nan"), float("inf"), True, "2"])
def test_a_guidance_weight_outside_its_range_is_refused(w):
    s = edmrt.Sampler(_model(), solver="euler", steps=3, backend="torch")
    with pytest.raises(ValueError, match=rf"guidance must be a number in \[0, {GUIDANCE_MAX}\]"):
        s.sample([0], cond=[1], guidance=w)


def test_a_network_output_of_another_shape_is_refused_not_broadcast():
    def small(x_in, c_noise, class_labels):  # (1, 1, 4, 4) for a batch of 3: broadcast would hide the bug
        return torch.zeros(1, 1, 4, 4)

    s = edmrt.Sampler(_model(small), solver="euler", steps=3)
    with pytest.raises(ValueError, match=r"must return a real floating-point tensor of shape \(3, 1, 4, 4\)"):
        s.sample(range(3), cond=0)


def test_weights_whose_header_dtype_is_wrong_are_refused(tmp_path, capsys):
    """An I32 tensor where the network has F32: loading it would sample garbage."""
    state = load_file(str(WEIGHTS_DIR / "digits.safetensors"))
    key = next(k for k, v in state.items() if v.dtype == torch.float32 and v.numel() > 4)
    state[key] = state[key].view(torch.int32)
    save_file(state, str(tmp_path / "digits.safetensors"))
    shutil.copy(WEIGHTS_DIR / "digits.json", tmp_path / "digits.json")
    with pytest.raises(ValueError, match=rf"1 wrong dtype \({key} torch.int32 \(expected torch.float32\)"):
        edmrt.load("digits", root=tmp_path)
    code = main(["export", "onnx", "--model-config", "digits", "--weights", str(tmp_path / "digits.safetensors"),
                 "-o", str(tmp_path / "x.onnx")])
    assert code == 2 and "wrong dtype" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("field,value,match", [
    ("sample_shape", [1, 16, 16], r"sample_shape \[1, 16, 16\] contradicts its architecture \(\[1, 8, 8\]\)"),
    ("num_classes", 5, "num_classes 5 contradicts its architecture"),
    ("sampling", "abc", "sampling must be an object"),
    ("sampling", {"solver": "heun", "steps": 0}, "sampling.steps must be an int >= 1"),
    ("sampling", {"levels": {"2": [80.0, 0.0]}}, "sampling.levels must map a step count N to N \\+ 1"),
])
def test_model_card_fields_are_checked_against_the_architecture(tmp_path, field, value, match):
    shutil.copy(WEIGHTS_DIR / "digits.safetensors", tmp_path / "digits.safetensors")
    card = json.loads((WEIGHTS_DIR / "digits.json").read_text())
    card[field] = value
    (tmp_path / "digits.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=match):
        edmrt.load("digits", root=tmp_path)


def test_a_model_whose_classes_or_channels_contradict_its_network_is_refused():
    net = edmrt.models.build_unet("tiny", num_classes=4)
    with pytest.raises(ValueError, match="contradicts the network's num_classes=4"):
        edmrt.Model(net, sample_shape=net.sample_shape, num_classes=2)
    with pytest.raises(ValueError, match=r"contradicts the network's sample_shape \(2, 8, 8\)"):
        edmrt.Model(net, sample_shape=(3, 8, 8), num_classes=4)
    with pytest.raises(ValueError, match=r"contradicts the network's sample_shape \(2, 8, 8\)"):
        edmrt.Model(net, sample_shape=(2, 16, 16), num_classes=4)  # built (and trained) for 8x8
    with pytest.raises(ValueError, match="sample_shape must be a non-empty sequence of ints"):
        edmrt.Model(net, sample_shape=(2, 8, 8.5), num_classes=4)  # not truncated to 8


# ----------------------------------------------------------------------------- silent truncation

@pytest.mark.parametrize("seeds", [[1.7, 2.2], [True, 2], torch.tensor([1.0, 2.0]), "12", [1, 2.0]])
def test_float_and_bool_seeds_are_refused_not_truncated(seeds):
    s = edmrt.Sampler(_model(), solver="euler", steps=2, backend="torch")
    with pytest.raises(ValueError, match="seeds must"):
        s.sample(seeds, cond=0)


@pytest.mark.parametrize("cond", [3.9, True, [0.5, 1], torch.tensor([1.0, 2.0]), [True, False]])
def test_float_and_bool_labels_are_refused_not_truncated(cond):
    s = edmrt.Sampler(_model(), solver="euler", steps=2, backend="torch")
    with pytest.raises(ValueError, match=r"cond must hold one class in \[0, 3\) per seed"):
        s.sample([0, 1], cond=cond)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_complex_denoiser_output_is_refused_not_cast(dtype):
    g = GaussianMixture.random(K=3, D=6, seed=1)
    with pytest.raises(ValueError, match="real floating-point tensor"):
        edmrt.solve(lambda x, s: g(x, s).to(torch.complex64), torch.randn(2, 6, dtype=dtype), steps=3)


# ----------------------------------------------------------------------------- valid input accepted

def test_solve_accepts_noise_and_denoisers_that_require_grad(gen):
    g = GaussianMixture.random(K=3, D=6, seed=2)
    noise = torch.randn(4, 6, generator=gen)
    plain = edmrt.solve(g, noise, solver="dpmpp_2m", steps=6)
    lin = torch.nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))
        lin.bias.zero_()

    def den(x, sigma):  # an nn.Module in the loop: its output requires grad
        return lin(g(x, sigma).float()).to(x.dtype)

    got = edmrt.solve(den, noise.clone().requires_grad_(), solver="dpmpp_2m", steps=6)
    assert not got.requires_grad and (got - plain).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- bounded work and caches

def test_an_absurd_step_count_is_refused_before_any_work():
    g = GaussianMixture.random(K=2, D=3, seed=0)
    calls = []
    with pytest.raises(ValueError, match=r"steps must be in \[1, 10000\]"):
        edmrt.solve(lambda x, s: calls.append(1) or g(x, s), torch.randn(1, 3), steps=10 ** 7)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 10000\]"):
        edmrt.Sampler(_model(), steps=10 ** 7, backend="torch")
    assert not calls


def test_the_samplers_engine_cache_and_an_engines_guidance_bindings_are_bounded():
    s = edmrt.Sampler(_model(), solver="euler", steps=3, backend="torch", max_engines=3)
    first = s.sample([7, 8], cond=[1, 2])
    for n in range(1, 7):
        s.sample(range(n), cond=0)
    assert len(s._engines) == 3
    assert torch.equal(s.sample([7, 8], cond=[1, 2]), first)  # an evicted engine is rebuilt to the same result
    e = s.engine(2, True)
    for k in range(3 * MAX_GUIDANCE_VALUES):
        e.run(torch.tensor([1, 2]), torch.tensor([0, 1]), guidance=1.0 + k / 10)
    assert len(e._steppers) == MAX_GUIDANCE_VALUES
    with pytest.raises(ValueError, match="max_engines must be an int >= 1"):
        edmrt.Sampler(_model(), backend="torch", max_engines=0)


# ----------------------------------------------------------------------------- threads (torch and custom backends)

@pytest.mark.parametrize("backend", ["torch", "custom"])
def test_one_sampler_shared_by_threads_equals_single_threaded(backend):
    net = ShapeNet()
    s = edmrt.Sampler(_model(net if backend == "torch" else lambda x, c, class_labels: net(x, c, class_labels)), solver="heun", steps=4,
                      backend=backend)
    jobs = [(list(range(10 * b, 10 * b + b)), [i % 3 for i in range(b)], w) for b in (5, 6, 7, 8)
            for w in (None, 2.0)]
    want = [s.sample(seeds, cond=cond, guidance=w) for seeds, cond, w in jobs]
    got, errors = [None] * len(jobs), []

    def worker(k):
        try:
            for _ in range(3):
                seeds, cond, w = jobs[k]
                got[k] = s.sample(seeds, cond=cond, guidance=w)
        except Exception as exc:  # collected: a thread's exception must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ----------------------------------------------------------------------------- determinism per backend

@pytest.mark.parametrize("backend,bound", [("torch", 1e-5), ("onnxruntime", 0.0)])
def test_a_sample_depends_on_its_seed_not_its_batch_within_the_backends_bound(backend, bound, tmp_path,
                                                                              monkeypatch):
    """torch's convolutions pick other kernels for other batch sizes: within 1e-5 of the scale (measured <= 7.7e-7);
    ONNX Runtime here: bit for bit (docs/guarantees.md)."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        monkeypatch.setenv("EDMRT_CACHE", str(tmp_path))
    s = edmrt.Sampler(edmrt.load("digits-cd"), backend=backend)
    full = s.sample(range(16), cond=[i % 10 for i in range(16)])
    scale = float(full.abs().max())
    for part in ([5], [0, 15], list(range(3, 10))):
        got = s.sample(part, cond=[i % 10 for i in part])
        assert (got - full[part]).abs().max().item() <= bound * scale


# ----------------------------------------------------------------------------- the CLI

def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edmrt.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_sample_help_works():
    r = _run_cli(["sample", "--help"])
    assert r.returncode == 0 and "seed index % 10" in r.stdout


@pytest.mark.parametrize("argv,match", [
    (["sample", "-o", "/missing/dir/x.png"], "the folder '/missing/dir' does not exist"),
    (["sample", "--guidance", "-5"], r"guidance must be a number in \[0, 100.0\]"),
    (["sample", "--onnx", "x.onnx", "--backend", "torch"], "drop --backend torch"),
    (["sample", "--class", "12"], r"--class must be in \[0, 10\)"),
    (["sample", "--seeds", "1.5"], "--seeds must look like 0-39"),
])
def test_sample_refuses_bad_arguments_before_sampling(monkeypatch, capsys, argv, match):
    def never(*a, **k):
        raise AssertionError("sampling started before the arguments were checked")

    monkeypatch.setattr(edmrt, "Sampler", never)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("edmrt sample: error:")
    assert __import__("re").search(match, err), err


def test_cli_errors_are_one_line_with_status_2():
    for argv in (["quality", "--nfe", "0"], ["train", "--iters", "-1"], ["plan", "nope"], ["solvers", "--bogus"]):
        r = _run_cli(argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert "Traceback" not in r.stderr, (argv, r.stderr)


def test_plan_into_a_closed_pipe_ends_quietly():
    p1 = subprocess.Popen([sys.executable, "-m", "edmrt.cli", "plan", "heun", "--steps", "400"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, cwd=ROOT)
    p1.stdout.readline()
    p1.stdout.close()  # the reader goes away, as `| head -1` does
    err = p1.stderr.read().decode()
    assert p1.wait(timeout=60) == 0 and "BrokenPipeError" not in err and "Traceback" not in err


def test_resume_from_a_checkpoint_holding_a_pickle_is_one_line(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["train", "--config", "tiny", "--iters", "2", "--batch", "4", "--quiet", "--checkpoint", str(ck)]) == 0
    torch.save({"state": ShapeNet}, ck / "optimizer.pt")  # a class: weights_only refuses to unpickle it
    capsys.readouterr()
    assert main(["train", "--config", "tiny", "--iters", "4", "--quiet", "--resume", str(ck)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume from" in err


def test_many_seeds_are_sampled_in_batches_and_the_grid_is_capped(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", "digits-cd", "--backend", "torch", "--seeds", "0-999", "--max-batch", "300",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sampled 1000 images" in text and "the first 400 of 1000 samples" in text and out.stat().st_size > 1000


# ----------------------------------------------------------------------------- found by benchmarks/probe_inputs.py

@pytest.mark.parametrize("kw,match", [
    (dict(sigma_min="0.1"), "sigma_min must be a finite number > 0"),
    (dict(sigma_min=True), "sigma_min must be a finite number > 0"),
    (dict(rho="7"), "rho must be a finite number > 0"),
    (dict(rho=1e300), r"rho must be in \[0.01, 100\]"),
    (dict(sigma_min=1e-100), r"sigma_min must be >= 1e-06"),
    (dict(sigma_max=1e300), r"sigma_max must be <= 1e\+10"),
    (dict(schedule=["80", "1"]), "sigmas must hold real numbers only"),
    (dict(schedule=[1e300, 1.0]), r"sigmas must lie in \[1e-06, 1e\+10\]"),
    (dict(solver="edm", S_churn="40"), "S_churn must be a number"),
    (dict(solver="edm", S_churn=True), "S_churn must be a number"),
    (dict(solver="dpmpp_2m_sde", eta="1"), "eta must be a number"),
    (dict(solver="edm", S_churn=10, S_noise=1e300), r"S_noise must be a finite number \[0.0, 10.0\]"),
])
def test_strings_bools_and_out_of_range_numbers_are_refused_by_name(kw, match):
    g = GaussianMixture.random(K=2, D=4, seed=0)
    with pytest.raises(ValueError, match=match):
        edmrt.solve(g, torch.randn(2, 4), steps=4, seeds=[0, 1], **kw)


def test_one_element_tensors_fractions_and_numpy_numbers_are_numbers():
    import fractions

    import numpy as np

    a = edmrt.make_sigmas("karras", 4, sigma_min=torch.tensor(0.002, dtype=torch.float64), sigma_max=np.float32(80))
    b = edmrt.make_sigmas("karras", 4, sigma_min=0.002, sigma_max=fractions.Fraction(80))
    assert np.array_equal(a, b) and a[0] == 80.0


def test_noise_with_no_elements_or_on_the_meta_device_is_refused_by_name():
    g = GaussianMixture.random(K=2, D=4, seed=0)
    for noise in (torch.zeros(2, 0), torch.empty(2, 4, device="meta")):
        with pytest.raises(ValueError, match="noise must"):
            edmrt.solve(g, noise)
    with pytest.raises(ValueError, match="overflows"):
        edmrt.solve(g, torch.full((1, 4), 1e37))


@pytest.mark.parametrize("executor", ["fused", "reference"])
@pytest.mark.parametrize("bad,match", [(float("nan"), "noise must be finite"), (-float("inf"), "noise must be finite"),
                                       (-1e37, "overflows torch.float32")])
def test_bad_noise_is_refused_before_the_denoiser_is_called(executor, bad, match):
    """One reduction over the noise (its extremes) finds NaN, Inf and a t_0 * noise that overflows, whichever
    executor runs, before any evaluation."""
    calls = []
    noise = torch.randn(3, 2, 37)
    noise[1, 1, 5] = bad

    def den(x, sigma):
        calls.append(1)
        return x
    with pytest.raises(ValueError, match=match):
        edmrt.solve(den, noise, solver="euler", steps=4, executor=executor)
    assert calls == []


def test_solve_scales_the_noise_in_the_engine_as_t0_times_noise():
    """The fused solve computes t_0 * noise into the cached engine's buffer (Engine.run's x_init_scale): the same
    bits as running the engine from the tensor t_0 * noise."""
    from edmrt.solve import execute_fused

    g = GaussianMixture.random(K=3, D=5, seed=2)
    noise = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    plan = edmrt.plan("dpmpp_2m", edmrt.make_sigmas("karras", 7))
    want = execute_fused(plan, g, float(plan.sigmas[0]) * noise)
    for _ in range(2):  # the engine built, then reused
        assert torch.equal(edmrt.solve(g, noise, solver="dpmpp_2m", steps=7), want)


def test_engine_run_refuses_a_bad_x_init_scale():
    from edmrt.backends import CallableBackend
    from edmrt.engine import Engine

    plan = edmrt.plan("euler", edmrt.make_sigmas("karras", 3))
    engine = Engine(CallableBackend(lambda x, s: x), plan, 2, (4,), "cpu", cond_inputs=())
    seeds = torch.zeros(2, dtype=torch.int64)
    for bad in (float("nan"), "2", True):
        with pytest.raises(ValueError, match="x_init_scale must be a finite real number"):
            engine.run(seeds, x_init=torch.zeros(2, 4), x_init_scale=bad)
    with pytest.raises(ValueError, match="x_init_scale scales x_init: pass x_init too"):
        engine.run(seeds, x_init_scale=2.0)
    assert torch.equal(engine.run(seeds, x_init=torch.ones(2, 4), x_init_scale=3.0),
                       engine.run(seeds, x_init=torch.full((2, 4), 3.0)))


def test_callables_with_the_wrong_signature_are_refused_before_the_first_call():
    with pytest.raises(ValueError, match=r"denoiser must be callable as denoiser\(x, sigma\)"):
        edmrt.solve(lambda x: x, torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"denoiser .* got the class int itself"):
        edmrt.solve(int, torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"network must be callable as network\(x_in, c_noise\)"):
        edmrt.Model(lambda x: x, sample_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"network must be callable as network\(x_in, c_noise, class_labels=\.\.\.\)"):
        edmrt.Model(lambda x, c: x, sample_shape=(1, 4, 4), num_classes=3)
    with pytest.raises(ValueError, match=r"backend must be callable as backend\(x_in, c_noise, cond, out\)"):
        edmrt.Sampler(_model(), backend=lambda x: x)


@pytest.mark.parametrize("device", ["nope", 5, "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_a_device_that_does_not_exist_here_is_refused_by_name(device):
    with pytest.raises(ValueError, match="device"):
        edmrt.Sampler(_model(), backend="torch", device=device)
    with pytest.raises(ValueError, match="device"):
        edmrt.load("digits", device=device)


def test_a_card_that_is_a_fifo_or_a_device_is_refused_without_reading_it(tmp_path):
    import os

    shutil.copy(WEIGHTS_DIR / "digits.safetensors", tmp_path / "digits.safetensors")
    os.mkfifo(tmp_path / "digits.json")  # opening it for reading would block for ever
    with pytest.raises(ValueError, match="is not a regular file"):
        edmrt.load("digits", root=tmp_path)
    (tmp_path / "digits.json").unlink()
    (tmp_path / "digits.json").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="is not a regular file"):
        edmrt.load("digits", root=tmp_path)


def test_a_card_describing_a_huge_network_is_refused_before_any_allocation(tmp_path):
    shutil.copy(WEIGHTS_DIR / "digits.safetensors", tmp_path / "digits.safetensors")
    card = json.loads((WEIGHTS_DIR / "digits.json").read_text())
    card["architecture"]["model_channels"] = 10 ** 5  # 160 GB of weights, were it built
    (tmp_path / "digits.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="does not fit its model card's architecture"):
        edmrt.load("digits", root=tmp_path)


def test_the_fused_step_refuses_aliased_buffers_in_every_implementation():
    from edmrt import kernels as Kn

    plan = edmrt.plan("heun", edmrt.make_sigmas("karras", 3))
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    bufs = dict(table=Kn.plan_table(plan), stage=0, x=z(2, 4), x_eval=z(2, 4), F=z(2, 4), Y=z(2, 2, 4), x_in=z(2, 4),
                sigma_in=z(2), seeds=torch.zeros(2, dtype=torch.int64))
    for impl in ("reference", "cpp"):
        with pytest.raises(ValueError, match="x and x_eval must not overlap"):
            Kn.fused_step(impl=impl, **{**bufs, "x_eval": bufs["x"]})
        with pytest.raises(ValueError, match="x_in and F must not overlap"):
            Kn.fused_step(impl=impl, **{**bufs, "x_in": bufs["F"]})
    step = Kn.Stepper(bufs["table"], bufs["x"], bufs["x_eval"], bufs["Y"], bufs["x_in"], bufs["sigma_in"],
                      bufs["seeds"], impl="reference")
    for stage in (True, 1.5, None):
        with pytest.raises(ValueError, match="stage must be in"):
            step(stage, bufs["F"])


@pytest.mark.parametrize("data", [b"\xef\xbb\xbf", "utf-16", "utf-32-le"])
def test_plan_json_is_utf8_without_a_bom_in_both_readers(data):
    from edmrt import _core

    text = edmrt.plan("heun", edmrt.make_sigmas("karras", 2)).to_json()
    raw = data + text.encode() if isinstance(data, bytes) else text.encode(data)
    with pytest.raises(ValueError):
        edmrt.Plan.from_json(raw)
    with pytest.raises(ValueError):
        _core.plan_table_from_json(raw)


@pytest.mark.parametrize("argv", [[], ["nope"], ["sample", "--guidance", "abc"], ["quality", "--nfe", "0"],
                                  ["sample", "--seeds", ""], ["sample", "--seeds", "0-1000000000000"],
                                  ["export", "onnx", "--model-config", "tiny", "--batch", "1"]])
def test_every_cli_error_is_one_line_with_status_2(argv):
    r = _run_cli(argv)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
