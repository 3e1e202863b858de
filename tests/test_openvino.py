"""OpenVINO as a backend (edmrt.backends.ov) and backend="auto" by measurement (edmrt.backends.auto).

OpenVINO fp32 equals torch eager within float32 rounding on the digits networks (irregular batches, class labels,
guidance); bf16 within its stated tolerance; the engine's buffers are bound, not copied; bad inputs and bad files are
refused with the argument named; the compiled-blob cache is used when intact and rebuilt when not; "auto" keeps the
fastest candidate that matches torch, never a fast wrong one, caches its choice and honours a pin."""
from __future__ import annotations

import importlib.util
import json
import logging
import threading

import pytest
import torch

ov = pytest.importorskip("openvino")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import edmrt  # noqa: E402
from edmrt.backends import OpenVinoBackend, resolve_backend  # noqa: E402
from edmrt.backends import ov as ovmod  # noqa: E402
from edmrt.backends.auto import TOLERANCE, AutoBackend  # noqa: E402
from edmrt.backends.onnx_cache import cached_onnx  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDMRT_CACHE", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def digits(cache):
    return edmrt.load("digits")


@pytest.fixture(scope="module")
def onnx_path(digits):
    return cached_onnx(digits, torch.device("cpu"))[0]


def _inputs(model, B, gen):
    x = torch.randn(B, *model.sample_shape, generator=gen)
    c = torch.rand(B, generator=gen) * 3 - 1
    labels = torch.randint(0, 11, (B,), generator=gen)   # 10 is the null label
    return x, c, {"class_labels": labels}


def _torch_F(model, x, c, cond):
    with torch.inference_mode():
        return model.network(x, c, **cond)


@pytest.mark.parametrize("B", [1, 5, 16])
def test_fp32_equals_torch_and_reads_the_live_buffers(digits, onnx_path, gen, B):
    be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond)
    x, c, cond = _inputs(digits, B, gen)
    out = torch.full_like(x, float("nan"))
    be(x, c, cond, out)
    assert torch.allclose(out, _torch_F(digits, x, c, cond), atol=2e-5, rtol=1e-4)
    # The same buffers again with new contents, in place: the bound request reads them (no copy taken at bind time)
    x.copy_(torch.randn(x.shape, generator=gen))
    ptr = out.data_ptr()
    be(x, c, cond, out)
    assert out.data_ptr() == ptr and torch.allclose(out, _torch_F(digits, x, c, cond), atol=2e-5, rtol=1e-4)


def test_sampler_on_openvino_matches_torch_with_guidance(digits, cache):
    seeds, labels = list(range(7)), [3, 1, 4, 1, 5, 9, 2]
    ref = edmrt.Sampler(digits, backend="torch").sample(seeds, cond=labels, guidance=1.5)
    got = edmrt.Sampler(digits, backend="openvino").sample(seeds, cond=labels, guidance=1.5)
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.skipif(not ovmod.bf16_supported(), reason="this CPU has no bf16 (OpenVINO names no BF16 capability)")
def test_bf16_within_its_tolerance_and_state_stays_float32(digits, cache):
    seeds = list(range(16))
    ref = edmrt.Sampler(digits, backend="torch").sample(seeds, cond=[s % 10 for s in seeds])
    got = edmrt.Sampler(digits, backend="openvino-bf16").sample(seeds, cond=[s % 10 for s in seeds])
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert 0 < rel < TOLERANCE["auto-bf16"], rel   # bf16 differs (it is not silently fp32), within the tolerance


def test_bf16_refused_on_a_cpu_without_it(onnx_path, digits, monkeypatch):
    monkeypatch.setattr(ovmod, "cpu_capabilities", lambda core=None: ["FP32", "INT8"])
    with pytest.raises(ValueError, match="bf16 support"):
        OpenVinoBackend(onnx_path, cond_inputs=digits.cond, precision="bf16")


@pytest.mark.parametrize("kwargs,match", [
    (dict(precision="fp16"), "precision"), (dict(hint="fast"), "hint"), (dict(threads=0), "threads"),
])
def test_bad_options_name_the_argument(onnx_path, digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        OpenVinoBackend(onnx_path, cond_inputs=digits.cond, **kwargs)


def test_bad_calls_name_the_argument(onnx_path, digits, gen):
    be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond)
    x, c, cond = _inputs(digits, 3, gen)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="x_in"):
        be(x.double(), c, cond, out)
    with pytest.raises(ValueError, match="x_in must have shape"):
        be(torch.zeros(3, 1, 9, 9), c, cond, torch.zeros(3, 1, 9, 9))
    with pytest.raises(ValueError, match="out"):
        be(x, c, cond, torch.empty(2, *digits.sample_shape))
    with pytest.raises(ValueError, match="class_labels"):
        be(x, c, {"class_labels": cond["class_labels"].int()}, out)


def test_bad_files_are_refused(tmp_path, digits, onnx_path):
    with pytest.raises(ValueError, match="does not exist"):
        OpenVinoBackend(tmp_path / "missing.onnx")
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(onnx_path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        OpenVinoBackend(bad)
    with pytest.raises(ValueError, match="conditioning inputs"):
        OpenVinoBackend(onnx_path, cond_inputs=())   # the file has class labels; the caller's model has none


def test_blob_cache_hit_corrupt_and_link(onnx_path, digits, gen, cache, caplog):
    x, c, cond = _inputs(digits, 4, gen)
    outs = []
    for _ in range(2):
        be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond, hint="latency", threads=1)
        outs.append(torch.empty_like(x))
        be(x, c, cond, outs[-1])
    assert be.compile_log[-1][-1] == "cache" and torch.equal(outs[0], outs[1])
    blob = sorted((cache / "openvino").glob("*.blob"), key=lambda p: p.stat().st_mtime)[-1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF   # OpenVINO itself would import this; the recorded sha256 refuses it
    blob.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="edmrt.backends"):
        be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond, hint="latency", threads=1)
        out = torch.empty_like(x)
        be(x, c, cond, out)
    assert be.compile_log[-1][-1] == "compiled" and "sha256" in caplog.text and torch.equal(out, outs[0])
    target = blob.with_suffix(".elsewhere")
    blob.rename(target)
    blob.symlink_to(target)
    be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond, hint="latency", threads=1)
    be(x, c, cond, out)
    assert be.compile_log[-1][-1] == "compiled" and not blob.is_symlink() and torch.equal(out, outs[0])


def test_throughput_hint_splits_the_batch_and_agrees(onnx_path, digits, gen):
    x, c, cond = _inputs(digits, 16, gen)
    lat, thr = torch.empty_like(x), torch.empty_like(x)
    OpenVinoBackend(onnx_path, cond_inputs=digits.cond, hint="latency")(x, c, cond, lat)
    be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond, hint="throughput")
    be(x, c, cond, thr)
    batch, hint, streams, _, _ = be.compile_log[-1]
    streams_here = int(ov.Core().get_property("CPU", "RANGE_FOR_STREAMS")[1])
    assert batch == 16 and (streams > 1 or streams_here == 1) and hint == ("throughput" if streams > 1 else "latency")
    assert torch.allclose(thr, lat, atol=1e-5, rtol=1e-5)


def test_concurrent_calls_each_get_their_own_result(onnx_path, digits, gen):
    be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond)
    jobs = [_inputs(digits, 3 + i % 3, gen) for i in range(8)]
    want = []
    for x, c, cond in jobs:
        want.append(torch.empty_like(x))
        be(x, c, cond, want[-1])
    got = [torch.empty_like(x) for x, _, _ in jobs]
    errors = []

    def run(i):
        try:
            for _ in range(10):
                be(*jobs[i], got[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(g, w) for g, w in zip(got, want))


# -- backend="auto" ----------------------------------------------------------------------------------------------

class _Fake:
    """A candidate that is fast and wrong (all zeros), or poisoned (NaN)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, x_in, c_noise, cond, out):
        out.fill_(self.value)


def test_auto_keeps_the_fastest_that_matches_never_a_fast_wrong_one(digits, cache, gen, monkeypatch):
    monkeypatch.delenv("EDMRT_AUTO_BACKEND", raising=False)
    real = lambda n: resolve_backend(n, digits, torch.device("cpu"))[1]  # noqa: E731
    build = lambda n: {"zeros": _Fake(0.0), "nan": _Fake(float("nan"))}.get(n) or real(n)  # noqa: E731
    auto = AutoBackend(build, ["torch", "zeros", "nan", "openvino"], "auto", "w-test-1", cache=False)
    x, c, cond = _inputs(digits, 6, gen)
    out = torch.empty_like(x)
    auto(x, c, cond, out)
    choice = auto.choices[6]
    assert choice["picked"] in ("torch", "openvino") and choice["source"] == "measured"
    rows = {r["backend"]: r for r in choice["table"]}
    assert not rows["zeros"]["ok"] and not rows["nan"]["ok"] and rows["openvino"]["ok"]
    assert torch.allclose(out, _torch_F(digits, x, c, cond), atol=2e-5, rtol=1e-4)


def test_auto_caches_its_choice_and_rebuilds_a_bad_entry(digits, cache, gen, monkeypatch):
    monkeypatch.delenv("EDMRT_AUTO_BACKEND", raising=False)
    build = lambda n: resolve_backend(n, digits, torch.device("cpu"))[1]  # noqa: E731
    x, c, cond = _inputs(digits, 3, gen)
    out = torch.empty_like(x)
    first = AutoBackend(build, ["torch", "onnxruntime"], "auto", "w-test-2")
    first(x, c, cond, out)
    second = AutoBackend(build, ["torch", "onnxruntime"], "auto", "w-test-2")
    second(x, c, cond, out)
    assert second.choices[3]["source"] == "cache" and second.choices[3]["picked"] == first.choices[3]["picked"]
    (entry,) = [p for p in (cache / "auto").glob("*.json") if json.loads(p.read_text())["key_fields"]["weights"]
                == "w-test-2"]
    entry.write_text(json.dumps({"picked": "rm -rf", "table": []}))
    third = AutoBackend(build, ["torch", "onnxruntime"], "auto", "w-test-2")
    third(x, c, cond, out)
    assert third.choices[3]["source"] == "measured" and json.loads(entry.read_text())["picked"] in ("torch",
                                                                                                     "onnxruntime")


def test_auto_pin_and_a_bad_pin(digits, cache, monkeypatch):
    monkeypatch.setenv("EDMRT_AUTO_BACKEND", "openvino")
    s = edmrt.Sampler(digits, backend="auto")
    s.sample([1, 2], cond=[1, 2])
    assert s.backend.choices[2]["picked"] == "openvino" and "pinned" in s.backend.choices[2]["source"]
    monkeypatch.setenv("EDMRT_AUTO_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match="EDMRT_AUTO_BACKEND"):
        edmrt.Sampler(digits, backend="auto").sample([1], cond=[1])


def test_cli_sample_on_openvino_and_auto_says_what_it_picked(cache, tmp_path, monkeypatch, capsys):
    from edmrt.cli import main

    monkeypatch.delenv("EDMRT_AUTO_BACKEND", raising=False)
    assert main(["sample", "--model", "digits-cd", "--seeds", "0-3", "--backend", "openvino",
                 "-o", str(tmp_path / "a.png")]) == 0
    assert "backend openvino" in capsys.readouterr().out
    assert main(["sample", "--model", "digits-cd", "--seeds", "0-3", "-o", str(tmp_path / "b.png")]) == 0
    said = capsys.readouterr().out
    assert "backend auto, batch 4: picked" in said and "measured" in said and (tmp_path / "b.png").is_file()


def test_auto_builds_its_candidates_hashing_the_weights_and_the_file_once(digits, cache, monkeypatch):
    """Under "auto" every ONNX-based candidate shares one weights_sha256 of the network; the OpenVINO candidates
    take the ONNX file's sha256 from the cache's own check (no second pass over the file, no ONNX Runtime session
    opened only to check it and dropped).  The entry is still verified: a corrupted file is exported again."""
    from edmrt import onnx_contract
    from edmrt.backends import cachefile, onnx_cache

    cached_onnx(digits, torch.device("cpu"))  # the entry exists: what is counted is the lookups
    monkeypatch.delenv("EDMRT_AUTO_BACKEND", raising=False)
    counts = {"weights": 0, "sessions": 0, "ov_file_hash": 0}

    def counting(name, fn, onnx_only=False):
        def wrapped(*a, **k):
            counts[name] += not onnx_only or str(a[0]).endswith(".onnx")  # (OpenVINO's blobs are hashed too)
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(onnx_cache, "weights_sha256", counting("weights", onnx_cache.weights_sha256))
    monkeypatch.setattr(onnx_contract, "weights_sha256", counting("weights", onnx_contract.weights_sha256))
    monkeypatch.setattr(onnx_cache, "load_onnx_session", counting("sessions", onnx_cache.load_onnx_session))
    monkeypatch.setattr(ovmod, "sha256_file", counting("ov_file_hash", ovmod.sha256_file, onnx_only=True))
    s = edmrt.Sampler(digits, backend="auto")
    assert {"onnxruntime", "openvino"} <= set(s.backend.candidates)
    s.sample([1, 2], cond=[1, 2])   # measures: the choice's cache key needs the weights' digest
    assert counts == {"weights": 1, "sessions": 1, "ov_file_hash": 0}, counts
    # The check is by content: a flipped byte in the file is noticed and the file exported again.
    path, digest = onnx_cache.cached_onnx_file(digits, torch.device("cpu"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    again, fresh = onnx_cache.cached_onnx_file(digits, torch.device("cpu"))
    assert again == path and fresh == cachefile.sha256_file(path) and fresh == digest


# --- int8 (NNCF post-training quantisation) ----------------------------------------------------------------------

from edmrt.backends import calibrate as calmod  # noqa: E402

needs_nncf = pytest.mark.skipif(importlib.util.find_spec("nncf") is None,
                                reason="NNCF is not installed (pip install 'edmrt[openvino]')")


def _calibration(model, B=3, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x_in": torch.randn(B, *model.sample_shape, generator=g),
             "c_noise": torch.rand(B, generator=g) * 2.5 - 1.5,
             "class_labels": torch.randint(0, 11, (B,), generator=g)} for _ in range(n)]


@needs_nncf
def test_int8_calibrates_on_the_models_trajectories_matches_torch_and_is_cached(digits, cache, monkeypatch):
    """backend "openvino-int8": the network quantised on the inputs recorded along its own Heun trajectories (with
    the unconditional rows of guidance); sampling stays float32 and lands within 0.1 relative RMS of torch (measured
    0.028); a second backend finds the compiled blob under the calibration's recipe and never calibrates."""
    seeds = list(range(12))
    labels = [s % 10 for s in seeds]
    ref = edmrt.Sampler(digits, backend="torch").sample(seeds, cond=labels)
    s = edmrt.Sampler(digits, backend="openvino-int8")
    got = s.sample(seeds, cond=labels)
    assert s.backend.name == "openvino-int8" and got.dtype == torch.float32 and torch.isfinite(got).all()
    rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert 0 < rel < 0.1, rel   # int8 differs (it is not silently fp32) and stays close
    items = calmod.calibration_inputs(digits, samples=2, steps=3)
    assert len(items) == 5 and {tuple(i) for i in items} == {("x_in", "c_noise", "class_labels")}
    assert all(i["x_in"].shape == (4, *digits.sample_shape) for i in items)          # guidance: 2 x 2 rows
    assert all((i["class_labels"][:2] == digits.null_label).all() for i in items)     # the unconditional half
    sig = sorted(float(i["c_noise"][0]) for i in items)
    assert sig[0] < -1 and sig[-1] > 1                                                # sigma 0.002 .. 80

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again although the blob is cached")
    monkeypatch.setattr(calmod, "calibration_inputs", no_calibration)
    again = edmrt.Sampler(digits, backend="openvino-int8")
    assert torch.equal(again.sample(seeds, cond=labels), got)
    assert again.backend.compile_log[-1][-1] == "cache"


@needs_nncf
def test_int8_blob_key_follows_the_calibration(onnx_path, digits, gen, cache):
    """Given arrays are keyed by their sha256: other calibration data, another blob."""
    x, c, cond = _inputs(digits, 3, gen)
    outs = []
    for seed in (0, 0, 1):
        be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond, precision="int8",
                             calibration=_calibration(digits, seed=seed))
        out = torch.empty_like(x)
        be(x, c, cond, out)
        outs.append((be.compile_log[-1][-1], out))
    assert [o[0] for o in outs] == ["compiled", "cache", "compiled"]
    assert torch.equal(outs[0][1], outs[1][1])


BAD_CALIBRATION = [
    (dict(), "precision 'int8' needs calibration inputs"),
    (dict(calibration=[]), "calibration must be a non-empty sequence"),
    (dict(calibration={"x_in": 1}), "calibration must be a non-empty sequence"),
    (dict(calibration=lambda: []), "a callable calibration needs calibration_key"),
    (dict(calibration="nope"), "non-empty sequence"),
]


@needs_nncf
@pytest.mark.parametrize("kwargs,match", BAD_CALIBRATION, ids=[m for _, m in BAD_CALIBRATION])
def test_int8_refuses_missing_or_malformed_calibration(onnx_path, digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        OpenVinoBackend(onnx_path, cond_inputs=digits.cond, precision="int8", **kwargs)


@needs_nncf
@pytest.mark.parametrize("change,match", [
    (lambda i: i.pop("class_labels"), r"must have the inputs \['c_noise', 'class_labels', 'x_in'\]"),
    (lambda i: i.update(x_in=i["x_in"][:, :, :5]), r"calibration\[0\]\['x_in'\] must be float32 of shape"),
    (lambda i: i.update(c_noise=i["c_noise"][:2]), r"calibration\[0\]\['c_noise'\] must be float32 of shape \(3,\)"),
    (lambda i: i.update(class_labels=i["class_labels"].int()), r"\['class_labels'\] must be int64"),
    (lambda i: i["x_in"].view(-1).__setitem__(7, float("nan")), r"\['x_in'\] must be finite"),
    (lambda i: i.update(x_in=i["x_in"].double()), r"\['x_in'\] must be float32"),
])
def test_int8_calibration_items_are_checked_by_name(onnx_path, digits, change, match):
    items = _calibration(digits)
    change(items[0])
    with pytest.raises(ValueError, match=match):
        OpenVinoBackend(onnx_path, cond_inputs=digits.cond, precision="int8", calibration=items)


@needs_nncf
def test_int8_options_where_they_do_not_belong(onnx_path, digits, monkeypatch):
    with pytest.raises(ValueError, match="calibration is for precision 'int8'"):
        OpenVinoBackend(onnx_path, cond_inputs=digits.cond, calibration=_calibration(digits))
    with pytest.raises(ValueError, match="given arrays are hashed"):
        OpenVinoBackend(onnx_path, cond_inputs=digits.cond, precision="int8", calibration=_calibration(digits),
                        calibration_key="mine")
    monkeypatch.setattr(ovmod, "cpu_capabilities", lambda core=None: ["FP32", "BF16"])
    with pytest.raises(ValueError, match="int8"):
        OpenVinoBackend(onnx_path, cond_inputs=digits.cond, precision="int8", calibration=_calibration(digits))


def test_int8_without_nncf_says_how_to_install_it(onnx_path, digits, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nncf", None)   # import nncf raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'edmrt\[openvino\]'"):
        OpenVinoBackend(onnx_path, cond_inputs=digits.cond, precision="int8", calibration=_calibration(digits))


def test_int8_needs_real_inputs_it_cannot_make_up():
    """A model with text embeddings: the trajectories need them, so the named backend refuses and says how to
    give them; calibration_inputs with cond records them."""
    from edmrt.model import CondInput

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
            self.proj = torch.nn.Linear(5, 2)

        def forward(self, x, c_noise, emb):
            return self.conv(x) + self.proj(emb.mean(1))[:, :, None, None] + c_noise.reshape(-1, 1, 1, 1)

    model = edmrt.Model(Net(), sample_shape=(2, 4, 4), cond=(CondInput("emb", (3, 5)),))
    with pytest.raises(ValueError, match=r"cannot make up \(\['emb'\]\).*calibration_inputs\(model, cond=\.\.\.\)"):
        resolve_backend("openvino-int8", model, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"the model takes \['emb'\]: pass cond="):
        calmod.calibration_inputs(model, samples=2, steps=2)
    items = calmod.calibration_inputs(model, samples=2, steps=2, cond={"emb": torch.randn(2, 3, 5)})
    assert len(items) == 3 and items[0]["emb"].shape == (2, 3, 5)


def test_blob_cache_is_bounded_least_recently_used_first(onnx_path, digits, gen, tmp_path, monkeypatch):
    """After each write the blobs over EDMRT_OPENVINO_CACHE_GB go, least recently used first (a hit counts as a
    use), never the one just written, each with its manifest; links and foreign files are left alone."""
    import os

    monkeypatch.setenv("EDMRT_CACHE", str(tmp_path))
    root = ovmod.openvino_cache_root()
    sizes = {}
    for B in (1, 2):
        be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond, hint="latency")
        x, c, cond = _inputs(digits, B, gen)
        be(x, c, cond, torch.empty_like(x))
        (blob,) = set(root.glob("*.blob")) - set(sizes)
        sizes[blob] = blob.stat().st_size
    first, second = sizes
    os.utime(first, (1_000_000, 1_000_000))
    os.utime(second, (2_000_000, 2_000_000))
    # A hit on the older blob makes it the recent one.
    be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond, hint="latency")
    x, c, cond = _inputs(digits, 1, gen)
    be(x, c, cond, torch.empty_like(x))
    assert be.compile_log[-1][-1] == "cache" and first.stat().st_mtime > second.stat().st_mtime
    (root / "notes.txt").write_text("not the cache's")
    (root / "zz.blob").symlink_to(tmp_path / "notes-target")
    # Room for two blobs: writing a third removes the least recently used one, `second` (the link and the foreign
    # file stay).
    monkeypatch.setenv("EDMRT_OPENVINO_CACHE_GB", str(max(sizes.values()) * 2.5 / 2**30))
    be = OpenVinoBackend(onnx_path, cond_inputs=digits.cond, hint="latency")
    x, c, cond = _inputs(digits, 3, gen)
    be(x, c, cond, torch.empty_like(x))
    left = {p for p in root.glob("*.blob") if not p.is_symlink()}
    assert len(left) == 2 and first in left and second not in left
    assert {p.name for p in root.glob("*.manifest.json")} == {f"{p.stem}.manifest.json" for p in left}
    assert (root / "notes.txt").exists() and (root / "zz.blob").is_symlink()
    monkeypatch.setenv("EDMRT_OPENVINO_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="EDMRT_OPENVINO_CACHE_GB must be a number of gigabytes >= 0, got 'lots'"):
        OpenVinoBackend(onnx_path, cond_inputs=digits.cond)
