"""ONNX Runtime from several threads: one shared Sampler serves mixed batch sizes and guidance bit for bit (each call
binds its own I/O binding, conditioning inputs included); the pool of bindings is bounded."""
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter's translator) is not installed")

from edmrt.backends.ort import MAX_BINDINGS, OnnxRuntimeBackend  # noqa: E402
from edmrt.export import export_onnx  # noqa: E402
from edmrt.model import CondInput  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# With one binding shared by every engine of the Sampler (the old backend), a round of the 4 threads below failed
# (SIGSEGV in bind_input / run_with_iobinding, ORT RuntimeErrors, or wrong samples) in 89 of 240 rounds measured
# (0.37 a round, 6 processes of 40 rounds, 2-core VM); 24 rounds miss it with probability 0.63**24 < 2e-5, and take
# ~7-12 s here (plus ~20 s for the one export of the digits network).
ROUNDS = 24

_CHILD = textwrap.dedent("""
    import json, sys, threading
    import torch
    torch.set_num_threads(1)
    import edmrt

    rounds = int(sys.argv[1])
    sampler = edmrt.Sampler(edmrt.load("digits"), solver="euler", steps=4, backend="onnxruntime")
    sizes = (5, 6, 7, 8)
    jobs = {}
    for i, B in enumerate(sizes):  # single-threaded references, guidance off and on
        for g in (None, 2.0):
            seeds, cond = list(range(10 * B, 11 * B)), [(k + i) % 10 for k in range(B)]
            jobs[B, g] = (seeds, cond, sampler.sample(seeds, cond=cond, guidance=g))
    failures, barrier = [], threading.Barrier(len(sizes))

    def worker(i, B):
        for r in range(rounds):
            g = (None, 2.0)[(r + i) % 2]
            seeds, cond, want = jobs[B, g]
            barrier.wait()  # every round: the 4 engines at once
            try:
                got = sampler.sample(seeds, cond=cond, guidance=g)
                if not torch.equal(got, want):
                    err = float((got - want).abs().max())
                    failures.append(f"round {r}, batch {B}, guidance {g}: max diff {err:.3g}")
            except Exception as exc:
                failures.append(f"round {r}, batch {B}, guidance {g}: {type(exc).__name__}: {str(exc)[:300]}")

    threads = [threading.Thread(target=worker, args=(i, B)) for i, B in enumerate(sizes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"failures": failures}))
""")


def _in_threads(worker, n: int) -> None:
    """worker(0) ... worker(n - 1), each in its own thread, all started before any is joined."""
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_one_sampler_from_threads_equals_single_threaded_bit_for_bit(tmp_path):
    """4 threads share one Sampler (digits, ONNX Runtime): batch sizes 5-8, guidance on and off in turn, every
    result equal to the single-threaded one.  In a child process, so that a segfault fails this test."""
    env = {**os.environ, "EDMRT_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", _CHILD, str(ROUNDS)], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=600)
    tail = (child.stdout + child.stderr)[-3000:]
    assert child.returncode == 0, f"the child exited with {child.returncode} (-11: SIGSEGV):\n{tail}"
    failures = json.loads(child.stdout.strip().splitlines()[-1])["failures"]
    assert not failures, f"{len(failures)} of {4 * ROUNDS} threaded samples differ or fail: {failures[:5]}"


class Small(torch.nn.Module):
    sample_shape = (2, 4, 4)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x_in, c_noise):
        return self.conv(x_in) * c_noise.view(-1, 1, 1, 1).exp()


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory, one_thread):
    net = Small().eval()
    return net, export_onnx(net, tmp_path_factory.mktemp("onnx") / "small.onnx").path


class _SpySession:
    """An InferenceSession whose runs record the bindings in flight (and hold each a little, so that runs overlap)."""

    def __init__(self, session):
        self.session, self.lock, self.in_flight, self.shared = session, threading.Lock(), set(), []

    def io_binding(self):
        return self.session.io_binding()

    def run_with_iobinding(self, binding):
        with self.lock:
            if id(binding) in self.in_flight:
                self.shared.append(id(binding))
            self.in_flight.add(id(binding))
        try:
            time.sleep(0.002)
            self.session.run_with_iobinding(binding)
        finally:
            with self.lock:
                self.in_flight.discard(id(binding))


def test_no_two_calls_in_flight_share_a_binding(small_onnx):
    """Threads on their own buffers (the engines of a Sampler) and two threads on the same buffers: every run holds
    a binding no other run holds, and every output is right."""
    net, path = small_onnx
    backend = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"])
    spy = backend.session = _SpySession(backend.session)
    gen = torch.Generator().manual_seed(0)
    buffers = []
    for B in (1, 2, 3, 4, 4):
        x, c = torch.randn(B, 2, 4, 4, generator=gen), torch.randn(B, generator=gen)
        with torch.no_grad():
            buffers.append((x, c, net(x, c)))
    buffers.append(buffers[-1])  # the last two threads call with the very same buffers
    outs = [torch.empty_like(b[0]) for b in buffers[:-1]]
    outs.append(outs[-1])
    errors = []

    def worker(k):
        x, c, want = buffers[k]
        for _ in range(20):
            backend(x, c, None, outs[k])
            if not torch.allclose(outs[k], want, rtol=1e-5, atol=1e-5):
                errors.append(k)

    _in_threads(worker, len(buffers))
    assert not spy.shared, f"{len(spy.shared)} runs used a binding another run held"
    assert not errors, errors
    assert backend.cached_bindings <= len(buffers)


def test_the_idle_bindings_are_bounded(small_onnx):
    net, path = small_onnx
    backend = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"])
    sets = [(torch.randn(1, 2, 4, 4), torch.randn(1), torch.empty(1, 2, 4, 4)) for _ in range(MAX_BINDINGS + 6)]
    for x, c, out in sets:
        backend(x, c, None, out)
    assert backend.cached_bindings == MAX_BINDINGS
    x, c, out = sets[0]  # its binding was the least recently used, dropped: bound again, still right
    out.fill_(float("nan"))
    backend(x, c, None, out)
    with torch.no_grad():
        assert torch.allclose(out, net(x, c), rtol=1e-5, atol=1e-5)
    assert backend.cached_bindings == MAX_BINDINGS


class TextNet(torch.nn.Module):
    """net(x_in, c_noise, encoder_hidden_states=(B, 3, 5), time_ids=(B, 6)) -> F."""

    sample_shape = (2, 4, 4)
    cond_inputs = (CondInput("encoder_hidden_states", (3, 5)), CondInput("time_ids", (6,), null="cond"))

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.text = torch.nn.Linear(5, 2)
        self.time = torch.nn.Linear(6, 2)

    def forward(self, x_in, c_noise, encoder_hidden_states, time_ids):
        e = self.text(encoder_hidden_states).mean(1) + self.time(time_ids)
        return self.conv(x_in) * c_noise.view(-1, 1, 1, 1).exp() + e.view(-1, 2, 1, 1)


def test_threads_with_cond_inputs_each_get_their_own_binding(tmp_path, one_thread):
    """Six threads, each with its own embeddings and out; half of them share x_in and c_noise (the binding's key
    holds every cond tensor's address): every output right, no binding held by two runs at once."""
    net = TextNet().eval()
    path = export_onnx(net, tmp_path / "text.onnx").path  # cond_inputs from the net's own declaration
    backend = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"], cond_inputs=TextNet.cond_inputs)
    spy = backend.session = _SpySession(backend.session)
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, generator=gen)
    jobs = []
    for k in range(6):
        cond = {"encoder_hidden_states": torch.randn(3, 3, 5, generator=gen), "time_ids": torch.randn(3, 6, generator=gen)}
        xs, cs = (x, c) if k % 2 else (x.clone(), c.clone())  # half the threads share x_in and c_noise
        with torch.no_grad():
            jobs.append((xs, cs, cond, torch.empty_like(x), net(xs, cs, **cond)))
    errors = []

    def worker(k):
        xs, cs, cond, out, want = jobs[k]
        for _ in range(20):
            backend(xs, cs, cond, out)
            if not torch.allclose(out, want, rtol=1e-5, atol=1e-5):
                errors.append(k)

    _in_threads(worker, len(jobs))
    assert not spy.shared, f"{len(spy.shared)} runs used a binding another run held"
    assert not errors, errors
    assert backend.cached_bindings <= len(jobs)
