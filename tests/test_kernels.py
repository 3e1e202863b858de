"""The fused step: torch reference, C++ core and Triton (interpreted on the CPU) against the float64
reference executor's definition; Philox noise; the C ABI with a C++ host program."""
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import edmrt
from edmrt import kernels as Kn

try:
    from edmrt import _core
except ImportError:  # a tree run without building the extension (benchmarks/gpu_check.sh's fallback)
    _core = None
needs_core = pytest.mark.skipif(_core is None, reason="the C++ core edmrt._core is not built")
from edmrt.kernels.philox import CHURN_STREAM, INITIAL_STREAM, philox4x32, philox_normal, stage_stream
from edmrt.lab.selfcheck import philox_bits_match, run_stages, solver_plans
from edmrt.kernels.table import COL, FIXED

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ["reference", "cpp", "triton"]

# Random123's known-answer vectors for Philox4x32-10 (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,out", KAT)
@needs_core
def test_philox_known_answers_in_torch_and_cpp(ctr, key, out):
    assert tuple(int(v) for v in philox4x32(*ctr, *key)) == out
    assert tuple(_core.philox(*ctr, *key)) == out


def test_philox_matches_triton_randint4x_and_randn_bit_for_bit(triton_device):
    r = philox_bits_match(triton_device)
    assert r["bits_equal"] and r["normal_max_abs_diff"] <= 1e-5, r


@needs_core
def test_philox_normal_in_cpp_and_torch_and_its_statistics():
    seeds = torch.tensor([3, 1 << 40, 12], dtype=torch.int64)
    out = np.empty((3, 20000), dtype=np.float32)
    _core.randn(seeds.numpy(), 5, out, 3)
    ref = philox_normal(seeds, 5, (20000,))
    assert np.abs(out - ref.numpy()).max() <= 1e-5  # same words; float32 log/cos may differ by ulps
    z = ref.double()
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    # A sample's noise depends on its seed only, not on its position or batch.
    assert torch.equal(philox_normal(seeds[1:2], 5, (20000,))[0], ref[1])
    assert not torch.equal(philox_normal(seeds, 6, (20000,)), ref)


def _plans():
    return [pytest.param(plan, id=name) for name, plan in solver_plans()]


def _run(plan, impl, shape, guidance, f_dtype, device="cpu"):
    return run_stages(plan, impl, shape, guidance, f_dtype, torch.device(device))


@pytest.mark.parametrize("plan", _plans())
@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("shape,guidance", [((3, 5, 7), None), ((2, 3, 61), 2.5)])
def test_every_solver_through_each_implementation_equals_the_reference(request, plan, impl, shape, guidance):
    if impl == "cpp" and _core is None:
        pytest.skip("the C++ core edmrt._core is not built")
    dev = request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")
    ref, ref_in, ref_sig = _run(plan, "reference", shape, guidance, torch.float32, dev)
    got, got_in, got_sig = _run(plan, impl, shape, guidance, torch.float32, dev)
    scale = ref.norm().item()
    assert (got - ref).abs().max().item() <= 1e-6 * scale
    assert (got_in - ref_in).abs().max().item() <= 1e-6 * max(ref_in.norm().item(), 1.0)
    assert torch.equal(got_sig, ref_sig)


@pytest.mark.parametrize("f_dtype", [torch.float16, torch.bfloat16])
def test_triton_reads_low_precision_network_outputs(triton_device, f_dtype):
    plan = edmrt.plan("dpmpp_2m", edmrt.make_sigmas("karras", 6), edmrt.EDMPrecond())
    ref, _, _ = _run(plan, "reference", (2, 3, 50), None, f_dtype, triton_device)
    got, _, _ = _run(plan, "triton", (2, 3, 50), None, f_dtype, triton_device)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.norm().item()


@needs_core
def test_fused_solve_equals_the_reference_executor(gen):
    """edmrt.solve on float32 runs the fused C++ step; float64 runs the reference loop."""
    from edmrt.models import GaussianMixture

    g = GaussianMixture.random(K=6, D=30, seed=2)
    noise = torch.randn(5, 30, generator=gen)
    for solver, opts in [("heun", {}), ("dpmpp_3m_sde", {}), ("tcd", dict(gamma=0.4)), ("unipc", {})]:
        fast = edmrt.solve(g, noise, solver=solver, steps=8, seeds=[1, 2, 3, 4, 5], **opts)
        ref = edmrt.solve(g, noise.double(), solver=solver, steps=8, seeds=[1, 2, 3, 4, 5], **opts)
        assert fast.dtype == torch.float32
        assert (fast.double() - ref).abs().max().item() <= 2e-4 * ref.norm().item() / math.sqrt(ref.numel())


@needs_core
def test_cpp_plan_reader_builds_the_same_table():
    for p in [edmrt.plan("unipc", edmrt.make_sigmas("karras", 7), edmrt.EDMPrecond(), order=3),
              edmrt.plan("edm", edmrt.make_sigmas("karras", 4), S_churn=20.0)]:
        assert np.array_equal(_core.plan_table_from_json(p.to_json()), Kn.plan_table(p).numpy())
    with pytest.raises(ValueError, match="malformed"):
        _core.plan_table_from_json('{"format": "edmrt.plan", "version": 1, "sigma": [1.0,')
    with pytest.raises(ValueError, match="lacks field 'alpha'"):
        d = edmrt.plan("heun", edmrt.make_sigmas("karras", 3)).to_dict()
        del d["alpha"]
        import json
        _core.plan_table_from_json(json.dumps(d))


def _bufs(device="cpu", B=2, shape=(3, 4), K=2):
    p = edmrt.plan("heun", edmrt.make_sigmas("karras", 3))
    z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    return dict(table=Kn.plan_table(p, device), stage=0, x=z(B, *shape), x_eval=z(B, *shape), F=z(B, *shape),
                Y=z(K, B, *shape), x_in=z(B, *shape), sigma_in=z(B), seeds=z(B, dtype=torch.int64))


BAD_BUFFERS = [
    (lambda d: dict(stage=5), r"stage must be an int in \[0, 5\)"),
    (lambda d: dict(stage=-1), "stage must be"),
    (lambda d: dict(F=torch.zeros(2, 3, 4, dtype=torch.float64, device=d)), "F must have dtype"),
    (lambda d: dict(F=torch.zeros(2, 3, 5, device=d)), r"F must have shape \(2, 3, 4\)"),
    (lambda d: dict(Y=torch.zeros(3, 2, 3, 4, device=d)), "Y must have shape"),
    (lambda d: dict(x_eval=torch.zeros(4, 3, device=d).t()), "x_eval must have shape"),
    (lambda d: dict(x_in=torch.zeros(2, 4, 3, device=d).transpose(1, 2)), "x_in must be contiguous"),
    (lambda d: dict(seeds=torch.zeros(2, dtype=torch.int32, device=d)), "seeds must have dtype"),
    (lambda d: dict(table=torch.zeros(5, 14, device=d)), "table must have dtype"),
    (lambda d: dict(table=torch.zeros(5, 1, dtype=torch.float64, device=d)), r"table must have shape \(S, 12 \+ K\)"),
    (lambda d: dict(table=torch.zeros(5, 29, dtype=torch.float64, device=d)), r"table must have shape \(S, 12 \+ K\)"),
    (lambda d: dict(sigma_in=torch.zeros(2, device="meta")), "sigma_in must be on"),
    (lambda d: dict(guidance=float("nan")), "guidance must be a finite float"),
    (lambda d: dict(guidance=2.0), r"F must have shape \(4, 3, 4\)"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("change,match", BAD_BUFFERS, ids=[m for _, m in BAD_BUFFERS])
def test_bad_buffers_raise(request, impl, change, match):
    if impl == "cpp" and _core is None:
        pytest.skip("the C++ core edmrt._core is not built")
    dev = request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")
    args = _bufs(dev)
    args.update(change(dev))
    with pytest.raises(ValueError, match=match):
        Kn.fused_step(impl=impl, **args)


@needs_core
def test_cpp_rejects_low_precision_and_unknown_impls():
    args = _bufs()
    args["F"] = args["F"].half()
    with pytest.raises(ValueError, match="F must have dtype"):
        Kn.fused_step(impl="cpp", **args)
    with pytest.raises(ValueError, match="impl must be one of"):
        Kn.fused_step(impl="cuda", **_bufs())


def _compiler():
    for cc in ("c++", "g++", "clang++"):
        if shutil.which(cc):
            return shutil.which(cc)
    return None


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler on PATH to build the C ABI test host")
def test_c_abi_host_program_runs_a_heun_plan(tmp_path):
    """Build cpp/tests/heun_gaussian.cpp against the core's sources (argument list, no shell) and compare its
    Heun run with a closed-form Gaussian denoiser to the float64 reference executor: <= 1e-6 relative."""
    exe = tmp_path / "heun_gaussian"
    srcs = [ROOT / "cpp" / f for f in ("philox.cpp", "step.cpp", "plan_json.cpp", "capi.cpp")]
    cmd = [_compiler(), "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-fopenmp", "-I", str(ROOT / "cpp" / "include"),
           str(ROOT / "cpp" / "tests" / "heun_gaussian.cpp"), *map(str, srcs), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    plan = edmrt.plan("heun", edmrt.make_sigmas("karras", 18))
    plan.save(tmp_path / "plan.json")
    seeds, n, mu, s = [4, 8, 15, 16], 33, 0.3, 0.5
    out = subprocess.run([str(exe), str(tmp_path / "plan.json"), str(len(seeds)), str(n), str(mu), str(s),
                          *map(str, seeds)], check=True, capture_output=True, text=True).stdout
    got = torch.tensor([float(v) for v in out.split()], dtype=torch.float64).view(len(seeds), n)
    x_init = float(plan.sigmas[0]) * philox_normal(seeds, INITIAL_STREAM, (n,)).double()
    ref = edmrt.execute(plan, lambda x, sigma: mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu), x_init)
    assert (got - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item())
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "edmrt.plan", "version": 1')
    r = subprocess.run([str(exe), str(bad), "1", "1", "0", "1", "0"], capture_output=True, text=True)
    assert r.returncode == 1 and "malformed" in r.stderr


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_deep_history_beyond_the_specialised_terms(request, impl):
    """No solver here needs K > 4, but the table allows K <= 16: a hand-made plan with K = 6 and dense
    weights must still equal the reference (the C++ core's generic extra-terms path)."""
    from dataclasses import replace

    base = edmrt.plan("dpmpp_3m", edmrt.make_sigmas("karras", 9), edmrt.EDMPrecond())
    rng = np.random.default_rng(5)
    b = np.tril(rng.normal(scale=0.2, size=(base.stages, 6)), k=0)
    b = np.array([[b[s, k] if k <= s else 0.0 for k in range(6)] for s in range(base.stages)])
    commit = np.ones(base.stages, dtype=bool)
    commit[3] = False
    plan = replace(base, b=b, commit=commit, n=np.where(np.arange(base.stages) % 3 == 1, 0.3, 0.0))
    if impl == "cpp" and _core is None:
        pytest.skip("the C++ core edmrt._core is not built")
    dev = request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")
    ref, _, _ = _run(plan, "reference", (2, 3, 29), None, torch.float32, dev)
    got, _, _ = _run(plan, impl, (2, 3, 29), None, torch.float32, dev)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.norm().item()


def _device(request, impl):
    if impl == "cpp" and _core is None:
        pytest.skip("the C++ core edmrt._core is not built")
    return request.getfixturevalue("triton_device") if impl == "triton" else torch.device("cpu")


@pytest.mark.parametrize("impl", IMPLS)
def test_stepper_validates_once_and_equals_the_reference(request, impl, gen):
    """Stepper(impl) against fused_step(impl="reference") from the same initial state on fresh random network
    outputs, outputs poisoned with NaN before every stage: within 1e-6 of the state's norm, exact for the reference."""
    dev = _device(request, impl)
    plan = edmrt.plan("dpmpp_2m_sde", edmrt.make_sigmas("karras", 6), edmrt.EDMPrecond())
    table = Kn.plan_table(plan, dev)
    a, b = _bufs(dev, K=plan.history), _bufs(dev, K=plan.history)
    seeds = torch.randint(0, 2 ** 62, (2,), generator=gen).to(dev)
    Kn.init_state(table, float(plan.sigmas[0]), plan.n_init, seeds, a["x"], a["x_eval"], a["x_in"], a["sigma_in"],
                  impl="reference")
    for name in ("x", "x_eval", "x_in", "sigma_in"):
        b[name].copy_(a[name])
    for bufs in (a, b):
        bufs.update(table=table, seeds=seeds)
        bufs["Y"].fill_(math.nan)
    assert a["x"].abs().min().item() > 0
    step = Kn.Stepper(b["table"], b["x"], b["x_eval"], b["Y"], b["x_in"], b["sigma_in"], b["seeds"], impl=impl)
    for s in range(plan.stages):
        F = torch.randn(2, 3, 4, generator=gen).to(dev)
        for bufs in (a, b):
            bufs["x_in"].fill_(math.nan)
            bufs["sigma_in"].fill_(math.nan)
            bufs["Y"][s % plan.history] = math.nan
        Kn.fused_step(**{**a, "stage": s, "F": F}, impl="reference")
        step(s, F)
        for name in ("x", "x_eval", "x_in"):
            ref, got = a[name], b[name]
            if impl == "reference":
                assert torch.equal(got, ref), (name, s)
            else:
                assert (got - ref).abs().max().item() <= 1e-6 * max(ref.norm().item(), 1.0), (name, s)
        assert torch.equal(b["sigma_in"], a["sigma_in"])
    with pytest.raises(ValueError, match=r"F must be a contiguous torch.float32 tensor of shape \(2, 3, 4\)"):
        step(0, torch.zeros(2, 3, 5, device=dev))
    with pytest.raises(ValueError, match="stage must be in"):
        step(plan.stages, torch.zeros(2, 3, 4, device=dev))
    with pytest.raises(ValueError, match="Y must have shape"):
        Kn.Stepper(b["table"], b["x"], b["x_eval"], b["Y"][:1], b["x_in"], b["sigma_in"], b["seeds"], impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_init", [0.0, 0.7])
@pytest.mark.parametrize("twice", [False, True], ids=["x_in", "x_in_twice"])
def test_init_state_from_a_given_x0(request, impl, n_init, twice, gen):
    """x = x0 + n_init N(seed, CHURN_STREAM), x_eval = x, x_in = c_in[0] x (both halves), sigma_in = c_noise[0];
    outputs poisoned with NaN; exact without churn or for the reference, else within 1e-6 of the norm."""
    dev = _device(request, impl)
    plan = edmrt.plan("edm", edmrt.make_sigmas("karras", 4), S_churn=20.0)
    table = Kn.plan_table(plan, dev)
    B, shape = 3, (3, 5, 7)
    nin = 2 * B if twice else B
    seeds = torch.randint(0, 2 ** 62, (B,), generator=gen).to(dev)
    x0 = (80.0 * torch.randn(shape, generator=gen)).to(dev)
    x0_before = x0.clone()
    nan = lambda *s: torch.full(s, math.nan, device=dev)  # noqa: E731
    x, x_eval, x_in, sigma_in = nan(*shape), nan(*shape), nan(nin, *shape[1:]), nan(nin)
    Kn.init_state(table, float(plan.sigmas[0]), n_init, seeds, x, x_eval, x_in, sigma_in, impl=impl, x0=x0)

    want = x0_before.clone()
    if n_init:
        churn = philox_normal(seeds, CHURN_STREAM, shape[1:], device=dev)
        want = want + torch.tensor(n_init, dtype=torch.float32) * churn
    want_in = table[0, COL["c_in"]].float() * want
    exact = impl == "reference" or not n_init
    pairs = [(x, want), (x_eval, want), (x_in[:B], want_in)] + ([(x_in[B:], want_in)] if twice else [])
    for got, ref in pairs:
        if exact:
            assert torch.equal(got, ref)
        else:
            assert (got - ref).abs().max().item() <= 1e-6 * ref.norm().item()
    assert torch.equal(sigma_in, torch.full((nin,), plan.c_noise[0], dtype=torch.float32, device=dev))
    assert torch.equal(x0, x0_before)
    # x0 may be x itself.
    x.copy_(x0_before)
    Kn.init_state(table, float(plan.sigmas[0]), n_init, seeds, x, x_eval, x_in, sigma_in, impl=impl, x0=x)
    assert (x - want).abs().max().item() <= (0.0 if exact else 1e-6 * want.norm().item())


BAD_X0 = [
    (lambda d: [0.0] * 105, "x0 must be a torch.Tensor"),
    (lambda d: torch.zeros(3, 5, 7, dtype=torch.float64, device=d), "x0 must have dtype"),
    (lambda d: torch.zeros(3, 5, 6, device=d), r"x0 must have shape \(3, 5, 7\)"),
    (lambda d: torch.zeros(3, 7, 5, device=d).transpose(1, 2), "x0 must be contiguous"),
    (lambda d: torch.zeros(3, 5, 7, device="meta"), "x0 must be on"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make,match", BAD_X0, ids=[m for _, m in BAD_X0])
def test_init_state_rejects_a_bad_x0(request, impl, make, match):
    dev = _device(request, impl)
    table = Kn.plan_table(edmrt.plan("heun", edmrt.make_sigmas("karras", 3)), dev)
    z = lambda *s: torch.zeros(s, device=dev)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        Kn.init_state(table, 1.0, 0.0, torch.zeros(3, dtype=torch.int64, device=dev), z(3, 5, 7), z(3, 5, 7),
                      z(3, 5, 7), z(3), impl=impl, x0=make(dev))


BAD_INIT = [
    # Issue 11, item 2: the C++ core read c_noise past the end of a (1, 1) table and wrote it into sigma_in.
    (lambda d: dict(table=torch.ones(1, 1, dtype=torch.float64, device=d)),
     r"table must have shape \(S, 12 \+ K\) with S >= 1 and 1 <= K <= 16, got \(1, 1\)"),
    (lambda d: dict(table=torch.ones(1, FIXED + 17, dtype=torch.float64, device=d)), "table must have shape"),
    (lambda d: dict(table=torch.ones(0, FIXED + 1, dtype=torch.float64, device=d)), "table must have shape"),
    (lambda d: dict(table=torch.ones(FIXED + 1, 2, dtype=torch.float64, device=d).t()), "table must be contiguous"),
    (lambda d: dict(table=torch.ones(1, FIXED + 1, device=d)), "table must have dtype"),
    (lambda d: dict(seeds=torch.zeros(2, dtype=torch.int64, device=d)), r"seeds must have shape \(3,\)"),
    (lambda d: dict(x_eval=torch.zeros(3, 5, 6, device=d)), r"x_eval must have shape \(3, 5, 7\)"),
    (lambda d: dict(x_in=torch.zeros(4, 5, 7, device=d)), r"x_in must have shape \(3 or 6, ...\)"),
    (lambda d: dict(sigma_in=torch.zeros(6, device=d)), r"sigma_in must have shape \(3,\)"),
    (lambda d: dict(x=torch.zeros(3, 5, 7, dtype=torch.float64, device=d)), "x must be a contiguous float32 tensor"),
    (lambda d: dict(t0=float("inf")), "t0 must be a finite number >= 0"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("change,match", BAD_INIT, ids=[m for _, m in BAD_INIT])
def test_init_state_rejects_bad_buffers(request, impl, change, match):
    """edmrt.kernels.init_state checks every buffer (the table's width included) before any implementation runs."""
    dev = _device(request, impl)
    z = lambda *s: torch.zeros(s, device=dev)  # noqa: E731
    args = dict(table=Kn.plan_table(edmrt.plan("heun", edmrt.make_sigmas("karras", 3)), dev), t0=1.0, n_init=0.0,
                seeds=torch.zeros(3, dtype=torch.int64, device=dev), x=z(3, 5, 7), x_eval=z(3, 5, 7), x_in=z(3, 5, 7),
                sigma_in=torch.full((3,), -1.0, device=dev))
    args.update(change(dev))
    with pytest.raises(ValueError, match=match):
        Kn.init_state(impl=impl, **args)
    if "sigma_in" not in change(dev):
        assert torch.equal(args["sigma_in"], torch.full((3,), -1.0, device=dev))  # nothing was written


@pytest.mark.parametrize("impl", IMPLS)
def test_each_implementation_draws_the_streams_of_philox_py(request, impl):
    """A hand-made table whose stages are pure noise (x_new = N(seed, stage_stream(s))) shows the Philox stream
    each implementation draws: INITIAL_STREAM, CHURN_STREAM, then stage_stream(s) at stage s."""
    dev = _device(request, impl)
    S, B, shape = 4, 2, (2, 3, 37)
    table = torch.zeros(S, FIXED + 1, dtype=torch.float64)
    for name in ("c_in", "n", "commit", "c_in_next"):
        table[:, COL[name]] = 1.0
    table = table.to(dev)
    seeds = torch.tensor([9, 2 ** 50 + 3], dtype=torch.int64, device=dev)
    nan = lambda *s: torch.full(s, math.nan, device=dev)  # noqa: E731
    x, x_eval, Y, x_in, sigma_in = nan(*shape), nan(*shape), nan(1, *shape), nan(*shape), nan(B)
    tol = 0.0 if impl == "reference" else 1e-5  # same words; float32 log/cos may differ by ulps

    def noise(stream):
        return philox_normal(seeds, stream, shape[1:], device=dev)

    Kn.init_state(table, 1.0, 0.0, seeds, x, x_eval, x_in, sigma_in, impl=impl)
    assert (x - noise(INITIAL_STREAM)).abs().max().item() <= tol
    Kn.init_state(table, 0.0, 1.0, seeds, x, x_eval, x_in, sigma_in, impl=impl)
    assert (x - noise(CHURN_STREAM)).abs().max().item() <= tol
    for s in range(S):
        Kn.fused_step(table, s, x, x_eval, torch.zeros(shape, device=dev), Y, x_in, sigma_in, seeds, impl=impl)
        assert (x - noise(stage_stream(s))).abs().max().item() <= tol
        assert (x_in - noise(stage_stream(s))).abs().max().item() <= tol


# Every solver's stages (stochastic ones included, with guidance and without) on a state below the threading
# threshold and one above it whose size is no multiple of 16, run in a subprocess under the given environment;
# prints the results as hex of float32 bits (exactness is the question, not closeness).
_ISA_SCRIPT = """
import sys, torch, edmrt
from edmrt import _core
from edmrt.lab.selfcheck import run_stages, solver_plans
out = [_core.step_isa()]
for name, plan in solver_plans(4):
    for shape, w in (((3, 5, 7), None), ((2, 3, 61), 2.5), ((3, 11, 1001), None), ((2, 7, 2371), 1.5)):
        x, x_in, _ = run_stages(plan, "cpp", shape, w, torch.float32, torch.device("cpu"))
        out.append(name + " " + x.numpy().tobytes().hex()[:4096] + " " + str(hash(x.numpy().tobytes()))
                   + " " + str(hash(x_in.numpy().tobytes())))
print("\\n".join(out))
"""


def _isa_run(threads: int, isa: str | None) -> list[str]:
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "EDMRT_STEP_ISA"}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
    if isa is not None:
        env["EDMRT_STEP_ISA"] = isa
    r = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("\n")


@needs_core
def test_cpp_step_gives_the_same_bits_on_every_instruction_set_and_thread_count():
    """The deterministic update is compiled for the x86-64 baseline and for AVX2 (chosen at run time) and cut into
    one slice per OpenMP thread above 2**15 elements: every solver's result is the same bits whichever is used
    (the same IEEE operations per element, no fused multiply-add)."""
    one = _isa_run(1, None)
    three = _isa_run(3, None)
    base = _isa_run(3, "baseline")
    assert base[0] == "baseline" and one[0] in ("avx2", "baseline")
    assert len(one) == len(three) == len(base) > 1
    assert one[1:] == three[1:]
    assert one[1:] == base[1:]


@needs_core
@pytest.mark.parametrize("plan", _plans())
@pytest.mark.parametrize("shape,guidance", [((3, 11, 1001), None), ((2, 7, 2371), 1.5)])
def test_cpp_step_above_the_threading_threshold_equals_the_reference(plan, shape, guidance):
    """States of more than 2**15 elements run on every OpenMP thread, in slices cut at multiples of 16 elements:
    odd sizes (a slice boundary inside a sample, a short last slice) against the torch reference."""
    ref, ref_in, ref_sig = _run(plan, "reference", shape, guidance, torch.float32)
    got, got_in, got_sig = _run(plan, "cpp", shape, guidance, torch.float32)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.norm().item()
    assert (got_in - ref_in).abs().max().item() <= 1e-6 * max(ref_in.norm().item(), 1.0)
    assert torch.equal(got_sig, ref_sig)
