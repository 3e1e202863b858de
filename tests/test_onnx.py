"""ONNX export (dynamic batch, fp32/fp16), load checks, and the denoiser backends (torch, ONNX Runtime I/O binding)."""
import math
import re

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter's translator) is not installed")

from onnx import TensorProto, helper  # noqa: E402

from edmrt.backends import BACKENDS, OnnxRuntimeBackend, TorchBackend, make_backend  # noqa: E402
from edmrt.backends.ort import load_onnx_session, weights_sha256  # noqa: E402
from edmrt.export import ExportVerificationError, export_onnx  # noqa: E402
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
    assert meta == {"edmrt.num_classes": "3", "edmrt.sample_shape": "2,8,8", "edmrt.dtype": "fp16",
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
    ([X, C, ("labels", I64, ["B"])], OUT, "named"),                       # unknown extra input
    ([X, ("c_noise", F32, ["B", 1, 1, 1])], OUT, "c_noise.*rank 1"),       # wrong rank
    ([X, C, ("class_labels", F32, ["B"])], OUT, "class_labels.*int64"),    # wrong dtype
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
    with pytest.raises(ValueError, match="None for an unconditional"):
        uncond(x, c, y, out)


def test_registry_and_compile_failure(monkeypatch):
    assert {"torch", "torch-compile", "onnxruntime"} <= set(BACKENDS)
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("tensorflow", _net())
    assert isinstance(make_backend("torch", _net()), TorchBackend)

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
