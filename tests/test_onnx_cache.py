"""The ONNX cache and the exporter's writes: a tampered entry is rebuilt or refused, never used; a link at the target
is replaced, never written through; a file records its weights, and `edmrt sample --onnx` checks them."""
import json
import logging
import os

import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter's translator) is not installed")

import onnx  # noqa: E402

import edmrt  # noqa: E402
from edmrt import Model  # noqa: E402
from edmrt.backends.onnx_cache import (cached_onnx, onnx_cache_fields, onnx_cache_path,  # noqa: E402
                                       onnx_manifest_path)
from edmrt.backends.cachefile import sha256_file  # noqa: E402
from edmrt.onnx_contract import load_onnx_session, weights_sha256  # noqa: E402
from edmrt.export import ExportVerificationError, export_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


class Small(torch.nn.Module):
    """A one-conv network: the dynamo exporter takes ~1 s for it (the tiny UNet ~7 s)."""

    sample_shape = (2, 4, 4)

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x_in, c_noise, class_labels=None):
        return self.conv(x_in) * c_noise.view(-1, 1, 1, 1).exp()


def _model(seed: int, name: str | None = None) -> Model:
    return Model(Small(seed).eval(), edmrt.EDMPrecond(), sample_shape=Small.sample_shape, num_classes=0,
                 metadata={"name": name} if name else {})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDMRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def _max_err(path, net) -> float:
    """max |F_onnx - F_torch| of the file at ``path`` against ``net`` on fixed random inputs."""
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, generator=gen)
    session = load_onnx_session(path, providers=["CPUExecutionProvider"])
    got = session.run(["F"], {"x_in": x.numpy(), "c_noise": c.numpy()})[0]
    with torch.no_grad():
        return float((torch.from_numpy(got) - net(x, c)).abs().max())


def _meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _assert_intact(model, path) -> None:
    """The entry at ``path`` is a regular file recorded by its manifest, holds ``model``'s network, and is now
    used as it is (a session comes back, nothing is exported)."""
    assert path.is_file() and not path.is_symlink()
    m = json.loads(onnx_manifest_path(path).read_text())
    assert m["files"] == {path.name: sha256_file(path)}
    assert _max_err(path, model.network) <= 1e-5
    again, session = cached_onnx(model, CPU)
    assert again == path and session is not None


def test_cache_entry_has_a_manifest_and_its_weights(cache):
    model = _model(0, name="small")
    path, session = cached_onnx(model, CPU)
    assert session is None and path == onnx_cache_path(model) and path.parent == cache  # exported now
    m = json.loads(onnx_manifest_path(path).read_text())
    assert {k: m[k] for k in onnx_cache_fields(model)} == onnx_cache_fields(model)
    assert m["weights_sha256"] == weights_sha256(model.network)
    meta = _meta(path)
    assert meta["edmrt.model"] == "small" and meta["edmrt.weights_sha256"] == weights_sha256(model.network)
    stamp = path.stat().st_mtime_ns
    _assert_intact(model, path)
    assert path.stat().st_mtime_ns == stamp
    # Another network (other weights): another key.  A model without a name: no edmrt.model, the weights still.
    other = _model(1)
    assert onnx_cache_path(other) != path
    other_path, _ = cached_onnx(other, CPU)
    assert "edmrt.model" not in _meta(other_path)
    assert _meta(other_path)["edmrt.weights_sha256"] == weights_sha256(other.network)


def _flip_a_weight_bit(path) -> None:
    data = bytearray(path.read_bytes())
    weight = max(onnx.load(str(path)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    assert weight and data.count(weight) == 1
    data[data.find(weight) + 3] ^= 0x01  # an exponent bit of the first weight: scaled by 4 or 1/4
    path.write_bytes(bytes(data))


def _other_models_entry(path, cache, forge_manifest: bool) -> None:
    """Copy another model's cached file into ``path``'s slot; with ``forge_manifest``, also its manifest with every
    field made ours but the file's own sha256 (so only the file's edmrt.weights_sha256 gives it away)."""
    other_path, _ = cached_onnx(_model(1, name="teacher"), CPU)
    path.write_bytes(other_path.read_bytes())
    if forge_manifest:
        manifest = onnx_manifest_path(path)
        m = json.loads(manifest.read_text())
        m["files"] = {path.name: sha256_file(path)}
        manifest.write_text(json.dumps(m))


def _edit_manifest(path, **changes) -> None:
    manifest = onnx_manifest_path(path)
    m = json.loads(manifest.read_text())
    m.update(changes)
    manifest.write_text(json.dumps(m))


TAMPERINGS = {
    "another model's file": (lambda p, c: _other_models_entry(p, c, False), "sha256"),
    "another model's file, manifest forged": (lambda p, c: _other_models_entry(p, c, True), "holds the weights"),
    "one bit flipped": (lambda p, c: _flip_a_weight_bit(p), "sha256"),
    "truncated": (lambda p, c: p.write_bytes(p.read_bytes()[:100]), "sha256"),
    "empty file": (lambda p, c: p.write_bytes(b""), "sha256"),
    "manifest: a field edited": (lambda p, c: _edit_manifest(p, torch="0.0"), "manifest field 'torch'"),
    "manifest: the sha256 edited": (lambda p, c: _edit_manifest(p, files={p.name: "0" * 64}), "sha256"),
    "manifest: not JSON": (lambda p, c: onnx_manifest_path(p).write_text("{"), "manifest unreadable"),
    "manifest removed": (lambda p, c: onnx_manifest_path(p).unlink(), "manifest.json is missing"),
    "file removed": (lambda p, c: p.unlink(), "is missing or not a regular file"),
    "empty directory": (lambda p, c: (p.unlink(), p.mkdir()), "is missing or not a regular file"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERINGS))
def test_a_tampered_entry_is_rebuilt_never_used(cache, caplog, tamper):
    model = _model(0, name="student")
    path, _ = cached_onnx(model, CPU)
    change, reason = TAMPERINGS[tamper]
    change(path, cache)
    with caplog.at_level(logging.WARNING, logger="edmrt.backends"):
        again, session = cached_onnx(model, CPU)
    assert again == path and session is None, f"{tamper}: the entry was used, not exported again"
    warned = [r.getMessage() for r in caplog.records if "not usable" in r.getMessage()]
    assert warned and reason in warned[0], warned
    _assert_intact(model, path)


def test_a_tampered_entry_samples_like_torch(cache):
    """The finding, end to end: another model's file in the slot was used (samples off by O(1)); a flipped weight
    bit too; now both are exported again and sample like torch, within 1e-5."""
    model = _model(0, name="student")
    want = edmrt.Sampler(model, solver="euler", steps=3, backend="torch").sample(range(4))
    path, _ = cached_onnx(model, CPU)
    for tamper in (lambda: _other_models_entry(path, cache, forge_manifest=False), lambda: _flip_a_weight_bit(path)):
        tamper()
        got = edmrt.Sampler(model, solver="euler", steps=3, backend="onnxruntime").sample(range(4))
        assert float((got - want).abs().max()) <= 1e-5


def test_a_symlink_in_the_cache_is_replaced_and_its_target_never_written(cache, tmp_path):
    model = _model(0)
    path, _ = cached_onnx(model, CPU)
    good = path.read_bytes()
    for target_bytes in (b"precious: not an ONNX file\n", good):  # a foreign file, and a link to a valid copy
        victim = tmp_path / "victim.bin"
        victim.write_bytes(target_bytes)
        path.unlink()
        path.symlink_to(victim)
        assert cached_onnx(model, CPU)[1] is None, "a symbolic link was trusted"
        assert victim.read_bytes() == target_bytes, "the link's target was written"
        _assert_intact(model, path)
    # The manifest's name, too.
    manifest = onnx_manifest_path(path)
    victim.write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(victim)
    stamp = victim.read_bytes()
    assert cached_onnx(model, CPU)[1] is None
    assert victim.read_bytes() == stamp and not manifest.is_symlink()
    _assert_intact(model, path)


def test_a_non_empty_directory_in_the_cache_is_refused_not_deleted(cache):
    model = _model(0)
    path = onnx_cache_path(model)
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty directory"):
        cached_onnx(model, CPU)
    assert (path / "keep.txt").read_text() == "mine"


def test_export_replaces_a_symlink_at_the_target_never_writes_through(tmp_path, caplog):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "out" / "net.onnx"
    target.parent.mkdir()
    target.symlink_to(victim)
    net = Small(0)
    with caplog.at_level(logging.WARNING, logger="edmrt.export"):
        r = export_onnx(net, target)
    assert victim.read_text() == "precious\n"
    assert target.is_file() and not target.is_symlink()
    assert any("symbolic link" in rec.getMessage() for rec in caplog.records)
    assert r.files == {"net.onnx": sha256_file(target)}
    assert _meta(target)["edmrt.weights_sha256"] == weights_sha256(net)
    assert sorted(os.listdir(target.parent)) == ["net.onnx"]  # no staging folder left


def test_export_refuses_a_directory_at_the_target(tmp_path):
    (tmp_path / "net.onnx").mkdir()
    with pytest.raises(ValueError, match="path .*net.onnx.* is a directory"):
        export_onnx(Small(0), tmp_path / "net.onnx")
    assert os.listdir(tmp_path / "net.onnx") == [] and os.listdir(tmp_path) == ["net.onnx"]


def test_a_failed_export_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    from edmrt.export import onnx as onnx_mod

    path = tmp_path / "net.onnx"
    export_onnx(Small(0), path)
    old = path.read_bytes()
    monkeypatch.setitem(onnx_mod.TOLERANCE, "fp32", -1.0)
    with pytest.raises(ExportVerificationError, match="nothing written to"):
        export_onnx(Small(1), path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["net.onnx"]  # no staging folder, no half-written file
    with pytest.raises(ExportVerificationError):
        export_onnx(Small(1), tmp_path / "new.onnx")
    assert os.listdir(tmp_path) == ["net.onnx"]


def test_sample_onnx_checks_the_files_weights(cache, tmp_path, caplog):
    """`edmrt sample --onnx FILE` (cli.sample.onnx_backend): a cache file names its model and weights; another
    model's file is refused by name, by weights when the name is gone or forged; a file without a weights hash (an
    older export) is run with a warning, as before."""
    from edmrt.cli.sample import onnx_backend

    teacher, student = _model(0, name="teacher"), _model(1, name="student")
    path, _ = cached_onnx(teacher, CPU)
    assert onnx_backend(str(path), "teacher", teacher).conditional is False
    with pytest.raises(ValueError, match="holds the network of 'teacher', not of --model 'student'"):
        onnx_backend(str(path), "student", student)

    def with_meta(name, **entries):
        m = onnx.load(str(path))
        kept = {p.key: p.value for p in m.metadata_props}
        del m.metadata_props[:]
        for k, v in {**kept, **entries}.items():
            if v is not None:
                m.metadata_props.add(key=k, value=v)
        onnx.save(m, str(tmp_path / name))
        return str(tmp_path / name)

    for file in (with_meta("anonymous.onnx", **{"edmrt.model": None}),
                 with_meta("forged.onnx", **{"edmrt.model": "student"})):
        with pytest.raises(ValueError, match="holds other weights than --model 'student'"):
            onnx_backend(file, "student", student)
    old = with_meta("old.onnx", **{"edmrt.model": None, "edmrt.weights_sha256": None})
    with caplog.at_level(logging.WARNING, logger="edmrt"):
        onnx_backend(old, "student", student)
    assert any("not checked" in r.getMessage() for r in caplog.records)


# --- Conditioning inputs in the key, the manifest and the checks; external data ------------------------------------

class TextNet(torch.nn.Module):
    """net(x_in, c_noise, encoder_hidden_states=(B, L, 7)) -> F; any L (the same weights serve (5, 7) and (6, 7))."""

    sample_shape = (2, 4, 4)

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.text = torch.nn.Linear(7, 64)   # 1.8 KB: over the 1 KiB threshold of the external data file
        self.out = torch.nn.Linear(64, 2)

    def forward(self, x_in, c_noise, encoder_hidden_states=None):
        h = self.conv(x_in) * c_noise.view(-1, 1, 1, 1).exp()
        return h + self.out(torch.tanh(self.text(encoder_hidden_states))).mean(1).view(-1, 2, 1, 1)


def _text_model(shape=(5, 7), net=None, **kw) -> Model:
    return Model(net if net is not None else TextNet().eval(), edmrt.EDMPrecond(), sample_shape=TextNet.sample_shape,
                 cond=(edmrt.CondInput("encoder_hidden_states", shape, **kw),))


def test_the_key_changes_with_the_cond_inputs(cache):
    net = TextNet().eval()
    base = _text_model((5, 7), net)
    paths = {onnx_cache_path(m) for m in (base, _text_model((6, 7), net), _text_model((5, 7), net, null=0.0),
                                          _text_model((5, 7), net, dtype=torch.float16), _model(0))}
    assert len(paths) == 5
    assert onnx_cache_path(_text_model((5, 7), net)) == onnx_cache_path(base)
    assert onnx_cache_fields(base)["cond"] == [{"name": "encoder_hidden_states", "shape": [5, 7], "dtype": "float32",
                                                "null": None, "num_classes": 0}]


def test_a_cached_entry_with_cond_inputs_is_exported_with_them_and_checked(cache, caplog):
    net = TextNet().eval()
    model = _text_model((5, 7), net)
    path, session = cached_onnx(model, CPU)
    assert session is None and json.loads(_meta(path)["edmrt.cond"]) == [c.to_dict() for c in model.cond]
    m = json.loads(onnx_manifest_path(path).read_text())
    assert m["cond"] == [c.to_dict() for c in model.cond]
    again, session = cached_onnx(model, CPU)
    assert again == path and [(i.name, i.shape) for i in session.get_inputs()][2:] == [
        ("encoder_hidden_states", ["batch", 5, 7])]
    # The same weights declared with another sequence length: another key; and a (5, 7) file forged into its slot
    # (manifest and sha256 made to fit, the weights the same) is refused by its inputs and exported again.
    longer = _text_model((6, 7), net)
    slot = onnx_cache_path(longer)
    assert slot != path
    slot.write_bytes(path.read_bytes())
    forged = dict(onnx_cache_fields(longer), files={slot.name: sha256_file(slot)})
    onnx_manifest_path(slot).write_text(json.dumps(forged))
    with caplog.at_level(logging.WARNING, logger="edmrt.backends"):
        got, session = cached_onnx(longer, CPU)
    assert got == slot and session is None
    warned = [r.getMessage() for r in caplog.records if "not usable" in r.getMessage()]
    assert warned and "'encoder_hidden_states'" in warned[0] and "shape" in warned[0], warned
    assert cached_onnx(longer, CPU)[1].get_inputs()[2].shape == ["batch", 6, 7]


def test_a_cached_entry_with_external_data(cache, monkeypatch, gen):
    """A network over the size threshold (lowered here) is cached as the model plus its data file: both recorded in
    the manifest and checked; a damaged data file makes the entry be exported again."""
    from edmrt.export import onnx as onnx_mod

    monkeypatch.setattr(onnx_mod, "EXTERNAL_DATA_BYTES", 0)
    model = _text_model((5, 7))
    path, _ = cached_onnx(model, CPU)
    files = json.loads(onnx_manifest_path(path).read_text())["files"]
    data = [n for n in files if n != path.name]
    assert len(data) == 1 and (path.parent / data[0]).is_file()
    assert files == {n: sha256_file(path.parent / n) for n in files}
    again, session = cached_onnx(model, CPU)
    assert again == path and session is not None
    x, c, e = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, generator=gen), torch.randn(3, 5, 7, generator=gen)
    got = session.run(["F"], {"x_in": x.numpy(), "c_noise": c.numpy(), "encoder_hidden_states": e.numpy()})[0]
    with torch.no_grad():
        assert float((torch.from_numpy(got) - model.network(x, c, encoder_hidden_states=e)).abs().max()) <= 1e-5
    blob = bytearray((path.parent / data[0]).read_bytes())
    blob[5] ^= 0x40
    (path.parent / data[0]).write_bytes(bytes(blob))
    assert cached_onnx(model, CPU)[1] is None  # exported again
    files = json.loads(onnx_manifest_path(path).read_text())["files"]
    assert sorted(os.listdir(cache)) == sorted([*files, onnx_manifest_path(path).name])  # the old data file is gone
    assert cached_onnx(model, CPU)[1] is not None
