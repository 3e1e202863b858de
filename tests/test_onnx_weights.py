"""Weight inputs: network parameters exported as ONNX graph inputs and bound by address, so an in-place update of
them (an adapter swap) changes the next ONNX Runtime run with the same session and the same I/O binding."""
import json
import math
import time

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter's translator) is not installed")

import edmrt  # noqa: E402
from edmrt import Model  # noqa: E402
from edmrt.backends import OnnxRuntimeBackend  # noqa: E402
from edmrt.backends.onnx_cache import cached_onnx, onnx_cache_fields, onnx_cache_path  # noqa: E402
from edmrt.onnx_contract import check_onnx_signature, onnx_cond_inputs, onnx_weight_inputs  # noqa: E402
from edmrt.export import export_onnx  # noqa: E402
from edmrt.export.onnx import TOLERANCE  # noqa: E402
from edmrt.model import CondInput  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = ["CPUExecutionProvider"]
TARGETS = ("conv.weight", "lin.weight")
NAMES = {"w__conv_weight": "conv.weight", "w__lin_weight": "lin.weight"}


class WNet(torch.nn.Module):
    """A conv then a per-pixel linear map (the kind of layers an adapter targets), F = lin(conv(x)) * exp(c)."""

    sample_shape = (2, 4, 4)

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x_in, c_noise, class_labels=None):
        h = self.conv(x_in) * c_noise.view(-1, 1, 1, 1).exp()
        return self.lin(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


def _inputs(B, gen):
    x = torch.randn(B, 2, 4, 4, generator=gen)
    c = 0.25 * torch.empty(B).uniform_(math.log(0.002), math.log(80.0), generator=gen)
    return x, c


def _weights(net, names=TARGETS):
    params = dict(net.named_parameters())
    return {n: params[n] for n in names}


def _run(backend, x, c, cond=None):
    out = torch.empty_like(x)
    backend(x, c, cond, out)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):
    net = WNet().eval()
    return net, export_onnx(net, tmp_path_factory.mktemp("onnx") / "w.onnx", weight_inputs=TARGETS)


def test_weight_inputs_are_graph_inputs_after_cond_with_metadata(exported):
    net, r = exported
    assert r.weight_inputs == NAMES
    assert list(r.inputs) == ["x_in", "c_noise", *NAMES]
    assert r.inputs["w__conv_weight"] == ((4, 2, 3, 3), "tensor(float)")   # fixed shape, no batch axis
    assert r.inputs["w__lin_weight"] == ((2, 4), "tensor(float)")
    assert 0 <= r.max_abs_err <= r.tolerance
    model = onnx.load(r.path)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["edmrt.weight_inputs"]) == NAMES and onnx_weight_inputs(meta) == NAMES
    init = {t.name for t in model.graph.initializer}
    assert not any("conv.weight" in n or "lin.weight" in n for n in init)   # not baked in
    assert any("conv.bias" in n for n in init)                             # the others are
    # Weight inputs are not conditioning inputs.
    assert onnx_cond_inputs(r.path) == ()
    session = ort.InferenceSession(r.path, providers=CPU)
    assert check_onnx_signature(session.get_inputs(), session.get_outputs(), meta=meta) == ()
    # Without the metadata, they would be read as conditioning inputs (every input after c_noise is one).
    assert [c.name for c in check_onnx_signature(session.get_inputs(), session.get_outputs(), meta={})] == list(NAMES)
    assert onnx_weight_inputs({}) == {}
    with pytest.raises(ValueError, match="weight_inputs"):
        onnx_weight_inputs({"edmrt.weight_inputs": "[1, 2]"})
    with pytest.raises(ValueError, match="nope"):
        check_onnx_signature(session.get_inputs(), session.get_outputs(),
                             meta={**meta, "edmrt.weight_inputs": json.dumps({**NAMES, "nope": "x.weight"})})


def test_swap_in_place_changes_the_next_run_with_the_same_session_and_binding(tmp_path, gen, record_property):
    net = WNet().eval()
    t0 = time.perf_counter()
    r = export_onnx(net, tmp_path / "w.onnx", weight_inputs=TARGETS)
    backend = OnnxRuntimeBackend(r.path, providers=CPU, weights=_weights(net))
    build_s = time.perf_counter() - t0
    assert backend.weight_inputs == NAMES and backend.cond_names == ()
    session = backend.session
    x, c = _inputs(3, gen)
    out = torch.empty_like(x)
    backend(x, c, None, out)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x, c), rtol=0, atol=1e-5)
    assert backend.cached_bindings == 1

    deltas = {n: 0.5 * torch.randn(p.shape, generator=gen) for n, p in _weights(net).items()}
    ptrs = {n: p.data_ptr() for n, p in _weights(net).items()}
    t0 = time.perf_counter()
    with torch.no_grad():
        for n, p in _weights(net).items():
            p.data.copy_(p + deltas[n])   # the swap: same storage, same address
    backend(x, c, None, out)
    swap_s = time.perf_counter() - t0
    assert {n: p.data_ptr() for n, p in _weights(net).items()} == ptrs
    assert backend.session is session and backend.cached_bindings == 1   # no new session, no new binding
    with torch.no_grad():
        new_ref = net(x, c)
    torch.testing.assert_close(out, new_ref, rtol=0, atol=1e-5)
    assert (out - _run(OnnxRuntimeBackend(r.path, providers=CPU, weights={n: p.detach() - deltas[n] for n, p in
                                                                         _weights(net).items()}), x, c)).abs().max() > 1e-3

    # A fresh export of the modified net (weights baked in) agrees; building it is the rebuild a swap avoids.
    t0 = time.perf_counter()
    fresh = export_onnx(net, tmp_path / "fresh.onnx")
    rebuilt = _run(OnnxRuntimeBackend(fresh.path, providers=CPU), x, c)
    rebuild_s = time.perf_counter() - t0
    torch.testing.assert_close(out, rebuilt, rtol=0, atol=1e-5)

    # Replacing a parameter's storage (not a swap in place) is seen too: the next call binds anew.
    with torch.no_grad():
        net.lin.weight.data = net.lin.weight.data * 2
    backend(x, c, None, out)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x, c), rtol=0, atol=1e-5)
    assert backend.cached_bindings == 2

    # Timing only: recorded, nothing asserted (performance lives in the benchmarks).
    timing = dict(swap_and_run_ms=1e3 * swap_s, rebuild_ms=1e3 * rebuild_s, first_build_ms=1e3 * build_s)
    record_property("timing", timing)
    print(f"\nweight swap in place + run: {timing['swap_and_run_ms']:.2f} ms; rebuild (export + session + run): "
          f"{timing['rebuild_ms']:.0f} ms; first export + backend: {timing['first_build_ms']:.0f} ms")


def test_export_refuses_an_unknown_parameter_by_name(tmp_path):
    net = WNet()
    with pytest.raises(ValueError, match="'conv.nope'.*conv.weight"):
        export_onnx(net, tmp_path / "x.onnx", weight_inputs=("conv.weight", "conv.nope"))
    with pytest.raises(ValueError, match="twice"):
        export_onnx(net, tmp_path / "x.onnx", weight_inputs=("conv.weight", "conv.weight"))
    with pytest.raises(ValueError, match="sequence"):
        export_onnx(net, tmp_path / "x.onnx", weight_inputs="conv.weight")
    assert not list(tmp_path.iterdir())


def test_backend_weight_errors_name_the_parameter(exported, gen):
    net, r = exported
    w = {n: p.detach() for n, p in _weights(net).items()}
    with pytest.raises(ValueError, match="lacks 'conv.weight', 'lin.weight'"):
        OnnxRuntimeBackend(r.path, providers=CPU)
    with pytest.raises(ValueError, match="lacks 'lin.weight'"):
        OnnxRuntimeBackend(r.path, providers=CPU, weights={"conv.weight": w["conv.weight"]})
    with pytest.raises(ValueError, match="'conv.bias'.*does not take"):
        OnnxRuntimeBackend(r.path, providers=CPU, weights={**w, "conv.bias": net.conv.bias})
    with pytest.raises(ValueError, match=r"'lin.weight' has shape \[4, 2\]"):
        OnnxRuntimeBackend(r.path, providers=CPU, weights={**w, "lin.weight": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="'lin.weight' has dtype torch.float64"):
        OnnxRuntimeBackend(r.path, providers=CPU, weights={**w, "lin.weight": w["lin.weight"].double()})
    with pytest.raises(ValueError, match="'lin.weight' is not contiguous"):
        OnnxRuntimeBackend(r.path, providers=CPU, weights={**w, "lin.weight": torch.zeros(4, 2).t()})
    with pytest.raises(ValueError, match="'lin.weight' is on meta"):
        OnnxRuntimeBackend(r.path, providers=CPU, weights={**w, "lin.weight": torch.empty(2, 4, device="meta")})
    with pytest.raises(ValueError, match="'conv.weight' must be a torch.Tensor"):
        OnnxRuntimeBackend(r.path, providers=CPU, weights={**w, "conv.weight": w["conv.weight"].numpy()})
    # A file without weight inputs takes none.
    plain = WNet()
    with pytest.raises(ValueError, match="'conv.weight'.*does not take"):
        OnnxRuntimeBackend(export_onnx(plain, r.path + ".plain.onnx", verify=False).path, providers=CPU,
                           weights={"conv.weight": plain.conv.weight})
    # Storage replaced by a wrong shape after construction: the next bind names it.
    lin = w["lin.weight"].clone()
    backend = OnnxRuntimeBackend(r.path, providers=CPU, weights={**w, "lin.weight": lin})
    lin.data = torch.zeros(3, 4)
    x, c = _inputs(2, gen)
    with pytest.raises(ValueError, match="'lin.weight' is now"):
        backend(x, c, None, torch.empty_like(x))


def test_weight_inputs_with_cond_inputs_and_fp16(tmp_path, gen):
    """Conditioning inputs stay conditioning inputs; an fp16 export takes float32 weights, cast inside."""
    class CNet(WNet):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.label = torch.nn.Embedding(4, 2)

        def forward(self, x_in, c_noise, class_labels=None, time_ids=None):
            return super().forward(x_in, c_noise) + (self.label(class_labels) + time_ids).view(-1, 2, 1, 1)

    net = CNet().eval()
    cond = (CondInput("class_labels", (), torch.int64, null=3, num_classes=3), CondInput("time_ids", (2,)))
    targets = ("lin.weight", "label.weight")
    r = export_onnx(net, tmp_path / "c16.onnx", dtype="fp16", cond_inputs=cond, weight_inputs=targets)
    assert list(r.inputs) == ["x_in", "c_noise", "class_labels", "time_ids", "w__lin_weight", "w__label_weight"]
    assert r.inputs["w__label_weight"] == ((4, 2), "tensor(float)")
    backend = OnnxRuntimeBackend(r.path, providers=CPU, cond_inputs=cond, weights=_weights(net, targets))
    assert backend.cond_names == ("class_labels", "time_ids") and backend.conditional
    x, c = _inputs(3, gen)
    y = {"class_labels": torch.tensor([0, 2, 3]), "time_ids": torch.randn(3, 2, generator=gen)}
    with torch.no_grad():
        net.label.weight.data.copy_(net.label.weight + 1.0)
        net.lin.weight.data.mul_(-1)
        ref = net(x, c, **y)
    got = _run(backend, x, c, y)
    assert (got - ref).abs().max() <= TOLERANCE["fp16"] * max(1.0, float(ref.abs().max()))


def _model(net):
    return Model(net, edmrt.EDMPrecond(), sample_shape=WNet.sample_shape, num_classes=0)


def test_the_cache_key_includes_the_weight_inputs(tmp_path, monkeypatch, gen):
    monkeypatch.setenv("EDMRT_CACHE", str(tmp_path / "cache"))
    model = _model(WNet().eval())
    assert "weight_inputs" not in onnx_cache_fields(model)   # entries without weight inputs keep their key
    assert onnx_cache_fields(model, weight_inputs=TARGETS)["weight_inputs"] == list(TARGETS)
    paths = {onnx_cache_path(model), onnx_cache_path(model, weight_inputs=TARGETS),
             onnx_cache_path(model, weight_inputs=TARGETS[:1]), onnx_cache_path(model, weight_inputs=TARGETS[::-1])}
    assert len(paths) == 4
    path, session = cached_onnx(model, torch.device("cpu"), weight_inputs=TARGETS)
    assert session is None and path == onnx_cache_path(model, weight_inputs=TARGETS)
    again, session = cached_onnx(model, torch.device("cpu"), weight_inputs=TARGETS)
    assert again == path and session is not None
    backend = OnnxRuntimeBackend(session, weights=_weights(model.network))
    assert backend.weight_inputs == NAMES
    x, c = _inputs(2, gen)
    with torch.no_grad():
        model.network.conv.weight.data.add_(0.25)
        torch.testing.assert_close(_run(backend, x, c), model.network(x, c), rtol=0, atol=1e-5)
