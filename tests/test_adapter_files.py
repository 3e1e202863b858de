"""Adapter files tried with bad input as a new user would (``load_adapter``, ``edmrt.load(..., adapters=)``, the
CLI's ``--adapter``): every case is refused with an error that names the file, the key and what was expected,
before anything is allocated or fused; nothing is silently dropped, cast or truncated.

The adapters are copies of the bundled ``digits-cd-lora`` (a rank-8 DoRA on the digits teacher) with their edmrt card
removed (plain adapters), then damaged one way each.
"""
import json
import shutil
import struct

import pytest
import torch

import edmrt

peft = pytest.importorskip("peft", reason="peft (the adapters extra) is not installed")

from safetensors.torch import load_file, save_file  # noqa: E402

from edmrt.adapters.lora import MAX_RANK, load_adapter  # noqa: E402
from edmrt.cli import main  # noqa: E402
from edmrt.models.bundled import WEIGHTS_DIR  # noqa: E402

SOURCE = WEIGHTS_DIR / "digits-cd-lora"


def _copy(dst):
    """A plain copy of the bundled adapter (no edmrt card) at ``dst``."""
    shutil.copytree(SOURCE, dst)
    (dst / "edmrt.json").unlink()
    return dst


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _rewrite(folder, state):
    save_file(state, str(folder / "adapter_model.safetensors"))


def _config(folder, **fields):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


@pytest.fixture
def digits():
    return edmrt.load("digits")


def test_a_good_copy_loads(tmp_path, digits):
    aset = load_adapter(digits, _copy(tmp_path / "style"), "style")
    assert aset.names == ["style"] and aset.sources["style"] == str((tmp_path / "style").resolve())


def test_two_adapters_of_one_name_are_refused_not_dropped(tmp_path):
    """a/style and b/style passed together: both would be named 'style'; the second was silently the first."""
    a, b = _copy(tmp_path / "a" / "style"), _copy(tmp_path / "b" / "style")
    state = _weights(b)
    _rewrite(b, {k: v * 2 for k, v in state.items()})
    with pytest.raises(ValueError, match=r"would both be named 'style'"):
        edmrt.load("digits", adapters={str(a): 1.0, str(b): 1.0})
    model = edmrt.load("digits", adapters={str(a): 1.0})
    with pytest.raises(ValueError, match=r"already loaded from .*a/style"):
        from edmrt.loading import with_adapters

        with_adapters(model, {str(b): 1.0})
    out = tmp_path / "grid.png"
    code = main(["sample", "--model", "digits", "--adapter", str(a), "--adapter", str(b), "--steps", "2", "-o",
                 str(out)])
    assert code == 2 and not out.exists()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_weights_that_are_not_real_floating_point_are_refused(tmp_path, digits, dtype):
    folder = _copy(tmp_path / "bad")
    state = _weights(folder)
    key = "conv_in.lora_A.weight"
    state[key] = state[key].to(dtype) if dtype != torch.complex64 else torch.complex(state[key], state[key])
    _rewrite(folder, state)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors.*{key}.*(real floating point|dtype 'C64', "
                                         "which edmrt does not read)"):
        load_adapter(digits, folder, "bad")


def test_nan_weights_are_refused(tmp_path, digits):
    folder = _copy(tmp_path / "bad")
    state = _weights(folder)
    state["conv_out.lora_B.weight"][0] = float("nan")
    _rewrite(folder, state)
    with pytest.raises(ValueError, match=r"conv_out.lora_B.weight.*NaN or Inf"):
        load_adapter(digits, folder, "bad")


def test_a_key_naming_a_base_weight_is_refused(tmp_path, digits):
    """An extra key that names a base weight (here with the wrong shape) would replace or be ignored: refused."""
    folder = _copy(tmp_path / "bad")
    state = _weights(folder)
    state["conv_in.weight"] = torch.zeros(3, 3)
    _rewrite(folder, state)
    with pytest.raises(ValueError, match=r"'conv_in.weight' is not a LoRA / DoRA weight"):
        load_adapter(digits, folder, "bad")


def test_a_rank_or_shape_that_disagrees_with_the_config_or_the_layer_is_refused_by_key(tmp_path, digits):
    folder = _copy(tmp_path / "rank")
    _config(folder, r=4)   # the tensors have rank 8
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: '[\w.]+lora_[AB].weight' has shape .*; the config "
                                         r"\(rank 4\)"):
        load_adapter(digits, folder, "rank")
    folder = _copy(tmp_path / "shape")
    state = _weights(folder)
    state["conv_in.lora_A.weight"] = torch.zeros(8, 2, 3, 3)   # the layer takes 1 input channel
    _rewrite(folder, state)
    with pytest.raises(ValueError, match=r"'conv_in.lora_A.weight' has shape \[8, 2, 3, 3\].*need \[8, 1\]"):
        load_adapter(digits, folder, "shape")
    folder = _copy(tmp_path / "pattern")
    _config(folder, rank_pattern={"conv_out": 2})
    with pytest.raises(ValueError, match=r"'conv_out.lora_[AB].weight'.*rank 2"):
        load_adapter(digits, folder, "pattern")


def test_absurd_ranks_are_refused_before_any_allocation(tmp_path, digits):
    for fields in ({"r": 10 ** 9}, {"rank_pattern": {"conv_in": 10 ** 9}}):
        folder = _copy(tmp_path / f"big{len(fields)}{list(fields)[0]}")
        _config(folder, **fields)
        with pytest.raises(ValueError, match=rf"{list(fields)[0]} must be .*{MAX_RANK}"):
            load_adapter(digits, folder, "big")


@pytest.mark.parametrize("field,value", [("r", "8"), ("r", 0), ("r", True), ("lora_alpha", "x"),
                                         ("lora_alpha", float("inf")), ("target_modules", 5),
                                         ("target_modules", [1, 2]), ("rank_pattern", ["conv"]),
                                         ("alpha_pattern", {"conv": "a"}), ("use_dora", "yes"),
                                         ("lora_dropout", 1.5), ("bias", "some"), ("modules_to_save", "x"),
                                         ("layers_to_transform", "0"), ("init_lora_weights", 3)])
def test_config_fields_of_the_wrong_type_are_refused_by_name(tmp_path, digits, field, value):
    folder = _copy(tmp_path / "cfg")
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg, allow_nan=True))
    with pytest.raises(ValueError, match=rf"adapter_config.json.*{field} must be"):
        load_adapter(digits, folder, "cfg")


def _damage_header(folder, edit):
    """Rewrite adapter_model.safetensors with its JSON header changed by ``edit`` (the data bytes kept)."""
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _lie_about_a_shape(header):
    header["conv_in.lora_A.weight"]["shape"] = [8, 2, 3, 3]


def _lie_about_an_offset(header):
    begin, end = header["conv_in.lora_A.weight"]["data_offsets"]
    header["conv_in.lora_A.weight"]["data_offsets"] = [begin + 4, end + 4]


@pytest.mark.parametrize("damage,match", [
    ("truncate", r"truncated"),
    ("pickle", r"not safetensors"),
    ("shape", r"'conv_in.lora_A.weight': data_offsets .* needs"),
    ("offset", r"data_offsets"),
    ("header", r"header length"),
])
def test_damaged_safetensors_are_refused_naming_the_file(tmp_path, digits, damage, match):
    folder = _copy(tmp_path / "bad")
    path = folder / "adapter_model.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"conv_in.lora_A.weight": [0.0] * 8}))
    elif damage == "shape":
        _damage_header(folder, _lie_about_a_shape)
    elif damage == "offset":
        _damage_header(folder, _lie_about_an_offset)
    else:
        path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors.*{match}"):
        load_adapter(digits, folder, "bad")


def test_a_state_dict_in_memory_is_checked_too(digits):
    """A diffusers-format state dict given directly: tensors only, real floating point."""
    from test_diffusers import tiny_unet

    model = edmrt.from_diffusers(tiny_unet(), {"_class_name": "EulerDiscreteScheduler"},
                                 cond_shapes={"encoder_hidden_states": (7, 32)})
    with pytest.raises(ValueError, match=r"'unet.x.lora_A.weight' is torch.int64"):
        load_adapter(model, {"unet.x.lora_A.weight": torch.zeros(2, 2, dtype=torch.int64)}, "mem")
