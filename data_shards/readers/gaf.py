"""GO annotation files, GAF 2.x (``.gaf`` / ``.gaf.gz`` / UniProt-GOA ``GO.goa_*.gz``).

Each data line is one (protein, GO term) annotation with 15-17 tab-separated columns; header lines
start with ``!``. Annotations whose qualifier contains ``NOT`` state that the protein does *not*
have the function and are dropped (they must never become positive labels). Evidence codes (IDA,
IEA, ...) are kept per annotation so the builder can record them and filter by them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.readers.uniprot import open_text

EXPERIMENTAL_EVIDENCE = frozenset({"EXP", "IDA", "IPI", "IMP", "IGI", "IEP", "HTP", "HDA", "HMP", "HGI", "HEP"})
CURATED_EVIDENCE = EXPERIMENTAL_EVIDENCE | {"TAS", "IC"}


@dataclass
class GafAnnotation:
    """One GAF line: ``db``, ``accession``, ``symbol``, ``qualifier``, ``go_id``, ``evidence``,
    ``aspect`` ("F"/"P"/"C"), ``name`` (DB object name), ``taxon`` (first taxon id, digits only)."""

    db: str
    accession: str
    symbol: str
    qualifier: str
    go_id: str
    evidence: str
    aspect: str
    name: str
    taxon: str


@dataclass
class GafProtein:
    """All positive annotations of one protein: ``terms`` is [(go_id, aspect, evidence)] in file order."""

    accession: str
    name: str = ""
    symbol: str = ""
    taxon: str = ""
    terms: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def evidence_codes(self) -> list[str]:
        """Sorted distinct evidence codes."""
        return sorted({evidence for _, _, evidence in self.terms})


def iter_gaf(path: str | Path, skipped: dict | None = None) -> Iterator[GafAnnotation]:
    """Yield the positive annotations of a GAF 2.x file in file order (NOT-qualified ones dropped).

    Args:
        path: the file (plain or gzipped).
        skipped: optional dict; counts of dropped lines by reason are added to it
            ("NOT qualifier", "malformed GAF line").

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, or no GAF line at all among the first 1,000 (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GAF file not found")
    skipped = skipped if skipped is not None else {}
    seen_data = False
    try:
        with open_text(path) as handle:
            for lineno, line in enumerate(handle, 1):
                if line.startswith("!") or not line.strip():
                    continue
                cols = line.rstrip("\n").split("\t")
                if len(cols) < 15 or not cols[4].startswith("GO:") or cols[8] not in ("F", "P", "C"):
                    skipped["malformed GAF line"] = skipped.get("malformed GAF line", 0) + 1
                    if not seen_data and lineno > 1000:
                        raise ValueError(f"{path}: no GAF 2.x line in the first 1,000 lines")
                    continue
                seen_data = True
                if "NOT" in cols[3].split("|"):
                    skipped["NOT qualifier"] = skipped.get("NOT qualifier", 0) + 1
                    continue
                taxon = cols[12].split("|")[0].removeprefix("taxon:")
                yield GafAnnotation(
                    db=sys.intern(cols[0]),
                    accession=cols[1],
                    symbol=cols[2],
                    qualifier=cols[3],
                    go_id=sys.intern(cols[4]),
                    evidence=sys.intern(cols[6]),
                    aspect=sys.intern(cols[8]),
                    name=cols[9],
                    taxon=sys.intern(taxon),
                )
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable GAF file ({type(exc).__name__}: {exc})") from None


def load_gaf(
    paths: Iterable[str | Path], evidence: Iterable[str] | None = None, skipped: dict | None = None
) -> dict[str, GafProtein]:
    """Group the positive annotations of several GAF files by accession.

    Args:
        paths: GAF files, read in order.
        evidence: keep only these evidence codes (default: all).
        skipped: optional dict of dropped-line counts by reason (see :func:`iter_gaf`).

    Returns:
        {accession: GafProtein}; a (term, evidence) pair is listed once per protein.
    """
    wanted = frozenset(evidence) if evidence is not None else None
    proteins: dict[str, GafProtein] = {}
    for path in paths:
        for ann in iter_gaf(path, skipped):
            if wanted is not None and ann.evidence not in wanted:
                continue
            protein = proteins.get(ann.accession)
            if protein is None:
                protein = proteins[ann.accession] = GafProtein(ann.accession, ann.name, ann.symbol, ann.taxon)
            term = (ann.go_id, ann.aspect, ann.evidence)
            if term not in protein.terms:  # per-protein lists are short: a linear check is cheap
                protein.terms.append(term)
    return proteins
