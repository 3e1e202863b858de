import dataclasses
import json
import math

import numpy as np
import pytest

import edmrt
from edmrt import Plan


def _all_plans():
    s = edmrt.make_sigmas("karras", 9)
    yield edmrt.plan("heun", s)
    yield edmrt.plan("edm", s, edmrt.EDMPrecond(), S_churn=30.0, S_tmin=0.01, S_tmax=20.0, S_noise=1.007)
    yield edmrt.plan("edm", s, S_churn=10.0)  # S_tmax = inf: JSON has no Inf
    yield edmrt.plan("dpmpp_2m", edmrt.make_sigmas("vp", 7), edmrt.VPPrecond())
    yield edmrt.plan("euler", edmrt.make_sigmas("iddpm", 5, sigma_max=81.0), edmrt.IDDPMPrecond())


@pytest.mark.parametrize("p", list(_all_plans()), ids=lambda p: p.solver)
def test_json_round_trip_is_exact(p, tmp_path):
    q = Plan.from_json(p.to_json())
    assert q == p
    for k in ("sigma", "c_noise", "b", "n"):
        assert getattr(q, k).tobytes() == getattr(p, k).tobytes()  # bit for bit
    p.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == p
    assert q.options == p.options and q.precond == p.precond


def test_plan_is_frozen_and_read_only():
    p = edmrt.plan("heun", edmrt.make_sigmas("karras", 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.sigma = p.sigma  # frozen dataclass
    with pytest.raises(ValueError, match="read-only"):
        p.b[0, 0] = 1.0  # read-only array
    for name in ("sigmas", "sigma", "c_in", "c_noise", "c_skip", "c_out", "alpha", "beta", "a", "e", "n", "step",
                 "commit"):
        assert not getattr(p, name).flags.writeable, name
    alpha = np.array(p.alpha)  # a writable array handed to the constructor: the plan keeps its own copy
    q = Plan(**{**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)}, "alpha": alpha})
    alpha[0] = 123.0
    assert q.alpha[0] == p.alpha[0] and q == p


def test_table_lists_every_stage():
    p = edmrt.plan("heun", edmrt.make_sigmas("karras", 18), edmrt.EDMPrecond())
    t = p.table()
    lines = t.splitlines()
    assert "NFE=35" in lines[0] and "precond=edm" in lines[0]
    assert len(lines) == 3 + 35
    assert lines[3].split()[2] == f"{80.0:.6g}"
    assert lines[-1].split()[-1] == "yes" and lines[3].split()[-1] == "no"


def _dict():
    return json.loads(edmrt.plan("heun", edmrt.make_sigmas("karras", 3)).to_json())


def _with(**kw):
    d = _dict()
    d.update(kw)
    return d


BAD = [
    (_with(format="other"), "format"),
    (_with(version=99), "version"),
    ({k: v for k, v in _dict().items() if k != "alpha"}, "lacks field"),
    (_with(extra=1), "unknown field"),
    (_with(alpha=[1.0, 2.0]), r"Plan.alpha must have shape \(5,\)"),
    (_with(sigma=[80.0, 0.0, 1.0, 0.5, 0.1]), "Plan.sigma must be > 0"),
    (_with(n=[0.0, -1.0, 0.0, 0.0, 0.0]), "noise scales"),
    (_with(commit=[True, True, True, True, False]), "last stage must commit"),
    (_with(b=[[1.0, 0.5], [0, 0], [0, 0], [0, 0], [0, 0]]), "history before stage 0"),
    (_with(sigmas=[80.0, 1.0, 0.5, -0.1]), "end in 0"),
    (_with(step=[0, 0, 2, 1, 2]), "non-decreasing"),
    (_with(n_init=-1.0), "n_init"),
    (_with(c_in=[1.0, float("inf"), 1.0, 1.0, 1.0]), "finite"),
]


@pytest.mark.parametrize("d,match", BAD, ids=[m for _, m in BAD])
def test_malformed_plans_are_rejected(d, match):
    with pytest.raises(ValueError, match=match):
        Plan.from_dict(d)


def test_malformed_json_text():
    with pytest.raises(ValueError, match="malformed"):
        Plan.from_json('{"format": "edmrt.plan", ')
    with pytest.raises(ValueError, match="JSON object"):
        Plan.from_json("[1, 2]")
    with pytest.raises(ValueError, match="NaN is not a JSON number"):
        Plan.from_json(json.dumps(_with(alpha=[math.nan] * 5)))  # json.dumps writes NaN, which JSON does not have
    with pytest.raises(ValueError, match="Plan.alpha must be finite"):
        Plan.from_dict(_with(alpha=[math.nan] * 5))
