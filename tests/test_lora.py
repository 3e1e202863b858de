"""LoRA / DoRA adapters (edmrt.adapters.lora) against peft 0.21 and diffusers 0.42.1 themselves, on tiny networks.

Reference: peft's own model (``get_peft_model`` on a fresh copy of the base, the same adapter weights) after
``merge_and_unload`` (one adapter) or ``add_weighted_adapter`` + ``merge_and_unload`` (several).  Fused weights and
network outputs are compared at RTOL = 1e-6 relative to the largest |reference| (the same float32 operations in
the same order give 0 in practice).  Unfusing restores the base bit for bit (``torch.equal``).
"""
import copy
import math

import edmrt
import pytest
import torch

peft = pytest.importorskip("peft", reason="peft (the diffusers extra) is not installed")
diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
from edmrt.adapters.diffusers import from_diffusers
from edmrt.adapters.lora import AdapterSet, load_adapter
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning",
                                        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

RTOL = 1e-6
TOKENS = 7
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"]


def _rel(x, ref) -> float:
    return (x.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-30)


def _unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2).eval().requires_grad_(False)


def _peft_adapter(base, seed, dora=False, r=4, alpha=8, targets=TARGETS):
    """A peft model on a copy of ``base`` with random non-zero A and B (init_lora_weights=False)."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_dora=dora)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # larger B so that the adapters visibly change the output
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    return pm.eval()


def _save(pm, folder):
    pm.save_pretrained(str(folder))  # adapter "default": adapter_config.json + adapter_model.safetensors
    return folder


def _run_unet(unet, x, t, e):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=e, return_dict=False)[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base = _unet()
    a, b, d = _peft_adapter(base, 1), _peft_adapter(base, 2), _peft_adapter(base, 3, dora=True)
    folders = {k: _save(pm, tmp / k) for k, pm in (("a", a), ("b", b), ("d", d))}
    torch.manual_seed(5)
    inputs = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, TOKENS, 32)
    return base, {"a": a, "b": b, "d": d}, folders, inputs


def _model(unet):
    return from_diffusers(unet, {"_class_name": "EulerDiscreteScheduler"},
                          cond_shapes={"encoder_hidden_states": (TOKENS, 32)})


def _loaded(setup, names=("a", "b", "d")):
    base, _, folders, _ = setup
    model = _model(copy.deepcopy(base))
    for n in names:
        aset = load_adapter(model, folders[n], n)
    return model, aset


@pytest.mark.parametrize("name", ["a", "d"])
def test_fused_equals_peft_merge_and_unload(setup, name):
    base, pms, _, (x, t, e) = setup
    model, aset = _loaded(setup)
    assert model.adapters is aset and aset.names == ["a", "b", "d"]
    ref = copy.deepcopy(pms[name]).merge_and_unload()
    ref_params = dict(ref.named_parameters())
    fused = aset.fused_weights({name: 1.0})
    assert set(fused) == set(aset.targets) and all(n.startswith("unet.") for n in fused)
    err = max(_rel(v, ref_params[n.removeprefix("unet.")]) for n, v in fused.items())
    assert err <= RTOL, err
    aset.apply({name: 1.0})
    out, want = _run_unet(model.network.unet, x, t, e), _run_unet(ref, x, t, e)
    assert _rel(out, want) <= RTOL
    assert _rel(_run_unet(base, x, t, e), want) > 1e-2  # the adapter does change the output
    # peft's unmerged forward (LoRA / DoRA layers) agrees too, to float32 rounding through the UNet (W x + s B(A x)
    # against (W + s B A) x; measured 1.2e-5 with peft 0.21.2, torch 2.13)
    assert _rel(out, _run_unet(pms[name], x, t, e)) <= 5e-5


@pytest.mark.parametrize("combination,kw", [("linear", {}), ("ties", {"density": 0.5}),
                                            ("magnitude_prune", {"density": 0.5}),
                                            ("dare_linear", {"density": 0.7}), ("dare_ties", {"density": 0.7}),
                                            ("cat", {})])
def test_weighted_merge_equals_peft(setup, combination, kw):
    base, _, folders, _ = setup
    _, aset = _loaded(setup, ("a", "b"))
    weights = {"a": 0.7, "b": -0.4}
    # peft's reference: both adapters on one peft model, add_weighted_adapter, then merge.
    ref = _peft_adapter(base, 1)
    ref.load_adapter(str(folders["b"]), adapter_name="b")
    random = combination.startswith("dare")
    if random:
        torch.manual_seed(123)
    ref.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination, **kw)
    ref.set_adapter("mix")
    for n in ["default", "b"]:
        ref.delete_adapter(n)
    ref_params = {n.removeprefix("base_model.model."): p for n, p in ref.merge_and_unload().named_parameters()}
    fused = aset.fused_weights(weights, combination, seed=123 if random else None, **kw)
    err = max(_rel(v, ref_params[n.removeprefix("unet.")]) for n, v in fused.items())
    assert err <= RTOL, (combination, err)
    if random:  # another seed draws other masks
        other = aset.fused_weights(weights, combination, seed=124, **kw)
        assert any(not torch.equal(other[n], fused[n]) for n in fused)


def test_unfuse_restores_base_bit_for_bit(setup):
    base, _, _, (x, t, e) = setup
    model, aset = _loaded(setup)
    before = {n: p.detach().clone() for n, p in model.network.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in model.network.named_parameters()}
    for w in ({"a": 1.0}, {"d": 0.5}, {"a": 0.3, "b": 0.9}, {"a": 1.0, "d": 1.0}):
        aset.apply(w)
        assert any(not torch.equal(before[n], p) for n, p in model.network.named_parameters())
    aset.restore()
    assert all(torch.equal(before[n], p) for n, p in model.network.named_parameters())
    assert ptrs == {n: p.data_ptr() for n, p in model.network.named_parameters()}
    assert torch.equal(_run_unet(model.network.unet, x, t, e), _run_unet(base, x, t, e))


@pytest.mark.parametrize("layout", ["diffusers", "peft-keys"])
def test_diffusers_format_lora(setup, tmp_path, layout):
    """A LoRA as diffusers' training scripts save it (train_text_to_image_lora.py: attention LoRA, the injected
    UNet's peft state dict in diffusers' naming via convert_state_dict_to_diffusers, under "unet."), or the peft
    keys as they are (all layers); loaded by diffusers' own conversion."""
    base, pms, _, (x, t, e) = setup
    from diffusers.utils import convert_state_dict_to_diffusers

    pm = _peft_adapter(base, 4, targets=["to_q", "to_k", "to_v", "to_out.0"]) if layout == "diffusers" else pms["a"]
    peft_sd = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(pm).items()}
    sd = convert_state_dict_to_diffusers(peft_sd) if layout == "diffusers" else peft_sd
    assert (any(".lora.down." in k for k in sd)) == (layout == "diffusers")
    # the adapter's LoraConfig (lora_alpha) as the file's metadata: without it diffusers takes lora_alpha = r
    meta = pm.peft_config["default"].to_dict()
    diffusers.StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=sd, safe_serialization=True,
                                                         unet_lora_adapter_metadata=meta)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["pytorch_lora_weights.safetensors"]
    model = _model(copy.deepcopy(base))
    aset = load_adapter(model, tmp_path / files[0], "style")
    assert len(aset.targets) == sum(1 for k in sd if ".lora_B." in k or ".lora.up." in k)
    ref = copy.deepcopy(pm).merge_and_unload()
    aset.apply({"style": 1.0})
    assert _rel(_run_unet(model.network.unet, x, t, e), _run_unet(ref, x, t, e)) <= RTOL
    # the folder form at weight 0.5 agrees with diffusers' own load_lora_adapter + set_adapters on the UNet (unfused)
    model2 = _model(copy.deepcopy(base))
    load_adapter(model2, tmp_path, "style").apply({"style": 0.5})
    direct = copy.deepcopy(base)
    direct.load_lora_adapter(str(tmp_path), weight_name=files[0], prefix="unet", adapter_name="style",
                             use_safetensors=True)
    direct.set_adapters(["style"], [0.5])
    assert _rel(_run_unet(model2.network.unet, x, t, e), _run_unet(direct, x, t, e)) <= 1e-5


def test_edmunet_lora(tmp_path):
    from edmrt.models.unet import EDMUNet

    torch.manual_seed(0)
    net = EDMUNet(img_resolution=8, img_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                  attn_resolutions=(4,), num_classes=3).eval().requires_grad_(False)
    targets = ["conv0", "conv1", "qkv", "proj", "affine", "map_layer1"]
    for dora in (False, True):
        pm = _peft_adapter(net, 7, dora=dora, targets=targets)
        folder = _save(pm, tmp_path / f"edm{int(dora)}")
        live = copy.deepcopy(net)
        model = edmrt.Model(live, num_classes=3, sample_shape=(3, 8, 8))
        aset = load_adapter(model, folder, "x")
        assert aset.prefix == "" and any(n.endswith("qkv.weight") for n in aset.targets)
        aset.apply({"x": 1.0})
        ref = copy.deepcopy(pm).merge_and_unload()
        xin, c, lab = torch.randn(2, 3, 8, 8), torch.tensor([0.1, -0.5]), torch.tensor([0, 2])
        with torch.no_grad():
            assert _rel(live(xin, c, lab), ref(xin, c, lab)) <= RTOL
            aset.restore()
            assert torch.equal(live(xin, c, lab), net(xin, c, lab))


def test_sampler_set_adapters(setup):
    base, _, _, _ = setup
    model, aset = _loaded(setup)
    s = edmrt.Sampler(model, solver="euler", steps=3, backend="torch", device="cpu")
    e = torch.randn(TOKENS, 32)
    kw = dict(cond={"encoder_hidden_states": e}, guidance=2.0, uncond={"encoder_hidden_states": torch.zeros(TOKENS, 32)})
    x0 = s.sample([1, 2], **kw)
    engine = s.engine(2, True)
    ptrs = {n: p.data_ptr() for n, p in model.network.named_parameters()}
    results = {}
    for w, comb in (({"a": 0.8}, "linear"), ({"a": 0.5, "b": 0.5}, "ties"), ({"d": 1.0}, "linear")):
        s.set_adapters(w, comb, **({"density": 0.5} if comb == "ties" else {}))
        assert s.engine(2, True) is engine
        assert ptrs == {n: p.data_ptr() for n, p in model.network.named_parameters()}
        x = s.sample([1, 2], **kw)
        assert not torch.equal(x, x0)
        # a Sampler built fresh on a model with these weights fused
        fresh = copy.deepcopy(base)
        fused = aset.fused_weights(w, comb, **({"density": 0.5} if comb == "ties" else {}))
        with torch.no_grad():
            for n, p in fresh.named_parameters():
                if "unet." + n in fused:
                    p.copy_(fused["unet." + n])
        ref = edmrt.Sampler(_model(fresh), solver="euler", steps=3, backend="torch", device="cpu").sample([1, 2], **kw)
        assert torch.equal(x, ref)
        results[comb + str(sorted(w))] = x
    # back and forth: bit-identical
    s.set_adapters(None)
    assert torch.equal(s.sample([1, 2], **kw), x0)
    s.set_adapters({"a": 0.8})
    assert torch.equal(s.sample([1, 2], **kw), results["linear['a']"])
    s.set_adapters({})
    assert torch.equal(s.sample([1, 2], **kw), x0)
    # bad inputs
    with pytest.raises(ValueError, match="'zzz'"):
        s.set_adapters({"zzz": 1.0})
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            s.set_adapters({"a": bad})
    with pytest.raises(ValueError, match="combination 'blend'"):
        s.set_adapters({"a": 1.0, "b": 1.0}, "blend")
    plain = edmrt.Sampler(_model(copy.deepcopy(base)), solver="euler", steps=3, backend="torch", device="cpu")
    with pytest.raises(ValueError, match="no adapters"):
        plain.set_adapters({"a": 1.0})


def test_an_adapter_swap_is_a_capability_of_the_backend(setup):
    """set_adapters asks the backend, not its name: one that shares the module's weights sees the in-place copy, one
    with update_weights is told, one with neither (a baked-in copy, as OpenVINO's) is refused before any write."""
    model, _ = _loaded(setup)
    torch_backend = edmrt.backends.TorchBackend(model.network, cond_inputs=model.cond)
    told = []

    class Copying:   # holds a copy and is told of every swap
        shares_weights = False

        def __call__(self, x_in, c_noise, cond, out):
            torch_backend(x_in, c_noise, cond, out)

        def update_weights(self, fused):
            told.append(sorted(fused))

    class Baked(Copying):   # holds a copy and cannot take a swap
        update_weights = None

    before = {n: p.detach().clone() for n, p in model.network.named_parameters()}
    s = edmrt.Sampler(model, solver="euler", steps=3, backend=Baked(), device="cpu")
    with pytest.raises(ValueError, match="holds its own copy of the weights"):
        s.set_adapters({"a": 0.8})
    assert all(torch.equal(p, before[n]) for n, p in model.network.named_parameters())
    s = edmrt.Sampler(model, solver="euler", steps=3, backend=Copying(), device="cpu")
    s.set_adapters({"a": 0.8})
    assert len(told) == 1 and told[0] and all(n in dict(model.network.named_parameters()) for n in told[0])
    assert any(not torch.equal(p, before[n]) for n, p in model.network.named_parameters())
    s.set_adapters(None)
    assert all(torch.equal(p, before[n]) for n, p in model.network.named_parameters())
    # The registry's own backends say it themselves.
    assert edmrt.backends.TorchBackend.shares_weights and edmrt.backends.CallableBackend.shares_weights
    assert not edmrt.backends.OpenVinoBackend.shares_weights
    assert not callable(getattr(edmrt.backends.OpenVinoBackend, "update_weights", None))
    assert callable(edmrt.backends.OnnxRuntimeBackend.update_weights)


def test_pickle_refused(setup, tmp_path):
    base, _, folders, _ = setup
    model = _model(copy.deepcopy(base))
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((folders["a"] / "adapter_config.json").read_text())
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="pickled.*safetensors only"):
        load_adapter(model, folder, "p")
    with pytest.raises(ValueError, match="pickled"):
        load_adapter(model, folder / "adapter_model.bin", "p")
    with pytest.raises(ValueError, match="already loaded"):
        load_adapter(model, folders["a"], "a") and load_adapter(model, folders["a"], "a")
    assert isinstance(AdapterSet(model.network), AdapterSet)


def test_copy_and_pickle_drop_adapters(setup):
    import io
    import pickle

    model, aset = _loaded(setup, ("a",))
    net = copy.deepcopy(model.network)  # plain weights, no adapters (the set is bound to the original's tensors)
    assert getattr(net, "_edmrt_adapters", "x") is None
    buf = io.BytesIO()
    pickle.dump(model.network, buf)
    assert pickle.loads(buf.getvalue())._edmrt_adapters is None
    assert model.network._edmrt_adapters is aset


def test_ties_merge_fused_exported_then_swapped_live_in_onnx_runtime(setup, tmp_path, monkeypatch):
    """Two adapters merged with TIES, fused, the network exported to ONNX with the adapters' targets as weight
    inputs; a swap to a third adapter reaches the live session (same session, same binding) and equals a fresh
    export of that adapter fused in."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    monkeypatch.setenv("EDMRT_CACHE", str(tmp_path / "cache"))
    base, _, _, _ = setup
    model, aset = _loaded(setup)
    kw = dict(cond={"encoder_hidden_states": torch.randn(TOKENS, 32)})
    s = edmrt.Sampler(model, solver="euler", steps=3, backend="onnxruntime", device="cpu")
    s.set_adapters({"a": 0.7, "b": 0.5}, "ties", density=0.5)
    session, merged = s.backend.session, s.sample([1, 2], **kw)
    ref = edmrt.Sampler(model, solver="euler", steps=3, backend="torch", device="cpu").sample([1, 2], **kw)
    assert _rel(merged, ref) <= 1e-5
    s.set_adapters({"d": 1.0})  # a third adapter (DoRA), swapped into the live session
    swapped = s.sample([1, 2], **kw)
    assert s.backend.session is session and s.backend.cached_bindings == 1
    fresh_net, fused = copy.deepcopy(base), aset.fused_weights({"d": 1.0})
    with torch.no_grad():
        for n, p in fresh_net.named_parameters():
            if "unet." + n in fused:
                p.copy_(fused["unet." + n])
    fresh = edmrt.Sampler(_model(fresh_net), solver="euler", steps=3, backend="onnxruntime", device="cpu")
    assert _rel(swapped, fresh.sample([1, 2], **kw)) <= 1e-5
    assert _rel(swapped, merged) > 1e-3  # the swap changed the output
