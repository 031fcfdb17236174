"""FASTA sequences (plain or gzipped), with UniProt-style headers parsed when present.

``>sp|P00750|TPA_HUMAN Tissue-type plasminogen activator OS=Homo sapiens OX=9606 GN=PLAT PE=1 SV=1``
gives accession P00750, entry name TPA_HUMAN, name "Tissue-type plasminogen activator", organism,
taxon, existence level 1 and reviewed=True (``sp``; ``tr`` is unreviewed). Any other header keeps
its first word as the id and the rest as the description. Sequences are uppercased with gaps,
whitespace and a trailing ``*`` (a terminal stop) removed; validating the letters is the caller's
job. An internal ``*`` is kept: removing it would join the fragments on either side of a stop into
one spliced sequence, so the record reaches the caller with it and is skipped there
(:func:`data_shards.records.sequence_problem`: "internal stop '*' in sequence").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_shards.readers.uniprot import open_text

_UNIPROT_HEADER_RE = re.compile(r"^(sp|tr)\|([A-Za-z0-9_.-]+)\|(\S+)\s*(.*)$")
_KEY_RE = re.compile(r"\s(OS|OX|GN|PE|SV)=")


@dataclass
class FastaRecord:
    """One FASTA record.

    Attributes:
        id: the first word of the header (the accession for UniProt headers).
        description: the rest of the header.
        sequence: uppercase letters (may be empty for a header with no sequence).
        accession, entry_name, name, organism, taxon: parsed from UniProt headers, else "".
        existence: PE=1..5 from UniProt headers, else None.
        reviewed: True for ``sp|``, False for ``tr|``, None otherwise.
    """

    id: str
    description: str
    sequence: str
    accession: str = ""
    entry_name: str = ""
    name: str = ""
    organism: str = ""
    taxon: str = ""
    existence: int | None = None
    reviewed: bool | None = None


def _parse_header(header: str) -> FastaRecord:
    match = _UNIPROT_HEADER_RE.match(header)
    if not match:
        first, _, rest = header.partition(" ")
        return FastaRecord(id=first, description=rest.strip(), sequence="")
    db, accession, entry_name, rest = match.groups()
    fields: dict[str, str] = {}
    parts = _KEY_RE.split(" " + rest)
    name = parts[0].strip()
    for key, value in zip(parts[1::2], parts[2::2]):
        fields[key] = value.strip()
    existence = int(fields["PE"]) if fields.get("PE", "").isdigit() and 1 <= int(fields["PE"]) <= 5 else None
    return FastaRecord(
        id=accession,
        description=rest.strip(),
        sequence="",
        accession=accession,
        entry_name=entry_name,
        name=name,
        organism=fields.get("OS", ""),
        taxon=fields.get("OX", ""),
        existence=existence,
        reviewed=db == "sp",
    )


def iter_fasta(path: str | Path) -> Iterator[FastaRecord]:
    """Yield the records of a FASTA file in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: sequence lines before the first header, or an unreadable file (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: FASTA file not found")
    record: FastaRecord | None = None
    chunks: list[str] = []
    try:
        with open_text(path) as handle:
            for lineno, line in enumerate(handle, 1):
                line = line.strip()
                if not line or line.startswith(";"):
                    continue
                if line.startswith(">"):
                    if record is not None:
                        record.sequence = _clean("".join(chunks))
                        yield record
                    record, chunks = _parse_header(line[1:].strip()), []
                elif record is None:
                    raise ValueError(f"{path}:{lineno}: sequence data before the first '>' header")
                else:
                    chunks.append(line)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable FASTA file ({type(exc).__name__}: {exc})") from None
    if record is not None:
        record.sequence = _clean("".join(chunks))
        yield record


def _clean(sequence: str) -> str:
    """Uppercase letters without whitespace, gaps (``-``, ``.``) and a trailing stop; an internal
    ``*`` stays (see the module docstring)."""
    return re.sub(r"[\s\-.]", "", sequence).upper().rstrip("*")
