"""ONNX export (dynamic batch, fp32/fp16, named conditioning inputs, external data), load checks, and the denoiser
backends (torch, ONNX Runtime I/O binding)."""
import json
import math
import os
import re

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter's translator) is not installed")

from onnx import TensorProto, helper  # noqa: E402

from edmrt.backends import BACKENDS, OnnxRuntimeBackend, TorchBackend, make_backend  # noqa: E402
from edmrt.onnx_contract import check_onnx_signature, load_onnx_session, onnx_cond_inputs, weights_sha256  # noqa: E402
from edmrt.export import ExportVerificationError, export_onnx  # noqa: E402
from edmrt.model import CondInput  # noqa: E402
from edmrt.export.onnx import TOLERANCE  # noqa: E402
from edmrt.models import build_unet  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(num_classes=0, seed=0):
    torch.manual_seed(seed)
    return build_unet("tiny", num_classes=num_classes).eval()


def _inputs(B, num_classes, gen):
    x = torch.randn(B, 2, 8, 8, generator=gen)
    c = 0.25 * torch.empty(B).uniform_(math.log(0.002), math.log(80.0), generator=gen)
    y = torch.randint(0, num_classes + 1, (B,), generator=gen) if num_classes else None
    return x, c, y


# One export per variant for the whole module (the dynamo exporter takes ~7 s for the tiny UNet).
@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):
    cache = {}

    def get(num_classes, dtype):
        if (num_classes, dtype) not in cache:
            net = _net(num_classes)
            path = tmp_path_factory.mktemp("onnx") / f"tiny_c{num_classes}_{dtype}.onnx"
            cache[num_classes, dtype] = (net, export_onnx(net, path, dtype=dtype, batch=2))
        return cache[num_classes, dtype]
    return get


def _ort_run(session, x, c, y):
    feed = {"x_in": x.numpy(), "c_noise": c.numpy()}
    if y is not None:
        feed["class_labels"] = y.numpy()
    return torch.from_numpy(session.run(["F"], feed)[0])


@pytest.mark.parametrize("num_classes", [0, 3])
def test_export_fp32_dynamic_batch_matches_torch(exported, num_classes, gen):
    net, r = exported(num_classes, "fp32")
    names = ["x_in", "c_noise"] + (["class_labels"] if num_classes else [])
    assert list(r.inputs) == names and list(r.outputs) == ["F"]
    assert r.inputs["x_in"] == (("batch", 2, 8, 8), "tensor(float)")
    assert r.inputs["c_noise"] == (("batch",), "tensor(float)")
    if num_classes:
        assert r.inputs["class_labels"] == (("batch",), "tensor(int64)")
    assert r.outputs["F"] == (("batch", 2, 8, 8), "tensor(float)")
    assert r.dtype == "fp32" and r.opset >= 18 and r.verified_batches == (1, 5)
    assert 0 <= r.max_abs_err <= r.tolerance and r.tolerance >= TOLERANCE["fp32"]
    # Independent check at batch sizes other than the export batch (2) and the verification's (1, 5).
    session = load_onnx_session(r.path, providers=["CPUExecutionProvider"], conditional=bool(num_classes))
    for B in (3, 7):
        x, c, y = _inputs(B, num_classes, gen)
        with torch.no_grad():
            ref = net(x, c, y)
        got = _ort_run(session, x, c, y)
        assert got.shape == ref.shape
        err = float((got - ref).abs().max())
        assert err <= 1e-4 * max(1.0, float(ref.abs().max())), f"batch {B}: max abs err {err:.3e}"


def test_export_fp16_within_tolerance(exported, gen):
    net, r = exported(3, "fp16")
    assert r.dtype == "fp16" and r.max_abs_err <= r.tolerance and r.tolerance >= TOLERANCE["fp16"]
    # float32 I/O, float16 weights inside.
    assert r.inputs["x_in"][1] == "tensor(float)" and r.outputs["F"][1] == "tensor(float)"
    model = onnx.load(r.path)
    kinds = {t.data_type for t in model.graph.initializer if len(t.dims) == 4}  # conv kernels
    assert kinds == {TensorProto.FLOAT16}
    meta = {p.key: p.value for p in model.metadata_props}
    labels = {"name": "class_labels", "shape": [], "dtype": "int64", "null": 3, "num_classes": 3}
    assert meta == {"edmrt.num_classes": "3", "edmrt.sample_shape": "2,8,8", "edmrt.dtype": "fp16",
                    "edmrt.cond": json.dumps([labels]),
                    "edmrt.weights_sha256": weights_sha256(net)}  # the float32 net's weights: which model it is
    session = load_onnx_session(r.path, providers=["CPUExecutionProvider"])
    x, c, y = _inputs(6, 3, gen)
    with torch.no_grad():
        ref = net(x, c, y)
    err = float((_ort_run(session, x, c, y) - ref).abs().max())
    assert 0 < err <= TOLERANCE["fp16"] * max(1.0, float(ref.abs().max())), err


def test_verification_failure_raises(tmp_path, monkeypatch):
    """A tolerance nothing can meet: the export raises ExportVerificationError naming error and tolerance."""
    from edmrt.export import onnx as onnx_mod

    class Small(torch.nn.Module):
        sample_shape = (2, 4, 4)

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x_in, c_noise):
            return self.conv(x_in) * c_noise.view(-1, 1, 1, 1).exp()

    monkeypatch.setitem(onnx_mod.TOLERANCE, "fp32", -1.0)
    with pytest.raises(ExportVerificationError, match=r"max abs .* > tolerance .*fp32"):
        export_onnx(Small(), tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx").exists(), "a file that failed verification was left behind"
    assert issubclass(ExportVerificationError, ValueError)


def test_export_argument_errors(tmp_path):
    net = _net(3)
    with pytest.raises(ValueError, match="dtype"):
        export_onnx(net, tmp_path / "a.onnx", dtype="bf16")
    with pytest.raises(ValueError, match="contradicts"):
        export_onnx(net, tmp_path / "a.onnx", num_classes=0)
    with pytest.raises(ValueError, match="batch"):
        export_onnx(net, tmp_path / "a.onnx", batch=1)
    with pytest.raises(ValueError, match="'emb'.*bfloat16"):
        export_onnx(net, tmp_path / "a.onnx", cond_inputs=(CondInput("emb", (4,), torch.bfloat16),))
    with pytest.raises(ValueError, match="contradicts"):  # class labels of another count than the net's
        export_onnx(net, tmp_path / "a.onnx", cond_inputs=(CondInput("class_labels", (), torch.int64, 5, 5),))
    with pytest.raises(ValueError, match="cond_inputs must be"):
        export_onnx(net, tmp_path / "a.onnx", cond_inputs=("encoder_hidden_states",))
    with pytest.raises(ValueError, match="external_data"):
        export_onnx(net, tmp_path / "a.onnx", external_data="yes")
    assert not os.listdir(tmp_path)


def test_truncated_and_missing_files_raise(exported, tmp_path):
    _, r = exported(0, "fp32")
    data = open(r.path, "rb").read()
    for n, name in ((len(data) // 2, "half.onnx"), (100, "head.onnx"), (0, "empty.onnx")):
        bad = tmp_path / name
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match="not a valid ONNX model"):
            load_onnx_session(bad)
        with pytest.raises(ValueError, match="not a valid ONNX model"):
            OnnxRuntimeBackend(bad)
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xff" * 4096)
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        load_onnx_session(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="does not exist"):
        load_onnx_session(tmp_path / "missing.onnx")


def _identity_model(path, inputs, output):
    """A valid ONNX file with the given inputs [(name, type, shape)] whose output is the first input (cast)."""
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    out = helper.make_tensor_value_info(output[0], output[1], output[2])
    op = "Identity" if output[1] == inputs[0][1] else "Cast"
    attrs = {} if op == "Identity" else {"to": output[1]}
    nodes = [helper.make_node(op, [inputs[0][0]], [output[0]], **attrs)]
    nodes += [helper.make_node("Identity", [n], [f"unused_{n}"]) for n, _, _ in inputs[1:]]
    graph = helper.make_graph(nodes, "g", vis, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


F32, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
X, C, Y = ("x_in", F32, ["B", 2, 8, 8]), ("c_noise", F32, ["B"]), ("class_labels", I64, ["B"])
OUT = ("F", F32, ["B", 2, 8, 8])


@pytest.mark.parametrize("inputs, output, match", [
    ([("x", F32, ["B", 2, 8, 8]), C], OUT, "named"),                      # wrong input name
    ([C, X], OUT, "named"),                                                # wrong order
    ([X, Y, C], OUT, "named"),                                             # a conditioning input before c_noise
    ([X, C, ("labels", I64, ["B", "L"])], OUT, "'labels'.*fixed per-sample dims"),  # symbolic, no edmrt.cond
    ([X, C, ("emb", TensorProto.DOUBLE, ["B", 4])], OUT, "'emb'.*type"),  # a dtype edmrt does not bind
    ([X, C, ("emb", F32, [])], OUT, "'emb'.*batch"),                       # a scalar: no batch axis
    ([("x_in", F32, [2, 2, 8, 8]), C, ("emb", F32, [3, 4])], ("F", F32, [2, 2, 8, 8]), "'emb'.*batch"),
    ([X, ("c_noise", F32, ["B", 1, 1, 1])], OUT, "c_noise.*rank 1"),       # wrong rank
    ([X, C, ("class_labels", F32, ["B"])], OUT, "class_labels.*int64"),    # wrong dtype
    ([X, C, ("class_labels", I64, ["B", 1])], OUT, "class_labels.*rank 1"),
    ([("x_in", I64, ["B", 2, 8, 8]), C], ("F", I64, ["B", 2, 8, 8]), "x_in.*type"),
    ([X, C], ("out", F32, ["B", 2, 8, 8]), "outputs"),                     # wrong output name
    ([X, C], ("F", F16, ["B", 2, 8, 8]), "x_in's type"),                   # output dtype differs from input
    ([X, C], ("F", F32, ["B", 2, 8]), "'F'.*rank 4"),
])
def test_signature_mismatch_raises(tmp_path, inputs, output, match):
    path = _identity_model(tmp_path / "m.onnx", inputs, output)
    with pytest.raises(ValueError, match=match):
        load_onnx_session(path, providers=["CPUExecutionProvider"])


def test_conditional_expectation_and_providers(tmp_path):
    path = _identity_model(tmp_path / "m.onnx", [X, C, Y], OUT)
    assert load_onnx_session(path, conditional=True) is not None
    with pytest.raises(ValueError, match="unconditional"):
        load_onnx_session(path, conditional=False)
    with pytest.raises(ValueError, match="not available"):
        load_onnx_session(path, providers=["NoSuchExecutionProvider"])


@pytest.mark.parametrize("num_classes", [0, 3])
def test_onnxruntime_backend_writes_out_and_equals_torch(exported, num_classes, gen):
    net, r = exported(num_classes, "fp32")
    ort_backend, torch_backend = OnnxRuntimeBackend(r.path, providers=["CPUExecutionProvider"]), TorchBackend(net)
    assert ort_backend.conditional == torch_backend.conditional == bool(num_classes)
    for B in (3, 1):  # a new batch size: new buffers, a new binding
        x, c, y = _inputs(B, num_classes, gen)
        c = c.view(B, 1, 1, 1)  # the executors' sigma view is accepted
        out = torch.full_like(x, float("nan"))
        ptr = out.data_ptr()
        ort_backend(x, c, y, out)
        assert out.data_ptr() == ptr and torch.isfinite(out).all(), "ONNX Runtime did not write every element of out"
        ref = torch.full_like(x, float("nan"))
        torch_backend(x, c, y, ref)
        assert torch.isfinite(ref).all()
        assert float((out - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
        # Same buffers, new contents (the engine's case): the cached binding reads the new values.
        x2, c2, y2 = _inputs(B, num_classes, gen)
        x.copy_(x2)
        c.copy_(c2.view(B, 1, 1, 1))
        if y is not None:
            y.copy_(y2)
        out.fill_(float("nan"))
        ort_backend(x, c, y, out)
        torch_backend(x, c, y, ref)
        assert float((out - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_backend_argument_errors(exported, gen):
    net, r = exported(3, "fp32")
    backends = [OnnxRuntimeBackend(r.path, providers=["CPUExecutionProvider"]), TorchBackend(net)]
    x, c, y = _inputs(2, 3, gen)
    out = torch.empty_like(x)
    cases = [
        ((x, c, y, torch.empty(2, 2, 8, 4)), "out must be"),                      # wrong out shape
        ((x, c, y, torch.empty(2, 2, 8, 8, dtype=torch.float64)), "out must be"),  # wrong out dtype
        ((x, c, y, torch.empty(2, 2, 8, 16)[..., ::2]), "out must be"),           # non-contiguous out
        ((x, c, None, out), "class_labels"),                                       # conditional model, no labels
        ((x, c, y.int(), out), "class_labels"),                                    # int32 labels
        ((x, c[:1], y, out), "c_noise"),                                           # one c_noise for two samples
        ((x.double(), c.double(), y, out.double()), "dtype|out must be"),          # float64 everywhere
        ((x[:, :1], c, y, out[:, :1]), "x_in|channels"),                           # wrong channel count
    ]
    for backend in backends:
        for args, match in cases:
            with pytest.raises(ValueError, match=match):
                backend(*args)
    uncond = OnnxRuntimeBackend(exported(0, "fp32")[1].path, providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match=r"conditioning inputs \[\], got \['class_labels'\]"):
        uncond(x, c, y, out)
    with pytest.raises(ValueError, match="cond must be a dict"):
        uncond(x, c, [1, 2], out)


def test_registry_and_compile_failure(monkeypatch):
    assert {"torch", "torch-compile", "onnxruntime"} <= set(BACKENDS)
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("tensorflow", _net())
    assert isinstance(make_backend("torch", _net()), TorchBackend)
    # One way to build every entry from a Model: resolve_backend is the lookup BACKENDS[name].from_model.
    assert all(callable(getattr(entry, "from_model", None)) for entry in BACKENDS.values())
    compiled = make_backend("torch-compile", _net())
    assert isinstance(compiled, TorchBackend) and compiled.compiled and compiled.name == "torch-compile"

    # A compiler failure at the first call is reported as such, not hidden behind an eager fallback.
    def broken_compile(fn, **kw):
        def run(*a):
            raise OSError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    b = make_backend("torch-compile", _net())
    assert b.name == "torch-compile"
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="torch.compile failed.*no C\\+\\+ compiler.*'torch'"):
        b(x, torch.zeros(1), None, torch.empty_like(x))


def test_cli_export_weights(tmp_path, monkeypatch, capsys):
    """`edmrt export onnx`: safetensors weights are loaded into the config's net (the export itself is stubbed)."""
    from safetensors.torch import save_file

    import edmrt.export
    from edmrt.cli import main
    from edmrt.export import OnnxReport

    src = build_unet("tiny")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    seen = {}

    def fake_export(net, path, **kw):
        seen.update(net=net, path=path, **kw)
        return OnnxReport(path=str(path), inputs={}, outputs={}, max_abs_err=0.0, tolerance=1e-4, seconds=0.0,
                          opset=20, dtype=kw["dtype"], verified_batches=(1, 5))

    monkeypatch.setattr(edmrt.export, "export_onnx", fake_export)
    out = tmp_path / "t.onnx"
    assert main(["export", "onnx", "--model-config", "tiny", "--weights", str(tmp_path / "w.safetensors"),
                 "--fp16", "-o", str(out), "--batch", "3"]) == 0
    assert seen["dtype"] == "fp16" and seen["batch"] == 3 and str(seen["path"]) == str(out)
    for k, v in src.state_dict().items():
        assert torch.equal(seen["net"].state_dict()[k], v), k
    assert "wrote" in capsys.readouterr().out

    # Weights of another config, a pickle, a missing file: exit 2 with a message, nothing exported.
    save_file(build_unet("tiny", num_classes=3).state_dict(), str(tmp_path / "c.safetensors"))
    torch.save(src.state_dict(), str(tmp_path / "w.pt"))
    seen.clear()
    for weights, match in (("c.safetensors", "does not fit UNet config 'tiny'.*unexpected"),
                           ("w.pt", "cannot read .* as safetensors"), ("nope.safetensors", "does not exist")):
        assert main(["export", "onnx", "--model-config", "tiny", "--weights", str(tmp_path / weights)]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err
    assert not seen


def test_cli_export_bundled_model_then_sample_through_it(tmp_path, capsys):
    """The README's flow: `edmrt export onnx --model digits`, then `edmrt sample --onnx FILE` (ONNX Runtime)."""
    pytest.importorskip("sklearn")
    import edmrt
    from edmrt.backends import OnnxRuntimeBackend
    from edmrt.cli import main

    out = tmp_path / "digits.onnx"
    assert main(["export", "onnx", "--model", "digits", "-o", str(out)]) == 0
    assert "max abs err vs torch" in capsys.readouterr().out
    png = tmp_path / "g.png"
    assert main(["sample", "--onnx", str(out), "--seeds", "0-9", "--steps", "4", "--solver", "euler",
                 "-o", str(png)]) == 0
    assert f"backend onnxruntime ({out})" in capsys.readouterr().out and png.stat().st_size > 1000
    # the same seeds through torch: the same images (the file is the bundled network)
    m = edmrt.load("digits")
    a = edmrt.Sampler(m, solver="euler", steps=4, backend=OnnxRuntimeBackend(str(out))).sample(range(4), cond=[1, 2, 3, 4])
    b = edmrt.Sampler(m, solver="euler", steps=4, backend="torch").sample(range(4), cond=[1, 2, 3, 4])
    assert float((a - b).abs().max()) < 1e-4
    # another model's file is refused by name, and --weights does not go with --model
    assert main(["sample", "--model", "digits-cd", "--onnx", str(out), "-o", str(png)]) == 2
    assert "holds the network of 'digits', not of --model 'digits-cd'" in capsys.readouterr().err
    # the file records its weights; without its name it is still refused, by them
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["edmrt.model"] == "digits" and meta["edmrt.weights_sha256"] == weights_sha256(m.network)
    del proto.metadata_props[:]
    for k, v in meta.items():
        if k != "edmrt.model":
            proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(tmp_path / "anonymous.onnx"))
    assert main(["sample", "--model", "digits-cd", "--onnx", str(tmp_path / "anonymous.onnx"), "-o", str(png)]) == 2
    assert "holds other weights than --model 'digits-cd'" in capsys.readouterr().err
    assert main(["export", "onnx", "--model", "digits", "--weights", str(out)]) == 2


# --- Named conditioning inputs: class labels, a text embedding (L=5, D=7), SDXL-style time ids (6,) ---------------

COND = (CondInput("encoder_hidden_states", (5, 7)), CondInput("time_ids", (6,), null="cond"))
LABELS = CondInput("class_labels", (), torch.int64, null=3, num_classes=3)


class CondNet(torch.nn.Module):
    """net(x_in, c_noise, class_labels=, encoder_hidden_states=, time_ids=) -> F, every input used; the embedding
    projection is big enough (64 x 7 floats) to go to an external data file."""

    sample_shape = (2, 4, 4)
    num_classes = 3

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.text = torch.nn.Linear(7, 64)
        self.text_out = torch.nn.Linear(64, 2)
        self.time = torch.nn.Linear(6, 2)
        self.label = torch.nn.Embedding(4, 2)

    def forward(self, x_in, c_noise, class_labels=None, encoder_hidden_states=None, time_ids=None):
        h = self.conv(x_in) * c_noise.view(-1, 1, 1, 1).exp()
        text = self.text_out(torch.tanh(self.text(encoder_hidden_states))).mean(1)
        return h + (text + self.time(time_ids) + self.label(class_labels)).view(-1, 2, 1, 1)


def _cond_inputs(B, gen, dtype=torch.float32):
    x = torch.randn(B, 2, 4, 4, generator=gen)
    c = 0.25 * torch.empty(B).uniform_(math.log(0.002), math.log(80.0), generator=gen)
    cond = {"class_labels": torch.randint(0, 4, (B,), generator=gen),
            "encoder_hidden_states": torch.randn(B, 5, 7, generator=gen).to(dtype),
            "time_ids": torch.randn(B, 6, generator=gen).to(dtype)}
    return x, c, cond


@pytest.fixture(scope="module")
def cond_exported(tmp_path_factory, one_thread):
    net = CondNet().eval()
    r = export_onnx(net, tmp_path_factory.mktemp("onnx") / "cond.onnx", cond_inputs=COND)
    return net, r


def test_export_with_cond_inputs_matches_torch(cond_exported, gen):
    net, r = cond_exported
    # Every conditioning input a named input after x_in, c_noise, in the declared order (class labels first: the
    # model's num_classes adds them), each with a dynamic batch and its fixed per-sample dims.
    assert list(r.inputs) == ["x_in", "c_noise", "class_labels", "encoder_hidden_states", "time_ids"]
    assert r.inputs["class_labels"] == (("batch",), "tensor(int64)")
    assert r.inputs["encoder_hidden_states"] == (("batch", 5, 7), "tensor(float)")
    assert r.inputs["time_ids"] == (("batch", 6), "tensor(float)")
    assert r.outputs["F"] == (("batch", 2, 4, 4), "tensor(float)")
    assert r.cond_inputs == (LABELS,) + COND and r.max_abs_err <= r.tolerance and not r.external_data
    # The file declares them (edmrt.cond): a loader knows names, shapes, dtypes, null rows and classes.
    meta = {p.key: p.value for p in onnx.load(r.path).metadata_props}
    assert json.loads(meta["edmrt.cond"]) == [c.to_dict() for c in (LABELS,) + COND]
    assert onnx_cond_inputs(r.path) == (LABELS,) + COND
    session = load_onnx_session(r.path, providers=["CPUExecutionProvider"], cond_inputs=(LABELS,) + COND)
    for B in (1, 3):
        x, c, cond = _cond_inputs(B, gen)
        with torch.no_grad():
            ref = net(x, c, **cond)
        got = session.run(["F"], {"x_in": x.numpy(), "c_noise": c.numpy(), **{k: v.numpy() for k, v in cond.items()}})
        assert float((torch.from_numpy(got[0]) - ref).abs().max()) <= 1e-5, B


def test_onnxruntime_backend_binds_every_cond_input(cond_exported, gen):
    net, r = cond_exported
    backend = OnnxRuntimeBackend(r.path, providers=["CPUExecutionProvider"], cond_inputs=(LABELS,) + COND)
    assert backend.cond_inputs == (LABELS,) + COND and backend.conditional
    assert OnnxRuntimeBackend(r.path, providers=["CPUExecutionProvider"]).cond_inputs == (LABELS,) + COND
    for B in (1, 3):
        x, c, cond = _cond_inputs(B, gen)
        out = torch.full_like(x, float("nan"))
        backend(x, c.view(B, 1, 1, 1), cond, out)
        with torch.no_grad():
            assert float((out - net(x, c, **cond)).abs().max()) <= 1e-5, B
        # Same buffers, new contents: the cached binding reads them.
        x2, c2, cond2 = _cond_inputs(B, gen)
        x.copy_(x2)
        c.copy_(c2)
        for k in cond:
            cond[k].copy_(cond2[k])
        backend(x, c, cond, out)
        with torch.no_grad():
            assert float((out - net(x, c, **cond)).abs().max()) <= 1e-5, B
        # Another embedding buffer, every other buffer the same: a binding of its own (the key holds every cond
        # tensor's address), not the old one reading the old buffer.
        for name in ("encoder_hidden_states", "time_ids", "class_labels"):
            other = dict(cond)
            other[name] = cond[name].clone().random_(0, 4) if name == "class_labels" else torch.randn_like(cond[name])
            backend(x, c, other, out)
            with torch.no_grad():
                assert float((out - net(x, c, **other)).abs().max()) <= 1e-5, name
            backend(x, c, cond, out)
            with torch.no_grad():
                assert float((out - net(x, c, **cond)).abs().max()) <= 1e-5, name


def test_cond_argument_errors_name_the_input(cond_exported, gen):
    net, r = cond_exported
    backends = [OnnxRuntimeBackend(r.path, providers=["CPUExecutionProvider"]),
                TorchBackend(net, cond_inputs=(LABELS,) + COND)]
    x, c, cond = _cond_inputs(2, gen)
    out = torch.empty_like(x)
    cases = [
        ({**cond, "encoder_hidden_state": cond.pop("encoder_hidden_states")}, "encoder_hidden_state"),  # a typo
        ({k: v for k, v in _cond_inputs(2, gen)[2].items() if k != "time_ids"}, "time_ids"),            # missing
        ({**_cond_inputs(2, gen)[2], "extra": torch.zeros(2)}, "extra"),                                # unknown
        ({**_cond_inputs(2, gen)[2], "encoder_hidden_states": torch.zeros(2, 5, 8)}, "encoder_hidden_states"),
        ({**_cond_inputs(2, gen)[2], "encoder_hidden_states": torch.zeros(3, 5, 7)}, "encoder_hidden_states"),
        ({**_cond_inputs(2, gen)[2], "time_ids": torch.zeros(2, 6, dtype=torch.float64)}, "time_ids"),
        ({**_cond_inputs(2, gen)[2], "time_ids": torch.zeros(2, 6, dtype=torch.float16)}, "time_ids"),
        ({**_cond_inputs(2, gen)[2], "time_ids": torch.zeros(6, 2).t()}, "time_ids"),                   # strided
        ({**_cond_inputs(2, gen)[2], "class_labels": torch.zeros(2, dtype=torch.int32)}, "class_labels"),
        ({**_cond_inputs(2, gen)[2], "time_ids": [[0.0] * 6] * 2}, "time_ids"),                         # not a tensor
    ]
    for backend in backends:
        for bad, name in cases:
            with pytest.raises(ValueError, match=re.escape(name)):
                backend(x, c, bad, out)
        with pytest.raises(ValueError, match="encoder_hidden_states"):
            backend(x, c, None, out)


def test_the_signature_check_refuses_other_cond_inputs(cond_exported):
    _, r = cond_exported
    ours = (LABELS,) + COND
    others = {
        "a missing input": ((LABELS, COND[0]), "not the model's"),
        "an extra input": (ours + (CondInput("text_embeds", (12,)),), "not the model's"),
        "another name": ((LABELS, CondInput("image_embeds", (5, 7)), COND[1]), "not the model's"),
        "another shape": ((LABELS, CondInput("encoder_hidden_states", (5, 8)), COND[1]), "'encoder_hidden_states'.*shape"),
        "another dtype": ((LABELS, COND[0], CondInput("time_ids", (6,), torch.float16)), "'time_ids'.*float16"),
        "no inputs": ((), "not the model's"),
    }
    for what, (cond, match) in others.items():
        with pytest.raises(ValueError, match=match):
            load_onnx_session(r.path, providers=["CPUExecutionProvider"], cond_inputs=cond)
        with pytest.raises(ValueError, match=match):
            OnnxRuntimeBackend(r.path, providers=["CPUExecutionProvider"], cond_inputs=cond)
    with pytest.raises(ValueError, match="unconditional"):
        load_onnx_session(r.path, providers=["CPUExecutionProvider"], conditional=False)
    # The order of the model's declaration does not matter (inputs are bound by name).
    assert load_onnx_session(r.path, providers=["CPUExecutionProvider"], cond_inputs=COND[::-1] + (LABELS,))


def test_the_signature_check_reads_cond_from_the_graph_and_metadata(tmp_path):
    TEXT = ("encoder_hidden_states", F32, ["B", 5, 7])
    path = _identity_model(tmp_path / "m.onnx", [X, C, Y, TEXT], OUT)
    session = load_onnx_session(path)
    got = session.get_inputs()
    # Without edmrt.cond: names, shapes and dtypes from the graph, class counts from edmrt.num_classes.
    assert check_onnx_signature(got, session.get_outputs()) == (
        CondInput("class_labels", (), torch.int64), CondInput("encoder_hidden_states", (5, 7)))
    assert check_onnx_signature(got, session.get_outputs(), meta={"edmrt.num_classes": "10"})[0] == \
        CondInput("class_labels", (), torch.int64, null=10, num_classes=10)
    stored = [LABELS.to_dict(), CondInput("encoder_hidden_states", (5, 7), null=0.0).to_dict()]
    assert check_onnx_signature(got, session.get_outputs(), meta={"edmrt.cond": json.dumps(stored)}) == (
        LABELS, CondInput("encoder_hidden_states", (5, 7), null=0.0))
    for bad, match in (([stored[1], stored[0]], "names the inputs"), ([stored[0]], "names the inputs"),
                       ([stored[0], {**stored[1], "shape": [5, 8]}], "'encoder_hidden_states'.*shape"),
                       ("{", "edmrt.cond metadata")):
        with pytest.raises(ValueError, match=match):
            check_onnx_signature(got, session.get_outputs(), meta={"edmrt.cond": bad if isinstance(bad, str)
                                                                   else json.dumps(bad)})


def test_fp16_export_with_an_embedding_input(tmp_path, gen):
    """fp16 of a net without to_fp16: float16 weights inside, the declared I/O (float32 embeddings, int64 labels)."""
    net = CondNet().eval()
    r = export_onnx(net, tmp_path / "half.onnx", cond_inputs=COND, dtype="fp16")
    assert r.dtype == "fp16" and r.max_abs_err <= r.tolerance
    assert r.inputs["encoder_hidden_states"] == (("batch", 5, 7), "tensor(float)")
    assert r.inputs["class_labels"] == (("batch",), "tensor(int64)") and r.outputs["F"][1] == "tensor(float)"
    model = onnx.load(r.path)
    kinds = {t.data_type for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == 64}  # text weights
    assert kinds == {TensorProto.FLOAT16}
    backend = OnnxRuntimeBackend(r.path, providers=["CPUExecutionProvider"], cond_inputs=(LABELS,) + COND)
    x, c, cond = _cond_inputs(3, gen)
    out = torch.empty_like(x)
    backend(x, c, cond, out)
    with torch.no_grad():
        ref = net(x, c, **cond)
    err = float((out - ref).abs().max())
    assert 0 < err <= 1e-2 * max(1.0, float(ref.abs().max())), err


def test_external_data_export(tmp_path, gen):
    """external_data=True: the weights in one data file beside the model (a > 2 GB network's layout, tested small);
    both published together, recorded in the report, loaded by ONNX Runtime; an export over it replaces both and
    leaves no stale data file."""
    net = CondNet().eval()
    path = tmp_path / "out" / "big.onnx"
    r1 = export_onnx(net, path, cond_inputs=COND, external_data=True)
    data1 = [n for n in r1.files if n != "big.onnx"]
    assert r1.external_data and len(data1) == 1 and re.fullmatch(r"big\.onnx\.[0-9a-f]{12}\.data", data1[0])
    assert sorted(os.listdir(path.parent)) == sorted(r1.files)  # no staging folder left
    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) == 0 for t in proto.graph.initializer if t.name in external)
    assert (path.parent / data1[0]).stat().st_size >= 64 * 7 * 4
    backend = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"], cond_inputs=(LABELS,) + COND)
    x, c, cond = _cond_inputs(3, gen)
    out = torch.empty_like(x)
    backend(x, c, cond, out)
    with torch.no_grad():
        assert float((out - net(x, c, **cond)).abs().max()) <= 1e-5
    # Again, other weights: a new data file name; the old one removed once the new model is in place.
    other = CondNet(seed=1).eval()
    r2 = export_onnx(other, path, cond_inputs=COND, external_data=True)
    data2 = [n for n in r2.files if n != "big.onnx"]
    assert data2 != data1 and sorted(os.listdir(path.parent)) == sorted(r2.files)
    # Back to one file: the data file goes too.
    r3 = export_onnx(other, path, cond_inputs=COND, external_data=False, verify=False)
    assert list(r3.files) == ["big.onnx"] and os.listdir(path.parent) == ["big.onnx"] and not r3.external_data
    # A failed export leaves the old model and its data file as they were.
    r4 = export_onnx(net, path, cond_inputs=COND, external_data=True, verify=False)
    from edmrt.export import onnx as onnx_mod

    before = {n: (path.parent / n).read_bytes() for n in r4.files}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(onnx_mod.TOLERANCE, "fp32", -1.0)
        with pytest.raises(ExportVerificationError):
            export_onnx(other, path, cond_inputs=COND, external_data=True)
    assert {n: (path.parent / n).read_bytes() for n in os.listdir(path.parent)} == before
