"""`edmrt serve --model DIR` on a local Ray Serve: prompt requests answered with the image ``Sampler.sample`` gives
for the folder's own prompt encoding, batched or alone; each distinct prompt encoded once per replica (its cache);
the OpenAI-style ``POST /v1/images/generations`` through a plain HTTP client; bad prompt requests a 400 naming the
field.  (Overload, retries and replica death share the digits' code path: tests/test_serve.py.)"""
from __future__ import annotations

import base64
import json
import threading

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("starlette")
pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ray_helpers import call as _call, free_port as _free_port  # noqa: E402
from sd_folder import sd_folder  # noqa: E402

from edmrt.render import RenderJob, build_sampler, to_png  # noqa: E402
from edmrt.serve import BadRequest, ServeOptions, make_app, parse_openai, parse_request  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd_folder(tmp_path_factory.mktemp("sd"))[0]


@pytest.fixture(scope="module")
def server(folder):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app(ServeOptions(model=str(folder), max_batch_size=16, batch_wait_timeout_s=0.1, max_steps=32)),
              name="sd", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(folder):
    """PNG bytes of (seed, prompt, negative prompt, guidance) from one process, sampled alone."""
    from edmrt.pipelines.prompts import PromptEncoder

    model, sampler = build_sampler(RenderJob(model=str(folder)), threads=1)
    enc = PromptEncoder(folder, [c.name for c in model.cond])

    def ref(seed, prompt, negative=None, guidance=None):
        cond, uncond = enc.encode(prompt, negative, guidance is not None)
        return to_png(sampler.sample([seed], cond=cond, uncond=uncond or None, guidance=guidance)[0])
    return ref


def test_a_prompt_request_is_the_in_process_image(server, reference):
    info = json.loads(_call(server + "/v1/models")[2])["models"][0]
    assert info["text"] is True and info["image_size"] == [16, 16] and info["num_classes"] == 0
    status, headers, body = _call(server + "/v1/samples", {"prompt": "a cat", "seed": 3, "format": "png"})
    assert status == 200, body
    assert headers["content-type"] == "image/png" and body == reference(3, "a cat")
    out = json.loads(_call(server + "/v1/samples", {"prompt": "a dog", "negative_prompt": "cat", "guidance": 4.0,
                                                    "count": 2, "seed": 7})[2])
    assert out["prompt"] == "a dog" and out["seeds"] == [7, 8]
    assert [base64.b64decode(im) for im in out["images"]] == [reference(s, "a dog", "cat", 4.0) for s in (7, 8)]


def test_concurrent_prompt_requests_are_batched_and_each_prompt_encoded_once(server, reference):
    before = json.loads(_call(server + "/v1/models")[2])["models"][0]["stats"]
    prompts = ["photo of a cat", "photo of a dog", "a cat of a dog"]
    reqs = [{"prompt": prompts[i % 3], "seed": 50 + i} for i in range(12)]
    results = [None] * len(reqs)

    def go(i):
        results[i] = _call(server + "/v1/samples", reqs[i])
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, (status, _, body) in zip(reqs, results):
        assert status == 200, body
        assert base64.b64decode(json.loads(body)["images"][0]) == reference(r["seed"], r["prompt"])
    after = json.loads(_call(server + "/v1/models")[2])["models"][0]["stats"]
    assert after["requests"] - before["requests"] == 12 and after["sample_calls"] - before["sample_calls"] < 12
    assert after["prompts_encoded"] - before["prompts_encoded"] == 3     # once per distinct prompt


def test_the_openai_images_route_with_a_plain_http_client(server, reference):
    status, headers, raw = _call(server + "/v1/images/generations",
                                 {"prompt": "a dog", "n": 2, "size": "16x16", "response_format": "b64_json"})
    assert status == 200 and headers["content-type"] == "application/json", raw
    out = json.loads(raw)
    assert isinstance(out["created"], int) and len(out["data"]) == 2
    assert [base64.b64decode(d["b64_json"]) for d in out["data"]] == [reference(s, "a dog") for s in (0, 1)]


@pytest.mark.parametrize("path,body,field", [
    ("/v1/samples", {"seed": 1}, "prompt"),
    ("/v1/samples", {"prompt": 5}, "prompt"),
    ("/v1/samples", {"prompt": "a cat", "class": 3}, "class"),
    ("/v1/samples", {"prompt": "a" * 5000}, "prompt"),
    ("/v1/images/generations", {"prompt": "a cat", "size": "512x512"}, "size"),
    ("/v1/images/generations", {"prompt": "a cat", "response_format": "url"}, "response_format"),
    ("/v1/images/generations", {"prompt": "a cat", "n": 100}, "n"),
    ("/v1/images/generations", {"prompt": "a cat", "model": "dall-e-3"}, "model"),
    ("/v1/images/generations", {"prompt": "a cat", "guidance_scale": -2}, "guidance_scale"),
])
def test_bad_prompt_requests_are_a_400_naming_the_field(server, path, body, field):
    status, _, raw = _call(server + path, body)
    assert status == 400 and json.loads(raw)["field"] == field, raw


def test_parsing_prompts_without_a_server():
    opts = ServeOptions()
    r = parse_request({"prompt": "x", "count": 2}, opts, 0, "euler", 4, ("euler",), text=True)
    assert (r.prompt, r.seeds, r.classes) == ("x", [0, 1], None)
    with pytest.raises(BadRequest, match="takes classes, not prompts"):
        parse_request({"prompt": "x"}, opts, 10, "euler", 4, ("euler",))
    card = {"model": "m", "text": False, "image_size": [8, 8], "default": {"solver": "euler", "steps": 4},
            "solvers": ["euler"]}
    with pytest.raises(BadRequest, match="takes no prompts: use POST /v1/samples"):
        parse_openai({"prompt": "x"}, opts, card)
