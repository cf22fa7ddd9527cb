"""The error pages, offline: ``connguard explain <name>`` and ``err.explain()``.

The pages are ``docs/errors/*.md``, shipped in the wheel as package data
(``connguard/errors_docs`` is a link to that directory in the repository, so the published
docs and the installed pages are one set of files). A page's name is its file name without
``.md`` (``access-denied``), the ``docs`` attribute of the exception it describes.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import List

PAGES = Path(__file__).resolve().parent / "errors_docs"
_INDEX = "index"


def names() -> List[str]:
    """Every page's name, sorted (the overview, ``index``, is not one)."""
    return sorted(path.stem for path in PAGES.glob("*.md") if path.stem != _INDEX)


def page(name: str) -> str:
    """The text of page ``name`` (``index``: the overview); ValueError naming the pages."""
    known = names()
    if name not in known and name != _INDEX:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"no error page named {name!r}; {hint}the pages: {', '.join(known)}")
    return (PAGES / f"{name}.md").read_text(encoding="utf-8")


def command(name: str) -> str:
    """The command that prints page ``name``, as messages name it."""
    return f"connguard explain {name}"
