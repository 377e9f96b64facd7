"""Every relative link and image in README.md and docs/**/*.md points at a file that exists, and
every #anchor at a heading of its target, named by GitHub's slug rules. Links inside fenced code
blocks and inline code are not links; http(s), mailto and other URLs with a scheme are not
checked."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
# A code span ends at the same run of backticks, within its paragraph.
INLINE_CODE = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# [text](target) and ![alt](target); the text may hold one level of brackets and line breaks,
# the target may be <wrapped> and followed by a "title".
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>\n]*>|[^\s()]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>\n]*>|\S+)", re.M)
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*?(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files(root: Path) -> list[Path]:
    """README.md and every markdown file under docs/."""
    readme = root / "README.md"
    return ([readme] if readme.exists() else []) + sorted((root / "docs").rglob("*.md"))


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(text: str) -> str:
    """The text with fenced code blocks, inline code and HTML comments blanked out (newlines and
    lengths kept, so offsets still give line numbers)."""
    lines = text.split("\n")
    fence: str | None = None
    for i, line in enumerate(lines):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                lines[i] = " " * len(line)
        else:
            lines[i] = " " * len(line)
            # a closing fence: the same character, at least as many, nothing after it
            run = match.group(1) if match else ""
            if run[:1] == fence[0] and len(run) >= len(fence) and not line.strip().lstrip(run[0]):
                fence = None
    text = "\n".join(lines)
    text = HTML_COMMENT.sub(_blank, text)
    return INLINE_CODE.sub(_blank, text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (inline markup dropped), lowercased, punctuation
    removed except hyphens and underscores, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a markdown file offers: heading slugs (repeats get -1, -2, ...) and explicit
    <a name=...>/<a id=...>."""
    lines = prose(path.read_text(encoding="utf-8")).split("\n")
    raw = path.read_text(encoding="utf-8").split("\n")
    seen: dict[str, int] = {}
    found: set[str] = set()
    for i, line in enumerate(lines):
        heading = None
        match = ATX_HEADING.match(line)
        if match and raw[i].lstrip().startswith("#"):
            heading = raw[i].strip().lstrip("#").strip()
            heading = re.sub(r"[ \t]+#+[ \t]*$", "", heading)
        elif (
            i + 1 < len(lines)
            and line.strip()
            and SETEXT_UNDERLINE.match(lines[i + 1])
            and not ATX_HEADING.match(line)
            and (i == 0 or not lines[i - 1].strip() or SETEXT_UNDERLINE.match(lines[i - 1]))
        ):
            heading = raw[i].strip()
        if heading is not None:
            base = slug(heading)
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    found.update(HTML_ANCHOR.findall("\n".join(lines)))
    return found


def links(path: Path) -> list[tuple[int, str, str]]:
    """(line number, link as written, target) of every inline link, image and reference
    definition outside code."""
    raw = path.read_text(encoding="utf-8")
    text = prose(raw)
    found = []
    for pattern in (INLINE_LINK, REFERENCE_DEFINITION):
        match = pattern.search(text)
        while match:
            written = " ".join(raw[match.start() : match.end()].split())
            found.append((match.start(), written, match.group(1).strip("<>")))
            # on from inside this match, so an image inside a link's text is found too
            match = pattern.search(text, match.start() + (2 if written[0] == "!" else 1))
    return [
        (text.count("\n", 0, start) + 1, written, target)
        for start, written, target in sorted(found)
    ]


def broken_links(root: Path, files: list[Path] | None = None) -> list[str]:
    """One message per relative link whose file or #anchor does not resolve: 'file:line: link:
    why'."""
    root = root.resolve()
    cache: dict[Path, set[str]] = {}
    problems = []
    for path in files if files is not None else markdown_files(root):
        name = path.resolve().relative_to(root).as_posix()
        for line, written, target in links(path):
            if SCHEME.match(target) or target.startswith("//"):
                continue
            file_part, _, anchor = target.partition("#")
            file_part = unquote(file_part)
            if not file_part:
                resolved = path.resolve()
            elif file_part.startswith("/"):
                resolved = (root / file_part.lstrip("/")).resolve()
            else:
                resolved = (path.parent / file_part).resolve()
            where = f"{name}:{line}: {written}"
            if not resolved.is_relative_to(root):
                problems.append(f"{where}: points outside the repository")
                continue
            if not resolved.exists():
                problems.append(f"{where}: {resolved.relative_to(root).as_posix()} does not exist")
                continue
            if anchor and resolved.is_file() and resolved.suffix.lower() == ".md":
                if resolved not in cache:
                    cache[resolved] = anchors(resolved)
                if unquote(anchor) not in cache[resolved]:
                    problems.append(
                        f"{where}: no heading with anchor #{anchor} in "
                        f"{resolved.relative_to(root).as_posix()}"
                    )
    return problems


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    files = markdown_files(REPO)
    assert REPO / "README.md" in files and len(files) > 1
    problems = broken_links(REPO, files)
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


def test_github_slugs():
    assert slug("Re-runs: the cache, resuming, failures") == "re-runs-the-cache-resuming-failures"
    assert slug("Looking at runs: `flywheel ui`") == "looking-at-runs-flywheel-ui"
    assert slug("What `make run` does") == "what-make-run-does"
    assert slug("Snake_case and  two spaces") == "snake_case-and--two-spaces"
    assert slug("See [the data](data.md) **now**") == "see-the-data-now"
    assert slug("Größe & Ümlaut") == "größe--ümlaut"


def test_a_broken_link_or_anchor_is_reported_with_file_and_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "src.py").write_text("")
    (tmp_path / "README.md").write_text(
        "# Title\n"
        "\n"
        "## Part\n"
        "\n"
        "## Part\n"
        "\n"
        "Fine: [a](docs/a.md), [b](docs/a.md#the-topic), [c](#part-1), [d](src.py),\n"
        "[e](https://example.com/missing.md), [f](mailto:x@example.com), [g](docs/).\n"
        "Broken: [missing file](docs/nope.md) and [bad anchor](docs/a.md#nope)\n"
        "and [no third part](#part-2), ![image](docs/images/x.png).\n"
        "\n"
        "```\n"
        "[ignored in a fence](docs/absent.md)\n"
        "```\n"
        "\n"
        "`[ignored inline](docs/absent.md)` and a link split [over\n"
        "two lines](docs/gone.md). [![badge](docs/badge.svg)](docs/a.md)\n"
    )
    (tmp_path / "docs" / "a.md").write_text(
        "# The `topic`\n\nBack to the [README](../README.md#title), [out](../../elsewhere.md).\n"
    )
    problems = broken_links(tmp_path)
    assert problems == [
        "README.md:9: [missing file](docs/nope.md): docs/nope.md does not exist",
        "README.md:9: [bad anchor](docs/a.md#nope): no heading with anchor #nope in docs/a.md",
        "README.md:10: [no third part](#part-2): no heading with anchor #part-2 in README.md",
        "README.md:10: ![image](docs/images/x.png): docs/images/x.png does not exist",
        "README.md:16: [over two lines](docs/gone.md): docs/gone.md does not exist",
        "README.md:17: ![badge](docs/badge.svg): docs/badge.svg does not exist",
        "docs/a.md:3: [out](../../elsewhere.md): points outside the repository",
    ]
