"""The README and docs/ point only at things that exist: every relative Markdown link or image resolves, every
docs/*.md is linked from the README, every backticked repository path names a file or folder of the tree, and the
README stays a short front door that opens with its two set-up commands."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 20_000
# Top-level folders whose backticked paths are checked (relative to the repository root).
TRACKED_FOLDERS = ("engine/", "kernels/", "export/", "cpp/", "tests/", "benchmarks/", "docs/", ".ci/")

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.M | re.S)
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_BRACES = re.compile(r"\{([^{}]*)\}")


def _docs() -> list[Path]:
    return sorted((ROOT / "docs").glob("*.md"))


def _markdown_files() -> list[Path]:
    return [README, *_docs()]


def _prose(text: str) -> str:
    """The text with fenced code blocks removed (their brackets and backticks are code, not links or paths)."""
    return _FENCE.sub("", text)


def _is_external(target: str) -> bool:
    return target.startswith(("http:", "https:", "mailto:", "#"))


def broken_links(text: str, folder: Path) -> list[str]:
    """The relative link and image targets in ``text`` that do not resolve from ``folder`` (fragments dropped)."""
    bad = []
    for target in _LINK.findall(_prose(text)):
        target = target.strip("<>")
        if _is_external(target):
            continue
        path = target.split("#", 1)[0]
        if not path or not (folder / path).exists():
            bad.append(target)
    return bad


def expand_braces(token: str) -> list[str]:
    """Shell brace expansion: ``a/{b,c}.md`` -> ``a/b.md``, ``a/c.md`` (nested and repeated groups too)."""
    m = _BRACES.search(token)
    if not m:
        return [token]
    out = []
    for alt in m.group(1).split(","):
        out += expand_braces(token[:m.start()] + alt + token[m.end():])
    return out


def repository_paths(text: str) -> list[str]:
    """The backticked tokens of ``text``'s prose that name a path under one of the tracked top-level folders."""
    paths = []
    for token in _CODE_SPAN.findall(_prose(text)):
        token = token.strip()
        if not token.startswith(TRACKED_FOLDERS) or any(s in token for s in (" ", "*", "<", "...")):
            continue
        token = re.sub(r"::[\w\[\]\-.]+$", "", token)  # tests/test_x.py::test_name
        token = re.sub(r":\d+$", "", token)  # file.py:LINE
        paths += expand_braces(token)
    return paths


def missing_paths(text: str, root: Path = ROOT) -> list[str]:
    return [p for p in repository_paths(text) if not (root / p).exists()]


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(md: Path):
    bad = broken_links(md.read_text(), md.parent)
    assert not bad, f"{md.relative_to(ROOT)} links to missing files: {bad}"


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_backticked_repository_path_exists(md: Path):
    bad = missing_paths(md.read_text())
    assert not bad, f"{md.relative_to(ROOT)} names repository paths that do not exist: {bad}"


def test_every_doc_is_linked_from_the_readme():
    assert _docs(), "docs/ holds no Markdown file"
    linked = {(ROOT / t.split("#", 1)[0]).resolve() for t in _LINK.findall(_prose(README.read_text()))
              if not _is_external(t)}
    unlinked = [str(d.relative_to(ROOT)) for d in _docs() if d.resolve() not in linked]
    assert not unlinked, f"README.md does not link to: {unlinked}"


def test_the_readme_is_a_short_front_door():
    size = README.stat().st_size
    assert size < README_MAX_BYTES, f"README.md is {size} bytes (limit {README_MAX_BYTES}): move details to docs/"


def test_the_readme_opens_with_the_install_and_the_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README.md must open with two ```bash blocks"
    assert blocks[0].strip().endswith("edmrt sample"), f"README.md's first bash block: {blocks[0]!r}"
    assert "pytest" in blocks[1], f"README.md's second bash block: {blocks[1]!r}"


def test_the_checkers_report_what_is_missing(tmp_path: Path):
    """The helpers above fail on broken references (so a passing run means something)."""
    (tmp_path / "real.md").write_text("x")
    (tmp_path / "sub").mkdir()
    text = ("[ok](real.md) [ok too](real.md#part) ![img](sub) [web](https://example.com) [here](#anchor)\n"
            "[gone](no/such/file.md) ![gone too](missing.png#x)\n"
            "```\n[in code](not/checked.md)\n```\n")
    assert broken_links(text, tmp_path) == ["no/such/file.md", "missing.png#x"]

    text = ("`tests/test_docs_links.py::test_the_readme_is_a_short_front_door` `tests/test_layout.py:12` "
            "`benchmarks/results/quality_gmm.{md,png}` `docs/` `tests/*.py` `tests/a b` `tests/<name>.py` "
            "`tests/...` `engine_cpu.py` `benchmarks/results/no_such.{md,png}` `.ci/nothing`\n"
            "```\n`tests/in_code_block.py`\n```\n")
    assert repository_paths(text) == [
        "tests/test_docs_links.py", "tests/test_layout.py", "benchmarks/results/quality_gmm.md",
        "benchmarks/results/quality_gmm.png", "docs/", "benchmarks/results/no_such.md",
        "benchmarks/results/no_such.png", ".ci/nothing"]
    assert missing_paths(text) == ["benchmarks/results/no_such.md", "benchmarks/results/no_such.png", ".ci/nothing"]
    assert expand_braces("a/{b,c}/{d,e}.md") == ["a/b/d.md", "a/b/e.md", "a/c/d.md", "a/c/e.md"]
