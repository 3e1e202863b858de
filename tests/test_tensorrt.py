"""TensorRT: the engine cache's key, manifest and rebuild logic (with an injected builder, so it runs
without TensorRT), and the real build, which skips here: TensorRT cannot be installed on these machines."""
import json

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
    onnx_file.write_bytes(b"onnx-bytes-v2")
    _cache(tmp_path, b).get(onnx_file, prof, "fp16")                                 # weights / graph
    assert b.calls == 6
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
