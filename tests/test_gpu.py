"""GPU-only checks: the Triton kernel compiled for CUDA against the reference, every solver and dtype.
They skip on machines without CUDA (CI); ``benchmarks/gpu_check.sh`` runs them on a lent GPU."""
import math
import os

import pytest
import torch

import edmrt
from edmrt.lab.selfcheck import compare_impls, philox_bits_match

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET unset or 0)")


def test_triton_on_cuda_equals_the_reference_for_every_solver_and_dtype():
    rows = compare_impls("triton", torch.device("cuda"), f_dtypes=(torch.float32, torch.float16, torch.bfloat16))
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad[:5]


def test_philox_on_cuda():
    r = philox_bits_match(torch.device("cuda"))
    assert r["ok"], r


def test_fused_solve_on_cuda_equals_the_float64_reference():
    from edmrt.models import GaussianMixture

    g = GaussianMixture.random(K=6, D=48, seed=1)
    noise = torch.randn(7, 48, generator=torch.Generator().manual_seed(3))
    for solver in ("heun", "dpmpp_2m_sde", "unipc"):
        fast = edmrt.solve(g, noise.cuda(), solver=solver, steps=10, seeds=list(range(7)))
        ref = edmrt.solve(g, noise.double(), solver=solver, steps=10, seeds=list(range(7)))
        assert fast.device.type == "cuda"
        assert (fast.cpu().double() - ref).abs().max().item() <= 2e-4 * ref.norm().item() / math.sqrt(ref.numel())


def test_whole_loop_cuda_graph_equals_eager_and_the_reference():
    """The captured graph (network + fused steps, every stage) replays to the eager engine's result, for
    new seeds copied into the static buffers, and both equal the float64 reference executor."""
    from edmrt import Engine
    from edmrt.kernels.philox import INITIAL_STREAM, philox_normal
    from edmrt.models import GaussianMixture

    g = GaussianMixture.random(K=5, D=40, seed=2)
    plan = edmrt.plan("dpmpp_2m_sde", edmrt.make_sigmas("karras", 12))
    dev = torch.device("cuda")
    gc = GaussianMixture.random(K=5, D=40, seed=2)
    gc.means, gc.stds, gc.weights = gc.means.to(dev), gc.stds.to(dev), gc.weights.to(dev)  # no copies in capture

    def backend(x_in, c_noise, labels, out):
        out.copy_(gc(x_in, c_noise.reshape(-1, 1)))
    graph = Engine(backend, plan, 3, (40,), dev, graph=True)
    eager = Engine(backend, plan, 3, (40,), dev, graph=False)
    for seeds in ([1, 2, 3], [10, 20, 30]):
        s = torch.tensor(seeds, device=dev)
        a, b = graph.run(s), eager.run(s)
        assert graph._graphs, "the graph engine must have captured a graph"
        assert (a - b).abs().max().item() <= 1e-6 * max(1.0, b.abs().max().item())
        x0 = float(plan.sigmas[0]) * philox_normal(seeds, INITIAL_STREAM, (40,)).double()
        ref = edmrt.execute(plan, g, x0, edmrt.SeededNoise(seeds, (40,)))
        assert (a.cpu().double() - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("name,kw", [("digits-cd", {}), ("digits", dict(solver="heun", steps=6))])
def test_bundled_models_on_cuda_graph_equal_the_cpu_engine(name, kw):
    """The shipped teacher (with guidance) and student through Sampler on CUDA (whole-loop graph, torch backend)
    give the CPU engine's images for the same seeds and labels (cuDNN may use TF32: tolerance 5e-3)."""
    pytest.importorskip("sklearn")
    seeds, labels = list(range(12)), [i % 10 for i in range(12)]
    w = 2.0 if name == "digits" else None
    gpu = edmrt.Sampler(edmrt.load(name, device="cuda"), backend="torch", device="cuda", graph=True, **kw)
    cpu = edmrt.Sampler(edmrt.load(name), backend="torch", device="cpu", **kw)
    a = gpu.sample(seeds, cond=labels, guidance=w)
    a2 = gpu.sample(seeds, cond=labels, guidance=w)  # replayed
    b = cpu.sample(seeds, cond=labels, guidance=w)
    assert gpu.engine(12, w is not None)._graphs, "the CUDA engine must have captured a graph"
    assert torch.equal(a, a2)
    assert (a.cpu() - b).abs().max().item() <= 5e-3 * max(1.0, b.abs().max().item())


def test_adapter_swap_replays_in_the_captured_graph_without_recapture():
    """Sampler.set_adapters copies the fused weights into the same parameter storage, so the whole-loop CUDA graph
    captured before the swap replays with the new weights: the same graph objects, and the CPU engine's images for
    a model loaded with the new weights (issue 13, item 4)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("peft")
    seeds, labels = list(range(12)), [i % 10 for i in range(12)]
    gpu = edmrt.Sampler(edmrt.load("digits", device="cuda", adapters={"digits-cd-lora": 1.0}), backend="torch",
                        device="cuda", graph=True)
    a = gpu.sample(seeds, cond=labels)
    graphs = dict(gpu.engine(12, False)._graphs)
    assert graphs, "the CUDA engine must have captured a graph"
    gpu.set_adapters({"digits-cd-lora": 0.5})
    b = gpu.sample(seeds, cond=labels)
    assert {k: id(v) for k, v in gpu.engine(12, False)._graphs.items()} == {k: id(v) for k, v in graphs.items()}
    ref = edmrt.Sampler(edmrt.load("digits", adapters={"digits-cd-lora": 0.5}), backend="torch", device="cpu")
    want = ref.sample(seeds, cond=labels)
    assert not torch.allclose(a.cpu(), want, atol=1e-3)
    assert (b.cpu() - want).abs().max().item() <= 5e-3 * max(1.0, want.abs().max().item())
