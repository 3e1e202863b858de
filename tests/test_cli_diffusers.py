"""``edmrt sample --model DIR``: a diffusers folder written by ``save_pretrained``, text in (embeddings or a prompt
through the folder's own tokenizer and text encoder), PNGs out."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
transformers = pytest.importorskip("transformers", reason="the diffusers extra is not installed")

from sd_folder import sd_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Stable Diffusion folder: UNet2DConditionModel, AutoencoderKL, Euler scheduler, CLIP text encoder."""
    return sd_folder(tmp_path_factory.mktemp("sd"))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "edmrt.cli", "sample", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_prompt_embeds_file_to_pngs_equal_to_the_api(folder, tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    import edmrt

    path, _ = folder
    emb, neg = torch.randn(8, 16), torch.randn(8, 16)
    save_file({"prompt_embeds": emb, "negative_prompt_embeds": neg}, str(tmp_path / "emb.safetensors"))
    r = _cli("--model", path, "--prompt-embeds", tmp_path / "emb.safetensors", "--seeds", "3-4", "--steps", "3",
             "--solver", "euler", "--guidance", "5", "-o", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote 2 PNGs" in r.stdout
    png = [tmp_path / "out" / f"sample_{s:06d}.png" for s in (3, 4)]
    got = torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(p))).permute(2, 0, 1) for p in png])
    s = edmrt.Sampler(edmrt.load(str(path)), solver="euler", steps=3, backend="auto")
    want = s.sample([3, 4], cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg}, guidance=5.0)
    assert got.shape == want.shape == (2, 3, 16, 16)
    assert (got.int() - want.int()).abs().max().item() <= 1  # ONNX Runtime vs torch: a rounding step at most


def test_a_prompt_goes_through_the_folders_own_text_encoder(folder, tmp_path):
    path, pipe = folder
    r = _cli("--model", path, "--prompt", "a photo of a cat", "--negative-prompt", "dog", "--guidance", "3",
             "--seeds", "0", "--steps", "2", "--solver", "euler", "--backend", "torch", "-o", tmp_path / "o",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "sample_000000.png").stat().st_size > 100


@pytest.mark.parametrize("args,match", [
    ([], "needs --prompt TEXT or --prompt-embeds"),
    (["--prompt", "a", "--prompt-embeds", "x.safetensors"], "not both"),
    (["--prompt-embeds", "missing.safetensors"], "does not exist"), (["--prompt-embeds", "."], "not a file"),
    (["--negative-prompt", "dog", "--prompt-embeds", "x.safetensors"], "goes with --prompt"),
])
def test_folder_errors_are_one_line(folder, tmp_path, args, match):
    r = _cli("--model", folder[0], *args, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr


def test_a_file_with_an_unknown_tensor_is_refused_by_name(folder, tmp_path):
    from safetensors.torch import save_file

    save_file({"clip_embeds": torch.zeros(8, 16)}, str(tmp_path / "e.safetensors"))
    r = _cli("--model", folder[0], "--prompt-embeds", tmp_path / "e.safetensors", cwd=tmp_path)
    assert r.returncode == 2 and "'clip_embeds' is none of the model's inputs" in r.stderr, r.stderr


def test_prompt_flags_without_a_folder_are_refused(tmp_path):
    r = _cli("--prompt", "a cat", cwd=tmp_path)
    assert r.returncode == 2 and "need --model DIR" in r.stderr, r.stderr


def test_a_hub_id_is_refused_naming_the_offline_cause():
    import edmrt

    with pytest.raises(ValueError, match="local diffusers folders only.*no network"):
        edmrt.load("stabilityai/stable-diffusion-xl-base-1.0")


def test_edmrt_edit_edits_and_inpaints_a_folders_image_by_prompt(folder, tmp_path):
    import numpy as np
    from PIL import Image

    path, _ = folder
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    for extra in ([], ["--source-prompt", "a photo of a dog"], ["--mask-half", "bottom"]):
        out = tmp_path / f"out{len(extra)}.png"
        r = subprocess.run([sys.executable, "-m", "edmrt.cli", "edit", "--model", str(path), "--image",
                            str(tmp_path / "in.png"), "--prompt", "a cat", "--steps", "4", "--backend", "torch",
                            "-o", str(out), *extra], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr
        img = np.asarray(Image.open(out))
        assert img.shape == (32, 16, 3)     # before over after
        assert len(np.unique(img[16:])) > 10  # an image, not a blank (the random VAE decodes no likeness)


def test_edmrt_bench_on_a_folder_against_its_own_pipeline(folder, tmp_path):
    """``edmrt bench --model DIR --peers``: the folder's scheduler's method (Euler) against the folder's own
    StableDiffusionPipeline on the same network, with a speed-up per batch; the JSON names both."""
    path, _ = folder
    stem = tmp_path / "bench"
    out = subprocess.run([sys.executable, "-m", "edmrt.cli", "bench", "--model", str(path), "--peers", "--backends",
                          "torch", "--batch", "1", "2", "--steps", "3", "--rounds", "2", "--quiet", "-o", str(stem)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(stem.with_suffix(".json").read_text())
    cells = result["cells"]
    ours = [c for c in cells if c["kind"] == "edmrt"]
    peers = [c for c in cells if c["kind"] == "peer"]
    assert [c["solver"] for c in ours] == ["euler", "euler"] and {c["nfe"] for c in ours} == {3}
    assert [(c["solver"], c["batch"], c["nfe"]) for c in peers] == [("diffusers:StableDiffusionPipeline", 1, 3),
                                                                      ("diffusers:StableDiffusionPipeline", 2, 3)]
    assert all(c["speedup_vs_best_peer"] > 0 and c["images_per_s"] > 0 for c in ours)
    assert "diffusers:StableDiffusionPipeline" in stem.with_suffix(".md").read_text()


def test_fit_solver_on_a_folder_then_sample_with_learned_file(folder, tmp_path):
    """edmrt fit-solver learns a 3-evaluation solver for the folder's UNet under guidance (the prompt embeddings and
    the negative ones part of every network call); edmrt sample --solver learned:FILE gives the API's images."""
    from PIL import Image
    from safetensors.torch import save_file

    import edmrt

    path, _ = folder
    emb, neg = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(8, 16)
    save_file({"prompt_embeds": emb, "negative_prompt_embeds": neg}, str(tmp_path / "emb.safetensors"))
    r = subprocess.run([sys.executable, "-m", "edmrt.cli", "fit-solver", "--model", str(path), "--prompt-embeds",
                        str(tmp_path / "emb.safetensors"), "--guidance", "4", "--nfe", "3", "--budget", "12000",
                        "--samples", "32", "--heldout", "16", "--reference-nfe", "20", "--quiet", "-o",
                        str(tmp_path / "sd3.json")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    card = json.loads((tmp_path / "sd3.card.json").read_text())
    assert card["nfe"] == 3 and card["cost"] <= 12000 and card["heldout_loss"] < card["initial_loss"]
    r = _cli("--model", path, "--prompt-embeds", tmp_path / "emb.safetensors", "--seeds", "0-1", "--guidance", "4",
             "--solver", f"learned:{tmp_path / 'sd3.json'}", "--backend", "torch", "-o", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(tmp_path / "out" / f"sample_{s:06d}.png")))
                       .permute(2, 0, 1) for s in (0, 1)])
    s = edmrt.Sampler(edmrt.load(str(path)), plan=edmrt.Plan.load(tmp_path / "sd3.json"), backend="torch")
    want = s.sample([0, 1], cond={"encoder_hidden_states": emb}, uncond={"encoder_hidden_states": neg}, guidance=4.0)
    assert (got.int() - want.int()).abs().max().item() <= 1
