"""No folder of the repository shadows an installed distribution.

A Python started in the repository root (``python -m pytest``, ``python -c``, a REPL) has the root first on
``sys.path``.  Each card folder therefore keeps its package in ``src/`` (pyproject.toml's package-dir): the
top-level ``kernels/`` and ``export/`` are no packages, so an installed ``kernels`` (HF's, which transformers >= 5.25
imports) or ``export`` wins over them (PEP 420: a regular package anywhere on the path beats a plain directory).
Putting an ``__init__.py`` back into a top-level folder makes every test here fail."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# setuptools needs setup.py in the root (the C++ extension); it is the one importable name the root holds.
ROOT_MODULES_ALLOWED = {"setup.py"}


def _tracked_top_level() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: cannot list the tracked files")
    return {name.split("/", 1)[0] for name in out.stdout.splitlines()}


def _folders() -> list[str]:
    return sorted(n for n in _tracked_top_level() if (ROOT / n).is_dir() and not n.startswith("."))


def _resolve_from_root(names: list[str], extra_path: Path | None = None, prelude: str = "") -> dict[str, str]:
    """Where ``import name`` resolves for each name, in a Python started in the repository root."""
    code = (f"{prelude}\nimport importlib\n"
            f"for n in {names!r}:\n"
            "    m = importlib.import_module(n)\n"
            "    print(n, getattr(m, '__file__', None) or list(getattr(m, '__path__', [])))\n")
    env = dict(os.environ)
    if extra_path is not None:  # after the root, where site-packages stands
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


def test_no_top_level_folder_or_module_is_importable():
    packages = [f for f in _folders() if (ROOT / f / "__init__.py").exists()]
    assert not packages, f"top-level folders that are packages and would shadow a distribution: {packages}"
    modules = sorted(n for n in _tracked_top_level() if n.endswith(".py"))
    assert set(modules) <= ROOT_MODULES_ALLOWED, f"top-level modules: {modules}"


def test_installed_distributions_named_like_our_folders_win_from_the_root(tmp_path):
    """A stub distribution per top-level folder name (kernels, export, engine, tests, ...) in a site directory of the
    test's: a Python started in the root imports every stub, none of our folders."""
    site = tmp_path / "site-packages"
    names = _folders()
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("STUB = True\n")
    where = _resolve_from_root(names, extra_path=site)
    wrong = {n: w for n, w in where.items() if not w.startswith(str(site))}
    assert not wrong, f"resolved to the checkout instead of the installed distribution: {wrong}"


def test_python_m_pytest_in_the_root_imports_the_installed_stub(tmp_path):
    """The README's own invocation (``python -m pytest`` in the root, pytest's default import mode) on a test file
    that imports ``kernels`` and ``export``: the installed stubs, not the card folders."""
    site = tmp_path / "site-packages"
    for name in ("kernels", "export"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("STUB = True\n")
    case = tmp_path / "case"
    case.mkdir()
    (case / "test_stub.py").write_text("import export\nimport kernels\n\n\ndef test_stub():\n"
                                       "    assert kernels.STUB and export.STUB, (kernels, export)\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(case / "test_stub.py")],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def test_transformers_and_peft_import_the_real_kernels_from_the_root():
    """The failure this guards against: transformers >= 5.25 imports HF's ``kernels``; from the root it must get it."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the HF 'kernels' distribution is not installed (the test extra's transformers >= 5.25 pulls it)")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    where = _resolve_from_root(["kernels", "transformers", "peft", "transformers.integrations.hub_kernels"])
    expected = Path(dist.locate_file("kernels")).resolve()
    assert Path(where["kernels"]).resolve().parent == expected, where
