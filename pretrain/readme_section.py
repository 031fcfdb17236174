"""Rewrite one generated section of a Markdown file between two marker comments."""

from __future__ import annotations

from pathlib import Path


def replace_section(readme: Path, section: str, begin: str, end: str, heading: str) -> None:
    """Replace the text from ``begin`` to ``end`` (markers included) with ``section``, which must
    carry both markers; without markers, append ``heading`` and ``section`` at the end.

    Raises:
        ValueError: ``begin`` is present without a following ``end``.
    """
    text = readme.read_text()
    if begin in text:
        start = text.index(begin)
        if end not in text[start:]:
            raise ValueError(f"{readme}: '{begin}' without '{end}'")
        stop = text.index(end, start) + len(end)
        text = text[:start] + section + text[stop:]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + section + "\n"
    readme.write_text(text)
