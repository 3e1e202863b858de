"""edmrt quality: the harness end to end on a small case, and its metric."""
import json
import math

import numpy as np
import pytest
import torch

from edmrt.lab import quality_gmm as Q


def test_sliced_wasserstein_is_zero_on_itself_and_sees_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    assert Q.sliced_wasserstein(a, a) == 0.0
    shift = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    # Projections of a shift by v onto unit directions theta: W2 = |v . theta|, so SW2 = |v| / sqrt(D).
    assert Q.sliced_wasserstein(a + shift, a, projections=4096) == pytest.approx(0.5 / math.sqrt(3), rel=0.05)
    with pytest.raises(ValueError, match="shape"):
        Q.sliced_wasserstein(a, a[:10])


def test_steps_for_reaches_the_budget_at_or_below():
    assert Q.steps_for(Q.RECIPES["heun"], 10) == 5          # 2N - 1 = 9 <= 10
    assert Q.steps_for(Q.RECIPES["dpmpp_2m"], 10) == 10
    assert Q.steps_for(Q.RECIPES["ipndm_afs"], 10) == 11     # N - 1 evaluations
    assert Q.steps_for(Q.RECIPES["heun"], 0) is None


def test_run_quality_writes_table_json_and_plot(tmp_path):
    recipes = [Q.RECIPES[n] for n in ("euler", "heun", "ipndm", "dpmpp_2m_sde")]
    res = Q.run_quality(dims=(6,), samples=64, seed=3, nfes=(3, 8), recipes=recipes, progress=False)
    rows = res["rows"]
    assert {r["solver"] for r in rows} == {"euler", "heun", "ipndm", "dpmpp_2m_sde"}
    assert all(math.isfinite(r["rmse"]) and r["nfe"] <= r["nfe_budget"] for r in rows)
    by = {(r["solver"], r["nfe_budget"]): r for r in rows}
    assert by[("ipndm", 8)]["rmse"] < by[("euler", 8)]["rmse"]  # a 4th-order multistep beats Euler at 8 NFE
    assert by[("dpmpp_2m_sde", 8)]["stochastic"] and not by[("ipndm", 8)]["stochastic"]
    paths = Q.write_results(res, tmp_path / "q")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size > 0 for p in paths)
    assert json.loads(paths[0].read_text())["machine"] == res["machine"]
    assert "| ipndm |" in paths[1].read_text()


def test_quality_digits_cli_end_to_end(tmp_path, capsys):
    """`edmrt quality --model digits` on a small grid: rows, blocks, floor, files; block 0 recomputed directly."""
    pytest.importorskip("sklearn")
    import edmrt
    from edmrt.cli import main
    from edmrt.lab.metrics import fd_digits, fd_digits_floor, fd_digits_labels

    stem = tmp_path / "q"
    assert main(["quality", "--model", "digits", "--solvers", "euler", "--nfe", "2", "3", "--blocks", "2",
                 "--no-student", "--quiet", "-o", str(stem)]) == 0
    assert "wrote" in capsys.readouterr().out
    res = json.loads(stem.with_suffix(".json").read_text())
    assert [(r["solver"], r["nfe"]) for r in res["rows"]] == [("euler", 2), ("euler", 3)]
    assert res["fd_digits_floor"] == pytest.approx(fd_digits_floor(), rel=1e-9)
    labels = fd_digits_labels()
    x = edmrt.Sampler(edmrt.load("digits"), solver="euler", steps=2, backend="torch", device="cpu").sample(
        range(len(labels)), cond=labels)
    row = res["rows"][0]
    assert row["fd_digits_blocks"][0] == pytest.approx(fd_digits(x), rel=1e-6)
    assert row["fd_digits"] == pytest.approx(np.mean(row["fd_digits_blocks"]))
    # FD-train: the same block against the whole training split; its floor is test half A against it
    from edmrt.lab.common import held_out_halves, load_digits_split
    from edmrt.lab.metrics import digits_features, frechet_distance

    ref_train = digits_features(load_digits_split("train")[0])
    (xa, _), _ = held_out_halves()
    assert res["fd_train_floor"] == pytest.approx(frechet_distance(digits_features(xa), ref_train), rel=1e-9)
    assert res["rows"][1]["fd_train"] < row["fd_train"]  # 3 Euler steps beat 2 by far on the low-noise metric
    # two Euler steps from sigma = 80 give blurred digits: far above the real-vs-real floor
    assert row["fd_digits"] > 2 * res["fd_digits_floor"]
    assert stem.with_suffix(".png").stat().st_size > 10_000 and "FD-digits" in stem.with_suffix(".md").read_text()
    assert main(["quality", "--model", "cifar", "--quiet"]) == 2
