"""The README and docs/ link only to what exists: every relative link names a file of the
repository and, with an anchor, a heading in it; the README links to nothing outside the
repository, and stays short enough to read in the first hour."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"(?m)^#{1,6} (.+)$")
FENCE = re.compile(r"(?ms)^```.*?^```")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in HEADING.findall(text)}


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_relative_link_resolves() -> None:
    broken = []
    for doc in documents():
        text = FENCE.sub("", doc.read_text())
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto: checked below for the README
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
            elif ROOT not in dest.parents and dest != ROOT:
                broken.append(f"{doc.relative_to(ROOT)}: {target} (outside the repository)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_short_and_points_inside_the_repository() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 400
    outside = [t for t in LINK.findall(FENCE.sub("", text)) if re.match(r"^[a-z]+:", t)]
    assert outside == []
