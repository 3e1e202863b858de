"""The C ABI (cpp/include/edmrt.h) and its plan reader (cpp/plan_json.cpp) against engine/src/plan.py's: the plan-JSON
corpus of cpp/tests/corpus/ through both readers and a C host program, every solver's plan bit for bit, and the
ABI's errors on bad files and arguments (a message or an error code: no abort, no hang)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import edmrt
from edmrt.kernels import plan_table
from edmrt.lab.selfcheck import solver_plans

try:
    from edmrt import _core
except ImportError:  # a tree run without building the extension
    _core = None
needs_core = pytest.mark.skipif(_core is None, reason="the C++ core edmrt._core is not built")

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "cpp"
CORPUS = CPP / "tests" / "corpus"
HOSTS = ("plan_check", "capi_errors")


def _compiler():
    for cc in ("c++", "g++", "clang++"):
        if shutil.which(cc):
            return shutil.which(cc)
    return None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """cpp/tests/plan_check.cpp and capi_errors.cpp built against the core's sources (argument lists, no shell)."""
    if _compiler() is None:
        pytest.skip("no C++ compiler on PATH to build the C ABI test hosts")
    out = tmp_path_factory.mktemp("capi")
    core = [str(CPP / f) for f in ("philox.cpp", "step.cpp", "plan_json.cpp", "capi.cpp")]
    builds = {name: subprocess.Popen([_compiler(), "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-fopenmp",
                                      "-I", str(CPP / "include"), str(CPP / "tests" / f"{name}.cpp"), *core,
                                      "-o", str(out / name)], stderr=subprocess.PIPE, text=True)
              for name in HOSTS}
    for name, p in builds.items():
        _, err = p.communicate()
        assert p.returncode == 0, f"building {name} failed:\n{err}"
    return {name: out / name for name in HOSTS}


def _expected() -> dict[str, str]:
    """cpp/tests/corpus/expected.tsv: file name -> part of the C++ reader's message ("" for good_* files)."""
    rows = [line.split("\t") for line in (CORPUS / "expected.tsv").read_text().splitlines() if not line.startswith("#")]
    return {name: part for name, part in rows}


EXPECTED = _expected()
REFUSED = sorted(n for n in EXPECTED if not n.startswith("good_"))
GOOD = sorted(n for n in EXPECTED if n.startswith("good_"))


def _plan_check(exe, paths, timeout=120):
    """plan_check's verdicts: {path: (verdict, reason)}; its exit status must be 0 (no error code, no NaN)."""
    r = subprocess.run([str(exe), *map(str, paths)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    return {row[1]: (row[0], row[2] if len(row) > 2 else "") for row in rows}


def test_the_corpus_manifest_lists_every_file():
    files = {p.name for p in CORPUS.glob("*.json")}
    assert files == set(EXPECTED), sorted(files ^ set(EXPECTED))
    assert all(n.startswith(("good_", "bad_")) for n in files)
    assert all(EXPECTED[n] for n in REFUSED) and not any(EXPECTED[n] for n in GOOD)
    assert len(REFUSED) >= 30 and len(GOOD) >= 3


@needs_core
@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_document_fails_in_both_readers_with_its_reason(name):
    """engine/src/plan.py's Plan.load and the C++ reader both raise ValueError (the C++ message names the field or the
    JSON error): the two readers refuse the same documents."""
    data = (CORPUS / name).read_bytes()
    with pytest.raises(ValueError) as e:
        _core.plan_table_from_json(data)
    assert EXPECTED[name] in str(e.value)
    with pytest.raises(ValueError):
        edmrt.Plan.load(CORPUS / name)


@needs_core
@pytest.mark.parametrize("name", GOOD)
def test_a_good_document_gives_the_same_table_in_both_readers(name):
    plan = edmrt.Plan.load(CORPUS / name)
    got = _core.plan_table_from_json((CORPUS / name).read_bytes())
    assert got.tobytes() == plan_table(plan).numpy().tobytes()


def test_the_c_abi_host_refuses_each_refused_document_and_runs_each_good_one(hosts):
    verdicts = _plan_check(hosts["plan_check"], [CORPUS / n for n in sorted(EXPECTED)])
    for name, part in EXPECTED.items():
        verdict, reason = verdicts[str(CORPUS / name)]
        if name.startswith("good_"):
            assert verdict == "accepted", (name, reason)
        else:
            assert verdict == "rejected" and part in reason, (name, verdict, reason)


@needs_core
def test_every_solver_plan_is_read_bit_for_bit_by_both_readers_and_runs_through_the_c_abi(hosts, tmp_path):
    paths = []
    for name, plan in solver_plans():
        text = plan.to_json()
        assert edmrt.Plan.from_json(text) == plan
        assert _core.plan_table_from_json(text).tobytes() == plan_table(plan).numpy().tobytes(), name
        paths.append(tmp_path / f"{name}.json")
        plan.save(paths[-1])
    verdicts = _plan_check(hosts["plan_check"], paths)
    assert all(verdicts[str(p)] == ("accepted", "") for p in paths), verdicts


def _max_plan_bytes() -> int:
    header = (CPP / "include" / "edmrt.h").read_text()
    m = re.search(r"#define EDMRT_MAX_PLAN_BYTES \((\d+)u \* (\d+)u \* (\d+)u\)", header)
    assert m, "edmrt.h must define EDMRT_MAX_PLAN_BYTES"
    return int(m[1]) * int(m[2]) * int(m[3])


def test_plan_load_refuses_devices_fifos_directories_and_files_over_the_limit(hosts, tmp_path):
    """Issue 11, item 3: edmrt_plan_load("/dev/zero") read until std::bad_alloc escaped the C ABI and aborted the
    host.  Now a device, a FIFO (never opened: no hang) or a directory is refused, and a regular file is read up to
    EDMRT_MAX_PLAN_BYTES; a plan padded to exactly the limit still loads."""
    limit = _max_plan_bytes()
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    over = tmp_path / "over.json"
    with open(over, "wb") as f:
        f.truncate(limit + 1)  # sparse: no disk used
    at_limit = tmp_path / "at_limit.json"
    text = edmrt.plan("heun", edmrt.make_sigmas("karras", 3)).to_json(indent=None).encode()
    at_limit.write_bytes(text + b" " * (limit - len(text)))
    verdicts = _plan_check(hosts["plan_check"], ["/dev/zero", fifo, tmp_path, over, tmp_path / "missing.json",
                                                 at_limit], timeout=60)
    assert verdicts["/dev/zero"] == ("rejected", "plan file /dev/zero is not a regular file")
    assert verdicts[str(fifo)] == ("rejected", f"plan file {fifo} is not a regular file")
    assert verdicts[str(tmp_path)] == ("rejected", f"plan file {tmp_path} is not a regular file")
    assert verdicts[str(over)] == ("rejected", f"plan file {over} is larger than EDMRT_MAX_PLAN_BYTES (64 MiB)")
    assert verdicts[str(tmp_path / "missing.json")][1].startswith(f"cannot open plan file {tmp_path / 'missing.json'}")
    assert verdicts[str(at_limit)] == ("accepted", "")


def test_every_c_abi_function_returns_its_error_instead_of_aborting(hosts, tmp_path):
    """NULL pointers, batch or per_sample < 1, sizes that overflow, stages out of range, bad files and short error
    buffers: each function returns NULL with a message, -1 or its EDMRT_ERR_* code (cpp/tests/capi_errors.cpp)."""
    plan = tmp_path / "plan.json"
    edmrt.plan("dpmpp_2m", edmrt.make_sigmas("karras", 4), edmrt.EDMPrecond()).save(plan)
    r = subprocess.run([str(hosts["capi_errors"]), str(plan)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("0 failed"), r.stdout + r.stderr


@needs_core
def test_a_learned_plan_is_read_bit_for_bit_and_runs_through_the_c_abi(hosts, tmp_path):
    """edmrt.optimize_solver's plan (levels and weights fitted, a free first level, shifted evaluation levels) is an
    ordinary plan to the C ABI: the same table in both readers, accepted and run by the C host."""
    from edmrt.models.gmm import GaussianMixture

    opt = edmrt.optimize_solver(GaussianMixture.random(K=3, D=8, seed=4), 4, (8,), budget=20_000, samples=32,
                                heldout=16, warm_samples=16, reference_nfe=20)
    text = opt.plan.to_json()
    assert _core.plan_table_from_json(text).tobytes() == plan_table(opt.plan).numpy().tobytes()
    path = opt.save(tmp_path / "learned.json")
    assert _plan_check(hosts["plan_check"], [path])[str(path)] == ("accepted", "")
