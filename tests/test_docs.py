"""The front door and the documentation stay true: README's links and anchors resolve, its copy of the summary
table is the committed one, it stays short, and the parameter reference is what the code generates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imgclf.params_reference import render, schema_keys

ROOT = Path(__file__).resolve().parents[1]
FRONT = ["README.md", "CONTRIBUTING.md"]


def anchors(markdown: str) -> set[str]:
    """GitHub's (and MyST's) anchors of a Markdown file's headings, outside code blocks."""
    found, in_code = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} (.*)", line)
        if match:
            found.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("name", FRONT + [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "docs").glob("*.md"))])
def test_every_relative_link_and_anchor_resolves(name: str) -> None:
    path = ROOT / name
    text = path.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or name.startswith("docs/"), f"{name} links nowhere"
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{name}: {link} points to a missing file"
        if anchor:
            assert anchor in anchors(file.read_text(encoding="utf-8")), f"{name}: {link}: no such heading"


def test_readme_is_a_front_door_and_sends_readers_to_every_page() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md", "benchmarks.md", "contributing.md"}
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", text))
    assert pages <= linked, f"pages README does not link: {sorted(pages - linked)}"


def test_readme_quotes_the_committed_summary_table() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quoted = readme.split("<!-- summary:start -->\n")[1].split("<!-- summary:end -->")[0]
    summary = (ROOT / "plots/compare/summary.md").read_text(encoding="utf-8")
    table = "".join(line + "\n" for line in summary.splitlines() if line.startswith("|"))
    assert quoted.strip() == table.strip(), "copy plots/compare/summary.md's table into README (summary markers)"


def test_the_parameter_reference_is_generated_from_the_code() -> None:
    committed = (ROOT / "docs/params.md").read_text(encoding="utf-8")
    assert committed == render(ROOT), "run: python -m imgclf.params_reference --write docs/params.md"
    for key, _ in schema_keys():
        row = next(line for line in committed.splitlines() if line.startswith(f"| `{key}` |"))
        assert not row.endswith("|  |"), f"{key} has no comment in params.yaml"


def test_comments_are_read_as_yaml_writes_them() -> None:
    from imgclf.params_reference import comments

    tag = "  tag: x#y  # a value with a hash"
    lines = ["data:", '  root: "a#b"  # the folder', tag, " " * tag.index("# a") + "# and its continuation"]
    assert comments("\n".join(lines)) == {
        "data": "", "data.root": "the folder", "data.tag": "a value with a hash and its continuation"
    }  # fmt: skip
