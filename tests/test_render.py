"""`edmrt render` on a local Ray (edmrt.render): every image byte for byte what one process's Sampler.sample gives,
whatever actor or batch drew it; a killed driver resumed to exactly an uninterrupted run's output; an actor that
dies mid-run restarted and its chunk redone; the three formats; the manifest, the records and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
import ray_helpers  # noqa: E402
pytest.importorskip("onnxruntime")
pytest.importorskip("PIL")

from edmrt.cli import main  # noqa: E402
from edmrt.render import RenderJob, Requests, read_requests, render, to_png, verify_output, write_chunk  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    yield from ray_helpers.local_ray()


@pytest.fixture(scope="module")
def reference():
    """Images of digits-cd for seeds 0..999 (classes i % 10) from Sampler.sample in this process, in one batch,
    on ONNX Runtime (one thread), as PNG bytes."""
    from edmrt.render import build_sampler

    model, sampler = build_sampler(RenderJob(model="digits-cd"), threads=1)
    x = sampler.sample(list(range(1000)), cond=[i % 10 for i in range(1000)])
    return [to_png(im) for im in x]


def _pngs(out: Path) -> dict[int, bytes]:
    return {int(p.stem): p.read_bytes() for p in (out / "images").rglob("*.png")}


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "summary.json"}


def test_every_image_is_the_single_process_sample_byte_for_byte(local_ray, reference, tmp_path):
    """1,000 seeds, 2 actors, chunks of 37 (the last one 1): each PNG equals Sampler.sample's in one batch of 1,000."""
    s = render(RenderJob(model="digits-cd", batch=37), Requests.from_seeds(range(1000), 10), tmp_path / "r",
               actors=2, progress=False)
    got = _pngs(tmp_path / "r")
    assert sorted(got) == list(range(1000))
    assert all(got[i] == reference[i] for i in range(1000)), [i for i in range(1000) if got[i] != reference[i]][:5]
    assert s["chunks"] == s["chunks_rendered"] == 28 and s["rendered_images"] == 1000
    assert len(s["per_actor"]) == 2                                  # both actors drew chunks
    assert s["nfe_per_image"] == 2 and s["images_per_s"] > 0
    assert set(s["time_split_s"]) == {"network_s", "sample_s", "encode_s", "write_s"}
    # a second run only verifies; a damaged image is found and its chunk redone, nothing else
    again = render(RenderJob(model="digits-cd", batch=37), Requests.from_seeds(range(1000), 10), tmp_path / "r",
                   actors=2, progress=False)
    assert again["chunks_rendered"] == 0 and again["verified_chunks"] == 28
    victim = next((tmp_path / "r" / "images").rglob("000000500.png"))
    victim.write_bytes(victim.read_bytes()[:20])
    fixed = render(RenderJob(model="digits-cd", batch=37), Requests.from_seeds(range(1000), 10), tmp_path / "r",
                   actors=2, progress=False)
    assert fixed["chunks_rendered"] == 1 and _pngs(tmp_path / "r")[500] == reference[500]


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_parquet_and_webdataset_hold_the_same_images_and_metadata(local_ray, reference, tmp_path, fmt):
    job = RenderJob(model="digits-cd", format=fmt, batch=40)
    req = Requests.from_seeds(range(100), 10)
    render(job, req, tmp_path / "a", actors=2, progress=False)
    rows = {}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        files = sorted((tmp_path / "a" / "parquet").glob("chunk-*.parquet"))
        assert [f.name for f in files] == ["chunk-0000000.parquet", "chunk-0000001.parquet", "chunk-0000002.parquet"]
        for f in files:
            t = pq.read_table(f)
            meta = json.loads(t.schema.metadata[b"edmrt"])
            assert meta["solver"] == "consistency" and meta["steps"] == 2 and len(meta["model_weights_sha256"]) == 64
            for r in t.to_pylist():
                rows[r["index"]] = r
    else:
        for f in sorted((tmp_path / "a" / "webdataset").glob("chunk-*.tar")):
            with tarfile.open(f) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, data in members.items():
                if name.endswith(".json"):
                    info = json.loads(data)
                    rows[info["index"]] = {**info, "png": members[name.replace(".json", ".png")]}
    assert sorted(rows) == list(range(100))
    for i, r in rows.items():
        assert r["seed"] == i and r["class_label"] == i % 10 and r["guidance"] is None and r["png"] == reference[i]


def test_requests_file_with_classes_and_guidance(local_ray, tmp_path):
    lines = [{"seed": 7, "class": 3}, {"seed": 7, "class": 3, "guidance": 2.0}, {"seed": 11, "class": 0},
             {"seed": 2, "class": 9, "guidance": 0.0}, {"seed": 5, "class": 1, "guidance": 2.0}]
    path = tmp_path / "req.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    req = read_requests(path, 10)
    render(RenderJob(model="digits", steps=4, batch=3), req, tmp_path / "r", actors=2, progress=False)
    got = _pngs(tmp_path / "r")
    from edmrt.render import build_sampler

    _, s = build_sampler(RenderJob(model="digits", steps=4))
    for i, x in enumerate(lines):
        want = s.sample([x["seed"]], cond=[x["class"]], guidance=x.get("guidance"))[0]
        assert got[i] == to_png(want), i
    assert got[0] != got[1]                                            # guidance changes the image
    csv_path = tmp_path / "req.csv"
    csv_path.write_text("seed,class,guidance\n7,3,\n7,3,2.0\n")
    r2 = read_requests(csv_path, 10)
    assert r2.seed.tolist() == [7, 7] and r2.class_label.tolist() == [3, 3] and np.isnan(r2.guidance[0])


@pytest.mark.parametrize("text,match", [
    ('{"seed": -1}', "seeds must be >= 0"), ('{"seed": 1, "class": 10}', "class in \\[0, 10\\)"),
    ('{"seed": 1.5}', "integers"), ('{"seed": 1, "guidance": "inf"}', "finite"), ('[1, 2]', "JSON object"),
    ('{"seed": 1, "colour": 3}', "may have"), ("{seed: 1}", "not a JSON object"), ("", "nothing to render"),
])
def test_bad_requests_are_named(tmp_path, text, match):
    path = tmp_path / "r.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_requests(path, 10)


def test_another_job_or_a_foreign_folder_is_refused(local_ray, tmp_path):
    req = Requests.from_seeds(range(10), 10)
    render(RenderJob(model="digits-cd", batch=5), req, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="another render job.*batch"):
        render(RenderJob(model="digits-cd", batch=4), req, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="another render job.*requests"):
        render(RenderJob(model="digits-cd", batch=5), Requests.from_seeds(range(11), 10), tmp_path / "r",
               progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    with pytest.raises(ValueError, match="not an edmrt render folder"):
        render(RenderJob(model="digits-cd"), req, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep"
    for bad in (dict(format="jpeg"), dict(batch=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RenderJob(**bad)
    with pytest.raises(ValueError, match="actors"):
        render(RenderJob(), req, tmp_path / "x", actors=0)


def test_a_chunk_record_never_covers_a_partial_chunk(tmp_path):
    rows = [{"index": i, "seed": i, "class_label": 0, "guidance": float("nan"), "png": b"x"} for i in range(3)]
    with pytest.raises(ValueError, match="expected 4"):
        write_chunk(tmp_path, "png", 0, rows, {}, 4)
    assert not (tmp_path / "done").exists()


def _cli(out: Path, extra=(), env=None, seeds="0-399", batch="8"):
    cmd = [sys.executable, "-m", "edmrt.cli", "render", "--model", "digits-cd", "--seeds", seeds, "--batch", batch,
           "--actors", "2", "--quiet", "--out", str(out), *extra]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)


def test_a_killed_driver_resumes_to_exactly_the_uninterrupted_output(tmp_path, reference):
    """SIGKILL the whole driver (its local Ray with it) once some chunks are recorded; the re-run renders only what
    is missing and the folder equals an uninterrupted run's, file for file and byte for byte."""
    p = _cli(tmp_path / "killed")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        done = list((tmp_path / "killed" / "done").glob("chunk-*.json")) if (tmp_path / "killed" / "done").exists() \
            else []
        if len(done) >= 5:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed:\n" + p.stdout.read()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(30)
    partial = len(list((tmp_path / "killed" / "done").glob("chunk-*.json")))
    assert 5 <= partial < 50
    resumed = _cli(tmp_path / "killed")
    text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, text
    assert f"{50 - partial} chunks" in text or f"({partial} already done)" in text, text
    clean = _cli(tmp_path / "clean")
    assert clean.communicate(timeout=300)[0] and clean.returncode == 0
    a, b = _tree(tmp_path / "killed"), _tree(tmp_path / "clean")
    assert a == b and not [k for k in a if k.endswith(".tmp")]
    got = _pngs(tmp_path / "killed")
    assert sorted(got) == list(range(400)) and all(got[i] == reference[i] for i in range(400))
    again = _cli(tmp_path / "killed")
    assert "nothing to do: 400 images" in again.communicate(timeout=120)[0]


def test_an_actor_that_dies_is_restarted_and_its_chunk_redone(tmp_path, reference):
    marker = tmp_path / "died"
    p = _cli(tmp_path / "r", env={"EDMRT_RENDER_TEST_EXIT_AFTER": "3", "EDMRT_RENDER_TEST_MARKER": str(marker)},
             seeds="0-199", batch="10")
    text = p.communicate(timeout=300)[0]
    assert p.returncode == 0, text
    assert marker.exists(), "the test hook must have killed an actor"
    got = _pngs(tmp_path / "r")
    assert sorted(got) == list(range(200)) and all(got[i] == reference[i] for i in range(200))
    done, redo = verify_output(tmp_path / "r")
    assert len(done) == 20 and not redo


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):                                                 # no work given: argparse
        main(["render", "--model", "digits-cd", "--out", str(tmp_path / "o")])
    assert main(["render", "--model", "digits-cd", "--requests", str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "o")]) == 2
    assert main(["render", "--model", "digits-cd", "--seeds", "0-3", "--class", "12", "--out", str(tmp_path / "o")]) == 2
    assert "class in [0, 10)" in capsys.readouterr().err
    assert main(["render", "--model", "digits-cd", "--seeds", "0-3", "--sizes", "28x", "--out", str(tmp_path / "o")]) == 2
    assert "--sizes: '28x' is not HEIGHTxWIDTH in pixels" in capsys.readouterr().err
