"""The documentation's links resolve: every algorithm file's line-1 link names a heading of
README.md, and every relative markdown link in README.md and benchmarks/ points at a file that
exists (and at a heading of it, for .md)."""

import re
from pathlib import Path

import pytest
from conftest import ALGORITHMS, REPO_ROOT

LINE_1 = re.compile(r"# docs and experiment results can be found at README\.md#([\w-]+)$")
README_ANCHOR = re.compile(r"README\.md#([\w-]+)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "benchmarks").rglob("*.md"))]


def prose(text: str) -> str:
    """The markdown without fenced code blocks
    (a `# comment` in a bash block is no heading) and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", lambda m: m.group(0).strip("`"), text)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading:
    markup gone, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    found, times = set(), {}
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = anchor(match.group(1))
            found.add(f"{base}-{times[base]}" if base in times else base)
            times[base] = times.get(base, 0) + 1
    return found


def test_anchor_follows_github_rules():
    assert anchor("Clip-Cov and KL-Cov") == "clip-cov-and-kl-cov"
    assert anchor("Speed, memory and several GPUs") == "speed-memory-and-several-gpus"
    assert anchor("Runs, tracking, offline use") == "runs-tracking-offline-use"
    assert anchor("Results (mean ± std over seeds 1-3)") == "results-mean--std-over-seeds-1-3"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_line_1_link_names_a_readme_heading(name):
    first_line = (REPO_ROOT / "algorithms" / f"{name}.py").read_text().splitlines()[0]
    match = LINE_1.match(first_line)
    assert match, f"{name}.py line 1: {first_line!r}"
    assert match.group(1) in anchors(REPO_ROOT / "README.md"), (
        f"{name}.py line 1: no README heading #{match.group(1)}")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_readme_anchor_in_an_algorithm_file_resolves(name):
    cited = set(README_ANCHOR.findall((REPO_ROOT / "algorithms" / f"{name}.py").read_text()))
    assert cited and cited <= anchors(REPO_ROOT / "README.md"), (
        sorted(cited - anchors(REPO_ROOT / "README.md")))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not checked offline
            continue
        path_part, _, fragment = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(REPO_ROOT)}: {broken}"
