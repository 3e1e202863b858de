"""`edmrt serve` on a local Ray Serve (edmrt.serve): the HTTP API, every bad request a 400 naming its field, a
request's images identical batched or alone (and equal to Sampler.sample), and overload answered by clean 503s
with Retry-After while every accepted request is served."""
from __future__ import annotations

import base64
import json
import threading

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytest.importorskip("starlette")
pytest.importorskip("onnxruntime")
pytest.importorskip("PIL")

from ray_helpers import call as _call, free_port as _free_port  # noqa: E402

from edmrt.render import RenderJob, build_sampler, to_png  # noqa: E402
from edmrt.serve import BadRequest, ServeOptions, make_app, parse_request  # noqa: E402


@pytest.fixture(scope="module")
def server():
    """Two applications on one local Ray Serve: digits-cd with dynamic batching (route /) and the teacher with a
    queue bound of 2 (route /small)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app(ServeOptions(model="digits-cd", max_batch_size=32, batch_wait_timeout_s=0.05)), name="cd",
              route_prefix="/")
    serve.run(make_app(ServeOptions(model="digits", max_queue=2, max_batch_size=1, max_steps=40)), name="small",
              route_prefix="/small")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    _, s = build_sampler(RenderJob(model="digits-cd"))
    return lambda seeds, classes: [to_png(x) for x in s.sample(seeds, cond=classes)]


def test_health_models_and_one_png(server, reference):
    assert _call(server + "/healthz")[0] == 200
    info = json.loads(_call(server + "/v1/models")[2])["models"][0]
    assert info["model"] == "digits-cd" and info["num_classes"] == 10 and info["default"]["steps"] == 2
    status, headers, body = _call(server + "/v1/samples", {"seeds": [3], "class": 7, "format": "png"})
    assert status == 200 and headers["content-type"] == "image/png" and body == reference([3], [7])[0]
    out = json.loads(_call(server + "/v1/samples", {"count": 3, "seed": 10, "format": "array"})[2])
    assert out["shape"] == [3, 1, 8, 8] and out["seeds"] == [10, 11, 12] and out["class"] == [0, 1, 2]


@pytest.mark.parametrize("body,field", [
    ({"seeds": [-1]}, "seeds"), ({"seeds": []}, "seeds"), ({"seeds": list(range(65))}, "seeds"),
    ({"seeds": [1.5]}, "seeds"), ({"count": 0}, "count"), ({"seeds": [1], "class": 10}, "class"),
    ({"seeds": [1, 2], "class": [1]}, "class"), ({"seeds": [1], "guidance": -1}, "guidance"),
    ({"seeds": [1], "guidance": "NaN"}, "guidance"), ({"seeds": [1], "solver": "rk45"}, "solver"),
    ({"seeds": [1], "steps": 0}, "steps"), ({"seeds": [1], "steps": 10_000}, "steps"),
    ({"seeds": [1, 2], "format": "png"}, "format"), ({"seeds": [1], "format": "gif"}, "format"),
    ({"seeds": [1], "colour": "red"}, "colour"), ({"seeds": [1], "seed": 2}, "seeds"), ([1, 2], "body"),
])
def test_every_bad_request_is_a_400_naming_its_field(server, body, field):
    status, headers, raw = _call(server + "/v1/samples", body)
    assert status == 400 and headers["content-type"] == "application/json", raw
    assert json.loads(raw)["field"] == field


def test_not_json_unknown_route_and_method(server):
    status, _, raw = _call(server + "/v1/samples", b"{not json")
    assert status == 400 and json.loads(raw)["field"] == "body"
    assert _call(server + "/v2/samples", {"seeds": [1]})[0] == 404
    assert _call(server + "/v1/samples")[0] == 405


def test_parse_request_without_a_server():
    opts = ServeOptions()
    r = parse_request({"count": 2, "seed": 5, "guidance": 1.5}, opts, 10, "consistency", 2, ("consistency",))
    assert (r.seeds, r.classes, r.guidance, r.steps) == ([5, 6], [0, 1], 1.5, 2)
    with pytest.raises(BadRequest, match="unconditional"):
        parse_request({"seeds": [1], "class": 1}, opts, 0, "heun", 18, ("heun",))
    for bad in (dict(max_queue=0), dict(batch_wait_timeout_s=-1), dict(threads=True), dict(retries=-1)):
        with pytest.raises(ValueError):
            ServeOptions(**bad)


def test_concurrent_requests_are_batched_and_each_gets_its_own_images(server, reference):
    """24 concurrent requests of 1-3 seeds each: the server samples several in one call (its stats say so), and
    every request's images are Sampler.sample's for its seeds and classes, as when it is sent alone."""
    before = json.loads(_call(server + "/v1/models")[2])["models"][0]["stats"]
    reqs = [{"seeds": list(range(100 + 3 * i, 100 + 3 * i + 1 + i % 3)), "class": (i * 7) % 10} for i in range(24)]
    results: dict = {}
    barrier = threading.Barrier(len(reqs))

    def go(i):
        barrier.wait()
        results[i] = _call(server + "/v1/samples", reqs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = json.loads(_call(server + "/v1/models")[2])["models"][0]["stats"]
    assert after["requests"] - before["requests"] == len(reqs)
    assert after["sample_calls"] - before["sample_calls"] < len(reqs) and after["largest_batch"] > 1
    for i, r in enumerate(reqs):
        status, _, raw = results[i]
        assert status == 200, raw
        got = [base64.b64decode(b) for b in json.loads(raw)["images"]]
        assert got == reference(r["seeds"], [r["class"]] * len(r["seeds"])), i
    alone = json.loads(_call(server + "/v1/samples", reqs[5])[2])["images"]
    assert alone == json.loads(results[5][2])["images"]


def test_overload_gives_clean_503s_with_retry_after_and_serves_the_rest(server):
    """The teacher at 40 steps, a queue bound of 2, 12 requests at once: each answer is a 200 with its image or a
    503 with Retry-After and a JSON error; never a 500; at least one of each."""
    url = server + "/small/v1/samples"
    results: dict = {}
    barrier = threading.Barrier(12)

    def go(i):
        barrier.wait()
        results[i] = _call(url, {"seeds": [i], "class": i % 10, "steps": 40})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    statuses = [results[i][0] for i in range(12)]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    for status, headers, raw in results.values():
        if status == 503:
            assert "retry-after" in {k.lower() for k in headers} and json.loads(raw)["error"]
        else:
            assert len(json.loads(raw)["images"]) == 1


def _sampler_replicas(app: str) -> list:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#EdmrtSampler#")]


def test_a_killed_replica_is_replaced_and_its_request_retried(server):
    """Kill the teacher's sampler replica while it samples 64 seeds (seen from its stats): Ray Serve starts a new one
    and the ingress sends the in-flight request again, so the client gets a 200 with the very images it would have
    got (sampling is deterministic by seed), never a hang or a 500; the next request is served too."""
    import time

    url = server + "/small/v1/samples"
    body = {"count": 64, "seed": 0, "steps": 40}
    status, _, first = _call(url, body)
    assert status == 200
    stats = lambda: json.loads(_call(server + "/small/v1/models")[2])["models"][0]["stats"]  # noqa: E731
    started = stats()["requests"]
    res = {}
    t = threading.Thread(target=lambda: res.setdefault("r", _call(url, body, timeout=150)))
    t.start()
    deadline = time.monotonic() + 30
    while stats()["requests"] == started and time.monotonic() < deadline:
        time.sleep(0.01)
    (victim,) = _sampler_replicas("small")
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    t.join(160)
    assert not t.is_alive()
    status, headers, raw = res["r"]
    assert status == 200 and headers["content-type"] == "application/json", (status, raw[:300])
    assert json.loads(raw)["images"] == json.loads(first)["images"]
    (new,) = _sampler_replicas("small")
    assert new["name"] != victim["name"]
    assert stats()["requests"] == 1   # the new replica sampled the retried request, and nothing else yet
    status, _, raw = _call(url, {"seeds": [3], "class": 3}, timeout=120)
    assert status == 200 and len(json.loads(raw)["images"]) == 1
