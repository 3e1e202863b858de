"""`edmrt bench` (edmrt.lab.bench): every cell measured with its latency percentiles, rates, the overhead over the
bare network and memory; the peers of a solver at the same NFE on the same network; the table, files and errors."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

from edmrt.cli import main  # noqa: E402
from edmrt.lab.bench import run_bench, table  # noqa: E402


def test_cells_rates_and_peers():
    res = run_bench("digits-cd", solvers=["consistency"], backends=["onnxruntime", "torch"], batches=[1, 3],
                    rounds=2, peers=True, progress=False)
    cells = res["cells"]
    edm = [c for c in cells if c["kind"] == "edmrt"]
    assert [(c["backend"], c["batch"]) for c in edm] == [("onnxruntime", 1), ("onnxruntime", 3), ("torch", 1),
                                                         ("torch", 3)]
    for c in edm:
        assert c["nfe"] == 2 and c["p50_ms"] <= c["p90_ms"] <= c["p99_ms"]
        assert c["images_per_s"] > 0 and c["nfe_per_s"] == pytest.approx(2 * c["images_per_s"])
        assert c["overhead_vs_bare_network"] > 0 and c["peak_mb"] > 0
    assert not [c for c in cells if c["kind"] == "peer"]  # the consistency solver has no peer loop
    assert "| consistency | 2 | 2 | onnxruntime | 3 |" in table(res)


def test_peer_loops_run_at_the_same_nfe():
    pytest.importorskip("diffusers")
    res = run_bench("digits", solvers=["dpmpp_2m"], steps=[4], backends=["torch"], batches=[2], rounds=1,
                    peers=True, progress=False)
    peers = [c for c in res["cells"] if c["kind"] == "peer"]
    assert "diffusers:EDMDPMSolver(2)" in {c["solver"] for c in peers}
    assert all(c["nfe"] == 4 and c["backend"] == "torch eager" and c["overhead_vs_bare_network"] is None
               for c in peers)


def test_cli_writes_json_markdown_and_plot(tmp_path, capsys):
    stem = tmp_path / "b"
    assert main(["bench", "--model", "digits-cd", "--solvers", "consistency", "--backends", "torch", "--batch", "2",
                 "--rounds", "1", "--quiet", "-o", str(stem)]) == 0
    out = capsys.readouterr().out
    assert "| consistency | 2 | 2 | torch | 2 |" in out
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["command"].startswith("edmrt bench") and data["machine"]
    assert stem.with_suffix(".png").stat().st_size > 1000 and "edmrt bench" in stem.with_suffix(".md").read_text()
    assert main(["bench", "--model", "digits-cd", "--solvers", "nope", "-o", str(stem)]) == 2
    assert main(["bench", "--model", "nope", "-o", str(stem)]) == 2


def test_quick_runs_batches_1_and_8_once_and_says_where_the_time_went(tmp_path, capsys):
    import time

    stem = tmp_path / "q"
    t0 = time.perf_counter()
    assert main(["bench", "--model", "digits-cd", "--solvers", "consistency", "--backends", "torch", "--quick",
                 "--quiet", "-o", str(stem)]) == 0
    wall = time.perf_counter() - t0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [c["batch"] for c in data["cells"]] == [1, 8] and data["rounds"] == 1
    phases = data["phases_s"]
    assert set(phases) == {"setup", "warm_up", "rounds"} and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= wall + 0.5
    assert "took " in capsys.readouterr().out and "timed round(s)" in stem.with_suffix(".md").read_text()
    # An explicit --batch or --rounds wins over --quick's.
    assert main(["bench", "--model", "digits-cd", "--solvers", "consistency", "--backends", "torch", "--quick",
                 "--batch", "3", "--rounds", "2", "--quiet", "-o", str(stem)]) == 0
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [c["batch"] for c in data["cells"]] == [3] and data["rounds"] == 2
