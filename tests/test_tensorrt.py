"""TensorRT: the engine cache's key, manifest and rebuild logic (with an injected builder, so it runs
without TensorRT), and the real build, which skips here: TensorRT cannot be installed on these machines."""
import json

import numpy as np
import pytest

from edmrt.backends.trt import tensorrt_available
from edmrt.export.tensorrt import EngineCache, Profile


class CountingBuilder:
    def __init__(self):
        self.calls = 0

    def __call__(self, onnx_path, profile, precision, timing_cache):
        self.calls += 1
        return f"engine for {onnx_path.read_bytes()!r} {profile} {precision} #{self.calls}".encode()


@pytest.fixture
def onnx_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"onnx-bytes-v1")
    return p


def _cache(tmp_path, builder, cc="9.0", trt="10.9"):
    return EngineCache(tmp_path / "cache", builder=builder, trt_version=trt, compute_capability=cc)


def test_cache_hits_and_keys_on_everything_that_changes_an_engine(tmp_path, onnx_file):
    b = CountingBuilder()
    prof = Profile((3, 32, 32), 1, 8, 64)
    e1 = _cache(tmp_path, b).get(onnx_file, prof, "fp16")
    assert b.calls == 1 and e1.exists()
    assert _cache(tmp_path, b).get(onnx_file, prof, "fp16") == e1 and b.calls == 1  # hit
    _cache(tmp_path, b).get(onnx_file, prof, "bf16")                                 # precision
    _cache(tmp_path, b).get(onnx_file, Profile((3, 32, 32), 1, 8, 128), "fp16")      # profile
    _cache(tmp_path, b, cc="8.0").get(onnx_file, prof, "fp16")                       # GPU
    _cache(tmp_path, b, trt="10.10").get(onnx_file, prof, "fp16")                    # TensorRT version
    _cache(tmp_path, b).get(onnx_file, Profile((3, 32, 32), 1, 8, 64, cond_shapes={"encoder_hidden_states": (77, 768)}),
                            "fp16")                                                  # a conditioning input's dims
    onnx_file.write_bytes(b"onnx-bytes-v2")
    _cache(tmp_path, b).get(onnx_file, prof, "fp16")                                 # weights / graph
    assert b.calls == 7
    manifest = json.loads((e1.parent / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["compute_capability"] == "9.0"
    assert manifest["profile"]["max_batch"] == 64 and len(manifest["engine_sha256"]) == 64


@pytest.mark.parametrize("damage", ["truncate", "manifest", "delete_manifest", "field"])
def test_a_corrupt_or_mismatched_entry_is_rebuilt_not_trusted(tmp_path, onnx_file, damage):
    b = CountingBuilder()
    prof = Profile((3, 8, 8))
    engine = _cache(tmp_path, b).get(onnx_file, prof, "fp32")
    good = engine.read_bytes()
    manifest = engine.parent / "manifest.json"
    if damage == "truncate":
        engine.write_bytes(good[:5])
    elif damage == "manifest":
        manifest.write_text("{not json")
    elif damage == "delete_manifest":
        manifest.unlink()
    else:
        m = json.loads(manifest.read_text())
        m["tensorrt"] = "8.6"
        manifest.write_text(json.dumps(m))
    again = _cache(tmp_path, b).get(onnx_file, prof, "fp32")
    assert b.calls == 2 and again == engine
    assert json.loads(manifest.read_text())["tensorrt"] == "10.9"
    assert _cache(tmp_path, b).get(onnx_file, prof, "fp32") == engine and b.calls == 2  # now trusted again


def test_bad_arguments(tmp_path, onnx_file):
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        Profile((3, 8, 8), 4, 2, 8)
    with pytest.raises(ValueError, match="precision must be one of"):
        _cache(tmp_path, CountingBuilder()).get(onnx_file, Profile((3, 8, 8)), "int8")
    with pytest.raises(ValueError, match="ONNX file not found"):
        _cache(tmp_path, CountingBuilder()).get(tmp_path / "nope.onnx", Profile((3, 8, 8)), "fp16")
    with pytest.raises(ValueError, match="cond_shapes"):
        Profile((3, 8, 8), cond_shapes={"encoder_hidden_states": (0, 768)})
    with pytest.raises(ValueError, match="cond_shapes"):
        Profile((3, 8, 8), cond_shapes={"encoder_hidden_states": "77"})


def test_profile_cond_shapes_are_stored_sorted():
    p = Profile((3, 8, 8), cond_shapes={"time_ids": [6], "encoder_hidden_states": (77, 768)})
    assert p.cond_shapes == (("encoder_hidden_states", (77, 768)), ("time_ids", (6,)))
    assert p == Profile((3, 8, 8), cond_shapes=(("time_ids", (6,)), ("encoder_hidden_states", [77, 768])))
    hash(p)  # frozen and hashable


@pytest.mark.skipif(not tensorrt_available(), reason="TensorRT is not installed (it cannot be on these machines, "
                                                      "nor on the lent GPU machines): the real build is unverified")
def test_real_tensorrt_build_and_run(tmp_path):  # pragma: no cover - runs only where TensorRT exists
    import torch

    from edmrt.backends.trt import TensorRTBackend
    from edmrt.export.onnx import export_onnx
    from edmrt.models.unet import build_unet

    net = build_unet("tiny").cuda().eval()
    report = export_onnx(net.cpu(), tmp_path / "tiny.onnx", sample_shape=net.sample_shape)
    engine = EngineCache(tmp_path).get(report.path, Profile(net.sample_shape, 1, 2, 4), "fp32")
    be = TensorRTBackend(engine)
    x = torch.randn(2, *net.sample_shape, device="cuda")
    c = torch.randn(2, device="cuda")
    out = torch.empty_like(x)
    be(x, c, None, out)
    torch.cuda.synchronize()
    assert (out - net.cuda()(x, c, None)).abs().max().item() < 1e-3


@pytest.mark.skipif(not tensorrt_available(), reason="TensorRT is not installed (it cannot be on these machines, "
                                                      "nor on the lent GPU machines): the real build is unverified")
def test_real_tensorrt_build_and_run_with_cond_inputs(tmp_path):  # pragma: no cover - runs only where TensorRT exists
    import torch

    from edmrt.backends.trt import TensorRTBackend
    from edmrt.export.onnx import export_onnx
    from edmrt.model import CondInput

    class TextNet(torch.nn.Module):
        sample_shape = (2, 4, 4)
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
            self.text = torch.nn.Linear(7, 2)
            self.label = torch.nn.Embedding(4, 2)

        def forward(self, x_in, c_noise, class_labels, encoder_hidden_states):
            e = self.text(encoder_hidden_states).mean(1) + self.label(class_labels)
            return self.conv(x_in) * c_noise.view(-1, 1, 1, 1).exp() + e.view(-1, 2, 1, 1)

    net = TextNet().eval()
    cond = (CondInput("encoder_hidden_states", (5, 7)),)
    report = export_onnx(net, tmp_path / "text.onnx", cond_inputs=cond)
    engine = EngineCache(tmp_path).get(report.path, Profile(net.sample_shape, 1, 2, 4), "fp32")
    be = TensorRTBackend(engine)
    assert [c.name for c in be.cond_inputs] == ["class_labels", "encoder_hidden_states"]
    x, c = torch.randn(3, 2, 4, 4, device="cuda"), torch.randn(3, device="cuda")
    values = {"class_labels": torch.tensor([0, 1, 3], device="cuda"),
              "encoder_hidden_states": torch.randn(3, 5, 7, device="cuda")}
    out = torch.empty_like(x)
    be(x, c, values, out)
    torch.cuda.synchronize()
    assert (out - net.cuda()(x, c, **values)).abs().max().item() < 1e-3


class _FakeTRT:
    """Just enough of the ``tensorrt`` module to drive build_engine and TensorRTBackend on the CPU: records the
    optimisation profile's shapes and the execution context's bindings (no engine is built or run)."""

    class DataType:
        FLOAT, HALF, INT64, BF16, INT32 = "float", "half", "int64", "bf16", "int32"

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class BuilderFlag:
        FP16, BF16, REFIT = "fp16", "bf16", "refit"

    class Weights:
        def __init__(self, arr):
            self.arr = arr

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def __init__(self, tensors):
        self.tensors = tensors  # name -> (mode, shape with -1 for dynamic dims, dtype)
        self.profile, self.calls, self.flags = {}, [], []
        self.engine_weights = {}     # the engine's weight name -> array (refittable engines)
        self.fused_with = {}         # name -> names TensorRT fused with it (reported missing until set)
        self.refittable = False
        fake = self

        class Input:
            def __init__(self, name):
                self.name, self.shape = name, tensors[name][1]

        class Network:
            num_inputs = sum(1 for m, _, _ in tensors.values() if m == "in")

            def get_input(self, i):
                return Input([n for n, (m, _, _) in tensors.items() if m == "in"][i])

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.profile[name] = (lo, opt, hi)

        class Config:
            def set_flag(self, flag):
                fake.flags.append(flag)

            def add_optimization_profile(self, p):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan"

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse(self, data):
                return True

        class Context:
            def set_input_shape(self, name, shape):
                fake.calls.append(("shape", name, tuple(shape)))

            def set_tensor_address(self, name, ptr):
                fake.calls.append(("address", name, ptr))

            def execute_async_v3(self, stream):
                fake.calls.append(("run", stream))
                return True

        class Engine:
            num_io_tensors = len(tensors)

            def get_tensor_name(self, i):
                return list(tensors)[i]

            def get_tensor_mode(self, name):
                return tensors[name][0]

            def get_tensor_shape(self, name):
                return tensors[name][1]

            def get_tensor_dtype(self, name):
                return tensors[name][2]

            def create_execution_context(self):
                return Context()

            @property
            def refittable(self):
                return fake.refittable

        class Refitter:
            def __init__(self, engine, logger):
                self.pending = {}

            def get_all_weights(self):
                return list(fake.engine_weights)

            def set_named_weights(self, name, w):
                if name not in fake.engine_weights or w.arr.shape != fake.engine_weights[name].shape:
                    return False
                self.pending[name] = w.arr.copy()
                return True

            def get_missing_weights(self):
                return sorted({m for n in self.pending for m in fake.fused_with.get(n, ())} - set(self.pending))

            def refit_cuda_engine(self):
                if self.get_missing_weights():
                    return False
                fake.engine_weights.update(self.pending)
                fake.calls.append(("refit", sorted(self.pending)))
                self.pending = {}
                return True

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                return Engine()

        self.Builder, self.OnnxParser, self.Runtime, self.Refitter = Builder, Parser, Runtime, Refitter


TENSORS = {"x_in": ("in", (-1, 2, 4, 4), "float"), "c_noise": ("in", (-1,), "float"),
           "class_labels": ("in", (-1,), "int64"), "encoder_hidden_states": ("in", (-1, 5, 7), "float"),
           "F": ("out", (-1, 2, 4, 4), "float")}


def test_build_engine_sets_a_profile_for_every_input_by_name(tmp_path, onnx_file, monkeypatch):
    """The builder's profile (fake TensorRT: the calls themselves are unverified): the batch range on every input,
    the per-sample dims from the file, a symbolic one from Profile.cond_shapes or refused by name."""
    import edmrt.export.tensorrt as trt_mod

    fake = _FakeTRT(TENSORS)
    monkeypatch.setattr(trt_mod, "import_tensorrt", lambda: fake)
    assert trt_mod.build_engine(onnx_file, Profile((2, 4, 4), 1, 8, 64), "fp16") == b"plan"
    assert fake.profile == {"x_in": ((1, 2, 4, 4), (8, 2, 4, 4), (64, 2, 4, 4)), "c_noise": ((1,), (8,), (64,)),
                            "class_labels": ((1,), (8,), (64,)),
                            "encoder_hidden_states": ((1, 5, 7), (8, 5, 7), (64, 5, 7))}
    fake = _FakeTRT({**TENSORS, "encoder_hidden_states": ("in", (-1, -1, 7), "float")})
    monkeypatch.setattr(trt_mod, "import_tensorrt", lambda: fake)
    with pytest.raises(ValueError, match="'encoder_hidden_states'.*cond_shapes"):
        trt_mod.build_engine(onnx_file, Profile((2, 4, 4)), "fp16")
    trt_mod.build_engine(onnx_file, Profile((2, 4, 4), 1, 2, 4, cond_shapes={"encoder_hidden_states": (77, 7)}), "fp16")
    assert fake.profile["encoder_hidden_states"] == ((1, 77, 7), (2, 77, 7), (4, 77, 7))


def test_tensorrt_backend_binds_every_cond_input_by_name(tmp_path, monkeypatch):
    """TensorRTBackend with a fake TensorRT: its conditioning inputs come from the engine, every one is checked and
    bound by name (its shape and address), a wrong one raises ValueError naming it."""
    import torch

    import edmrt.backends.trt as trt_backend
    from edmrt.model import CondInput

    fake = _FakeTRT(TENSORS)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    (tmp_path / "e.plan").write_bytes(b"plan")
    be = trt_backend.TensorRTBackend(tmp_path / "e.plan")
    assert be.cond_inputs == (CondInput("class_labels", (), torch.int64), CondInput("encoder_hidden_states", (5, 7)))
    assert be.conditional
    with pytest.raises(ValueError, match="not the model's"):
        trt_backend.TensorRTBackend(tmp_path / "e.plan", cond_inputs=(CondInput("encoder_hidden_states", (5, 8)),))
    x, c, out = torch.randn(3, 2, 4, 4), torch.randn(3), torch.empty(3, 2, 4, 4)
    cond = {"class_labels": torch.tensor([0, 1, 2]), "encoder_hidden_states": torch.randn(3, 5, 7)}
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        be(x, c, {**cond, "encoder_hidden_states": torch.randn(3, 5, 6)}, out)
    with pytest.raises(ValueError, match="CUDA"):  # the arguments are right: only the device is not
        be(x, c, cond, out)

    class Stream:
        cuda_stream = 7

    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    be._run(x, c, cond, out)
    assert fake.calls == [("shape", "x_in", (3, 2, 4, 4)), ("address", "x_in", x.data_ptr()),
                          ("shape", "c_noise", (3,)), ("address", "c_noise", c.data_ptr()),
                          ("shape", "class_labels", (3,)), ("address", "class_labels", cond["class_labels"].data_ptr()),
                          ("shape", "encoder_hidden_states", (3, 5, 7)),
                          ("address", "encoder_hidden_states", cond["encoder_hidden_states"].data_ptr()),
                          ("address", "F", out.data_ptr()), ("run", 7)]


def test_refittable_engine_takes_new_weights_by_parameter_name(tmp_path, onnx_file, monkeypatch):
    """The refit logic with a fake TensorRT (trt.Refitter itself is unverified: no GPU here): build_engine sets
    BuilderFlag.REFIT and the cache keys on it; update_weights maps parameter names onto the engine's "net.<name>"
    weights, supplies the weights TensorRT fused with a changed one, and refuses an engine built without REFIT or a
    parameter the engine does not hold."""
    import torch

    import edmrt.backends.trt as trt_backend
    import edmrt.export.tensorrt as trt_mod

    fake = _FakeTRT(TENSORS)
    monkeypatch.setattr(trt_mod, "import_tensorrt", lambda: fake)
    trt_mod.build_engine(onnx_file, Profile((2, 4, 4)), "fp16", refit=True)
    assert fake.flags == ["fp16", "refit"]
    builds = []
    cache = _cache(tmp_path, lambda *a, **kw: builds.append(kw) or b"plan")
    plain, refit = cache.get(onnx_file, Profile((2, 4, 4))), cache.get(onnx_file, Profile((2, 4, 4)), refit=True)
    assert plain != refit and builds == [{}, {"refit": True}]

    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake)
    (tmp_path / "e.plan").write_bytes(b"plan")
    params = {"conv.weight": torch.randn(4, 2, 3, 3), "conv.bias": torch.randn(4), "norm.weight": torch.randn(4)}
    fake.engine_weights = {"net.conv.weight": np.zeros((4, 2, 3, 3), np.float32), "net.conv.bias": np.zeros(4, np.float32)}
    fake.fused_with = {"net.conv.weight": ("net.conv.bias",)}
    with pytest.raises(ValueError, match="not refittable"):
        trt_backend.TensorRTBackend(tmp_path / "e.plan", weights=params)
    fake.refittable = True
    be = trt_backend.TensorRTBackend(tmp_path / "e.plan", weights=params)
    assert be._engine_names == {"conv.weight": "net.conv.weight", "conv.bias": "net.conv.bias"}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    new = torch.randn(4, 2, 3, 3)
    be.update_weights({"conv.weight": new})
    assert fake.calls[-1] == ("refit", ["net.conv.bias", "net.conv.weight"])
    np.testing.assert_array_equal(fake.engine_weights["net.conv.weight"], new.numpy())
    np.testing.assert_array_equal(fake.engine_weights["net.conv.bias"], params["conv.bias"].numpy())
    with pytest.raises(ValueError, match="norm.weight"):
        be.update_weights({"norm.weight": torch.randn(4)})
    with pytest.raises(RuntimeError, match="refused"):
        be.update_weights({"conv.weight": torch.randn(5, 2, 3, 3)})
    with pytest.raises(ValueError, match="without weights"):
        trt_backend.TensorRTBackend(tmp_path / "e.plan").update_weights({"conv.weight": new})
