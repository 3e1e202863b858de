"""`edmrt render` of a diffusers folder's prompts on a local Ray: the same guarantees as for the digits
(tests/test_render.py), on a tiny Stable Diffusion folder built here (UNet, VAE, CLIP tokenizer and text encoder).

- Every image is byte for byte what one process gives: the folder's own encode_prompt (``PromptEncoder``) and
  ``Sampler.sample`` for that request alone, whatever actor, chunk or batch drew it; each distinct
  (prompt, negative prompt, guided) is encoded once by the one actor (counted), and the outputs carry the prompt
  (PNG text chunks, Parquet columns, WebDataset JSON).
- Requests that give an embeddings file instead of a prompt.
- A killed driver resumes to the byte-identical folder; an actor that dies is restarted and its chunk redone.
- Bad requests are named.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
import ray_helpers  # noqa: E402
pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sd_folder import sd_folder  # noqa: E402

from edmrt.render import RenderJob, Requests, read_requests, render, to_png, verify_output  # noqa: E402

PROMPTS = ["a cat", "a dog", "photo of a cat", ""]
N = 30


def _requests(n=N):
    """Four prompts cycled; every third request guided (3.0) with a negative prompt."""
    return [{"seed": 1000 + i, "prompt": PROMPTS[i % 4],
             **({"guidance": 3.0, "negative_prompt": "dog"} if i % 3 == 0 else {})} for i in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    path, _ = sd_folder(root)
    (root / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in _requests()))
    return path, root / "requests.jsonl"


@pytest.fixture(scope="module")
def local_ray():
    yield from ray_helpers.local_ray()


@pytest.fixture(scope="module")
def reference(folder):
    """Each request's PNG from one process: its prompt through the folder's encode_prompt, sampled alone."""
    from edmrt.pipelines.prompts import PromptEncoder
    from edmrt.render import build_sampler

    path, _ = folder
    model, sampler = build_sampler(RenderJob(model=str(path), steps=4), threads=1)
    enc = PromptEncoder(path, [c.name for c in model.cond])
    out = []
    for r in _requests():
        w = r.get("guidance")
        cond, uncond = enc.encode(r["prompt"], r.get("negative_prompt"), w is not None)
        x = sampler.sample([r["seed"]], cond=cond, uncond=uncond or None, guidance=w)
        out.append(to_png(x[0], {"prompt": r["prompt"], **({"negative_prompt": "dog"} if w else {})}))
    return out


def _pngs(out: Path) -> dict[int, bytes]:
    return {int(p.stem): p.read_bytes() for p in (out / "images").rglob("*.png")}


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "summary.json"}


def test_every_image_is_the_single_process_sample_and_each_prompt_is_encoded_once(folder, local_ray, reference,
                                                                                tmp_path):
    from PIL import Image

    path, req = folder
    s = render(RenderJob(model=str(path), steps=4, batch=7), read_requests(req, 0, text=True), tmp_path / "r",
               actors=1, progress=False)
    got = _pngs(tmp_path / "r")
    assert sorted(got) == list(range(N)) and all(got[i] == reference[i] for i in range(N))
    distinct = {(r["prompt"], r.get("negative_prompt"), "guidance" in r) for r in _requests()}
    assert s["prompts_encoded"] == len(distinct) == 8
    assert 0 < s["time_split_share"]["text_s"] < 1
    im = Image.open(io.BytesIO(got[3]))
    assert im.text == {"prompt": PROMPTS[3], "negative_prompt": "dog"} and im.size == (16, 16)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["text"] is True and manifest["requests"] == N


def test_a_prompt_stage_of_its_own_encodes_each_prompt_once_for_the_run(folder, local_ray, reference, tmp_path):
    """encode="stage": one encoder actor ahead of two sampling actors; the same images, each distinct prompt encoded
    once for the whole run (in the sampling actors it is once per actor)."""
    path, req = folder
    s = render(RenderJob(model=str(path), steps=4, batch=5, encode="stage"), read_requests(req, 0, text=True),
               tmp_path / "s", actors=2, progress=False)
    got = _pngs(tmp_path / "s")
    assert sorted(got) == list(range(N)) and all(got[i] == reference[i] for i in range(N))
    assert s["prompts_encoded"] == 8
    with pytest.raises(ValueError, match=r"encode must be one of \['actor', 'stage'\]"):
        RenderJob(model=str(path), encode="driver")


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_parquet_and_webdataset_carry_the_prompt(folder, local_ray, reference, tmp_path, fmt):
    path, req = folder
    render(RenderJob(model=str(path), steps=4, batch=16, format=fmt), read_requests(req, 0, text=True),
           tmp_path / fmt, actors=2, progress=False)
    rows = {}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for f in sorted((tmp_path / fmt / "parquet").glob("*.parquet")):
            t = pq.read_table(f).to_pydict()
            for i in range(len(t["index"])):
                rows[t["index"][i]] = (t["prompt"][i], t["negative_prompt"][i], t["png"][i])
    else:
        for f in sorted((tmp_path / fmt / "webdataset").glob("*.tar")):
            with tarfile.open(f) as tar:
                files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, data in files.items():
                if name.endswith(".json"):
                    meta = json.loads(data)
                    rows[meta["index"]] = (meta["prompt"], meta["negative_prompt"], files[name[:-5] + ".png"])
    assert sorted(rows) == list(range(N))
    for i, r in enumerate(_requests()):
        assert rows[i][:2] == (r["prompt"], r.get("negative_prompt", "")) and rows[i][2] == reference[i]


def test_requests_may_give_an_embeddings_file(folder, local_ray, tmp_path):
    from safetensors.torch import save_file

    import edmrt
    from edmrt.pipelines.prompts import PromptEncoder
    from edmrt.render import build_sampler

    path, _ = folder
    model = edmrt.load(str(path))
    cond, uncond = PromptEncoder(path, [c.name for c in model.cond]).encode("a cat", "dog", True)
    save_file({"prompt_embeds": cond["encoder_hidden_states"], "negative_prompt_embeds":
               uncond["encoder_hidden_states"]}, str(tmp_path / "cat.safetensors"))
    (tmp_path / "req.jsonl").write_text(json.dumps({"seed": 5, "embeds": "cat.safetensors", "guidance": 2.0}) + "\n"
                                        + json.dumps({"seed": 5, "prompt": "a cat", "negative_prompt": "dog",
                                                      "guidance": 2.0}))
    render(RenderJob(model=str(path), steps=4), read_requests(tmp_path / "req.jsonl", 0, text=True),
           tmp_path / "r", actors=1, progress=False)
    from PIL import Image

    a, b = (Image.open(tmp_path / "r" / "images" / "00000" / f"{i:09d}.png") for i in (0, 1))
    assert a.tobytes() == b.tobytes()       # the same embeddings: the same pixels (only b carries a prompt)
    _, sampler = build_sampler(RenderJob(model=str(path), steps=4), threads=1)
    x = sampler.sample([5], cond=cond, uncond=uncond, guidance=2.0)
    assert to_png(x[0]) == (tmp_path / "r" / "images" / "00000" / "000000000.png").read_bytes()


def _cli(path, req, out: Path, env=None, batch="3"):
    cmd = [sys.executable, "-m", "edmrt.cli", "render", "--model", str(path), "--requests", str(req), "--steps", "4",
           "--batch", batch, "--actors", "2", "--quiet", "--out", str(out)]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)


def test_a_killed_driver_resumes_to_the_identical_folder_and_a_dead_actor_is_replaced(folder, reference, tmp_path):
    path, req = folder
    p = _cli(path, req, tmp_path / "killed")
    done_dir = tmp_path / "killed" / "done"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if done_dir.exists() and len(list(done_dir.glob("chunk-*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed:\n" + p.stdout.read()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)
    partial = len(list(done_dir.glob("chunk-*.json")))
    assert 2 <= partial < 10
    resumed = _cli(path, req, tmp_path / "killed")
    text = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, text
    assert f"; {partial} already done)" in text, text
    marker = tmp_path / "died"
    clean = _cli(path, req, tmp_path / "clean", env={"EDMRT_RENDER_TEST_EXIT_AFTER": "2",
                                                      "EDMRT_RENDER_TEST_MARKER": str(marker)})
    out = clean.communicate(timeout=600)[0]
    assert clean.returncode == 0, out
    assert marker.exists(), "the test hook must have killed an actor"
    assert _tree(tmp_path / "killed") == _tree(tmp_path / "clean")
    got = _pngs(tmp_path / "killed")
    assert sorted(got) == list(range(N)) and all(got[i] == reference[i] for i in range(N))
    assert verify_output(tmp_path / "clean")[1] == set()


@pytest.mark.parametrize("rows,match", [
    ([{"seed": 0}], "request 0 needs 'prompt' or 'embeds'"),
    ([{"seed": 0, "prompt": 3}], "'prompt' must be a string"),
    ([{"seed": 0, "prompt": "a", "class": 2}], r"may have \['embeds', 'guidance', 'height', 'negative_prompt', 'prompt', 'steps', 'width'\]"),
    ([{"seed": 0, "embeds": "x.safetensors", "negative_prompt": "b"}], "embeds 'x.safetensors' must be a"),
    ([{"seed": 0, "prompt": "a" * 5000}], "at most 4096 characters"),
])
def test_bad_prompt_requests_are_named(tmp_path, rows, match):
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=match):
        read_requests(tmp_path / "r.jsonl", 0, text=True)


def test_prompts_for_a_model_without_text_are_refused(tmp_path):
    with pytest.raises(ValueError, match="takes no prompts"):
        Requests.from_prompts(["a cat"]).checked(10)
    (tmp_path / "r.jsonl").write_text(json.dumps({"seed": 0, "prompt": "a cat"}))
    with pytest.raises(ValueError, match=r"may have \['class', 'guidance', 'height', 'steps', 'width'\]"):
        read_requests(tmp_path / "r.jsonl", 10)


def test_requests_may_ask_for_their_own_steps_and_size(folder, local_ray, tmp_path):
    """A request's own steps and size (from the sets the job allows): each image is that variant's Sampler on one
    process, byte for byte; the Parquet rows carry them (0: the job's); one outside the sets is named."""
    import pyarrow.parquet as pq
    from PIL import Image

    from edmrt.pipelines.prompts import PromptEncoder
    from edmrt.render import build_sampler

    path, _ = folder
    rows = [{"seed": 50 + i, "prompt": PROMPTS[i % 3], **({"steps": 2} if i % 3 == 0 else {}),
             **({"height": 24, "width": 32} if i % 4 == 1 else {})} for i in range(12)]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    job = RenderJob(model=str(path), steps=4, batch=5, format="parquet", step_counts=(2, 3), sizes=((24, 32),))
    s = render(job, read_requests(tmp_path / "r.jsonl", 0, text=True), tmp_path / "out", actors=2, progress=False)
    assert s["nfe_per_variant"] == {"0x0x0": 4, "2x0x0": 2, "0x24x32": 4, "2x24x32": 2}   # Euler: one per step
    got = {}
    for f in sorted((tmp_path / "out" / "parquet").glob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        got.update({t["index"][i]: (t["steps"][i], t["height"][i], t["width"][i], t["png"][i])
                    for i in range(len(t["index"]))})
    base, _ = build_sampler(job, threads=1)
    enc = PromptEncoder(path, [c.name for c in base.cond])
    for i, r in enumerate(rows):
        steps, hw = r.get("steps", 0), (r.get("height", 0), r.get("width", 0))
        model, sampler = build_sampler(job, 1, base, steps, hw)
        cond, _ = enc.encode(r["prompt"], None, False)
        want = to_png(sampler.sample([r["seed"]], cond=cond)[0], {"prompt": r["prompt"]})
        assert got[i] == (steps, *hw, want), i
        assert Image.open(io.BytesIO(got[i][3])).size == ((32, 24) if hw[0] else (16, 16))
    rows[5]["steps"] = 7
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"request 5 asks for steps=7; this job allows \[2, 3\]"):
        render(job, read_requests(tmp_path / "bad.jsonl", 0, text=True), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="request 0 gives one of height and width"):
        Requests.from_prompts(["a cat"]).with_variants(sizes=[(24, 0)])
