"""The engine: static buffers, the whole loop, guidance; equals the float64 reference executor."""
import threading

import pytest
import torch

import edmrt
from edmrt import Engine, Model, Sampler
from edmrt.kernels.philox import INITIAL_STREAM, philox_normal
from edmrt.models import GaussianMixture


class MixtureNet(torch.nn.Module):
    """A 'network' whose EDM-preconditioned output is an exact mixture denoiser per class:
    F = (D_c(x; sigma) - c_skip x) / c_out, with x = x_in / c_in and sigma = exp(4 c_noise).
    Class k shifts the mixture by k; the null label (num_classes) is the unshifted mixture."""

    def __init__(self, D=12, num_classes=3):
        super().__init__()
        self.g = GaussianMixture.random(K=4, D=D, seed=3)
        self.num_classes = num_classes
        self.calls = 0

    def forward(self, x_in, c_noise, class_labels=None):
        labels = class_labels
        self.calls += 1
        B = x_in.shape[0]
        sigma = torch.exp(4 * c_noise.reshape(B).double())[:, None]
        x = x_in.reshape(B, -1).double() * torch.sqrt(sigma ** 2 + 0.25)
        shift = torch.zeros(B, 1, dtype=torch.float64) if labels is None else \
            torch.where(labels[:, None] == self.num_classes, 0.0, labels[:, None].double())
        D = self.g.denoise(x - shift, sigma) + shift
        c_skip, c_out = 0.25 / (sigma ** 2 + 0.25), sigma * 0.5 / torch.sqrt(sigma ** 2 + 0.25)
        return ((D - c_skip * x) / c_out).reshape(x_in.shape).to(x_in.dtype)


def _backend(net):
    def run(x_in, c_noise, cond, out):
        out.copy_(net(x_in, c_noise, **(cond or {})))
    return run


def _reference(net, plan, seeds, labels=None, w=None, shape=(12,)):
    """The float64 reference executor on the same Philox streams, guidance applied to F."""
    B = len(seeds)
    x_init = float(plan.sigmas[0]) * philox_normal(seeds, INITIAL_STREAM, shape).double()
    null = torch.full((B,), net.num_classes)

    def F(x_in, c_noise):
        if w is None:
            return net(x_in, c_noise, labels)
        f_u, f_c = net(x_in, c_noise, null), net(x_in, c_noise, labels)
        return f_u + w * (f_c - f_u)
    noise = edmrt.SeededNoise(seeds, shape) if plan.stochastic else None
    return edmrt.execute(plan, F, x_init, noise)


_EXTRA = {"edm": dict(S_churn=20.0), "euler": dict(S_churn=5.0), "unipc": dict(order=3)}


@pytest.mark.parametrize("solver,opts", [(name, _EXTRA.get(name, {})) for name in sorted(edmrt.SOLVERS)])
def test_engine_equals_the_reference_executor(solver, opts):
    net = MixtureNet()
    plan = edmrt.plan(solver, edmrt.make_sigmas("karras", 8), edmrt.EDMPrecond(), **opts)
    seeds = [5, 17, 2 ** 40 + 3]
    eng = Engine(_backend(net), plan, 3, (12,), "cpu")
    net.calls = 0
    out = eng.run(torch.tensor(seeds))
    assert net.calls == plan.nfe  # one backend call per stage
    ref = _reference(net, plan, seeds)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    again = eng.run(torch.tensor(seeds))  # reusable: same request, same result
    assert torch.equal(again, out)


def test_engine_guidance_and_labels():
    net = MixtureNet()
    plan = edmrt.plan("dpmpp_2m", edmrt.make_sigmas("karras", 10), edmrt.EDMPrecond())
    seeds, labels = [1, 2, 3, 4], torch.tensor([0, 1, 2, 1])
    eng = Engine(_backend(net), plan, 4, (12,), "cpu", guidance=True, null_label=3)
    out = eng.run(torch.tensor(seeds), labels, guidance=2.0)
    ref = _reference(net, plan, seeds, labels, w=2.0)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    plain = Engine(_backend(net), plan, 4, (12,), "cpu").run(torch.tensor(seeds), labels)
    assert (plain.double() - _reference(net, plan, seeds, labels)).abs().max().item() <= 1e-4
    assert (plain - out).abs().max().item() > 1e-2  # guidance changed the result


def test_engine_rejects_bad_requests():
    net = MixtureNet()
    plan = edmrt.plan("heun", edmrt.make_sigmas("karras", 4), edmrt.EDMPrecond())
    eng = Engine(_backend(net), plan, 2, (12,), "cpu")
    with pytest.raises(ValueError, match=r"seeds must be an int64 tensor of shape \(2,\)"):
        eng.run(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="seeds must be an int64"):
        eng.run(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="labels must be an int64"):
        eng.run(torch.tensor([1, 2]), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="without guidance"):
        eng.run(torch.tensor([1, 2]), torch.tensor([0, 1]), guidance=2.0)
    geng = Engine(_backend(net), plan, 2, (12,), "cpu", guidance=True)
    with pytest.raises(ValueError, match="guidance weight"):
        geng.run(torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="batch must be"):
        Engine(_backend(net), plan, 0, (12,), "cpu")


def test_engine_is_thread_safe_by_its_lock():
    net = MixtureNet()
    plan = edmrt.plan("dpmpp_2m", edmrt.make_sigmas("karras", 6), edmrt.EDMPrecond())
    eng = Engine(_backend(net), plan, 2, (12,), "cpu")
    want = {s: eng.run(torch.tensor([s, s + 1])) for s in range(6)}
    got = {}

    def worker(s):
        got[s] = eng.run(torch.tensor([s, s + 1]))
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[s], want[s]) for s in range(6))


def test_sampler_on_a_model_with_a_custom_backend():
    net = MixtureNet()
    model = Model(net, edmrt.EDMPrecond(), sample_shape=(12,), num_classes=3)
    smp = Sampler(model, solver="heun", steps=6, backend=_backend(net))
    a = smp.sample([3, 4, 5], cond=[0, 1, 2], guidance=1.5)
    assert a.shape == (3, 12)
    b = smp.sample([4], cond=[1], guidance=1.5)  # a seed's sample does not depend on its batch
    assert (a[1] - b[0]).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="cond must hold one class"):
        smp.sample([1, 2], cond=[0, 7])
    with pytest.raises(ValueError, match="guidance needs cond"):
        smp.sample([1], guidance=2.0)
    with pytest.raises(ValueError, match="edmrt Model"):
        Sampler(lambda x, s: x)


def test_sampler_with_a_unet_on_torch_and_onnxruntime(tmp_path, monkeypatch):
    """Backend "onnxruntime" exports the torch network into a cache, reuses it, and equals torch within 1e-4;
    a corrupt cache entry is exported again, not trusted."""
    pytest.importorskip("onnxruntime")
    from edmrt.backends.onnx_cache import onnx_cache_path
    from edmrt.models.unet import build_unet

    monkeypatch.setenv("EDMRT_CACHE", str(tmp_path))
    torch.manual_seed(0)
    net = build_unet("tiny")
    model = Model(net, edmrt.EDMPrecond(), sample_shape=net.sample_shape, num_classes=0)
    seeds = [1, 2, 3]
    a = Sampler(model, solver="dpmpp_2m", steps=5, backend="torch").sample(seeds)
    b = Sampler(model, solver="dpmpp_2m", steps=5, backend="onnxruntime").sample(seeds)
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, a.abs().max().item())
    path = onnx_cache_path(model)
    assert path.exists()
    stamp = path.stat().st_mtime_ns
    Sampler(model, solver="dpmpp_2m", steps=5, backend="onnxruntime")  # reused, not exported again
    assert path.stat().st_mtime_ns == stamp
    path.write_bytes(path.read_bytes()[:100])  # corrupt it
    c = Sampler(model, solver="dpmpp_2m", steps=5, backend="onnxruntime").sample(seeds)
    assert torch.equal(b, c)
    with pytest.raises(ValueError, match="unknown backend"):
        Sampler(model, backend="tensorflow")


def test_a_backend_checks_an_engines_buffers_once_and_other_tensors_every_time(monkeypatch):
    """TorchBackend and CallableBackend check the protocol once per set of buffers (BoundCheck, as the Stepper binds
    its own): an engine's loop passes the same tensors at every stage; any other tensor is checked at its call."""
    from edmrt.backends import CallableBackend, TorchBackend, base

    calls = []
    real = base.check_backend_args
    monkeypatch.setattr(base, "check_backend_args", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    class Net(torch.nn.Module):
        def forward(self, x_in, c_noise):
            return 2 * x_in

    for backend in (TorchBackend(Net()), CallableBackend(lambda x, c: 2 * x)):
        calls.clear()
        x, c, out = torch.randn(2, 1, 3, 3), torch.zeros(2), torch.empty(2, 1, 3, 3)
        for _ in range(5):
            backend(x, c, None, out)
        assert len(calls) == 1
        with pytest.raises(ValueError, match="out must be"):
            backend(x, c, None, torch.empty(2, 1, 3, 4))   # another tensor: checked, and refused
        backend(x.clone(), c, None, out)
        assert len(calls) == 3
