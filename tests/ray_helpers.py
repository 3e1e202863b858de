"""Helpers the Ray tests share (rendering and serving): a free loopback port, a JSON-over-HTTP call that returns
errors as (status, headers, body) too, and a local Ray for in-process tests."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body=None, method: str | None = None, timeout: float = 300):
    """(status, headers, body bytes) of a GET, or of a POST of ``body`` (JSON, or bytes as they are)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def local_ray():
    """A generator fixture body: one local Ray on 2 CPUs for a test module (render() leaves a Ray it did not start
    running), shut down after it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
