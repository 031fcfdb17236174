"""UniProtKB entries: flat files (``.dat``/``.txt``, many entries per file) and UniProt XML.

Both formats (plain or gzipped, told apart by content) stream into :class:`UniProtEntry`: primary
and secondary accessions, entry name, recommended (or submitted) protein name, sequence, the
free-text FUNCTION, SUBCELLULAR LOCATION and SIMILARITY comments, GO cross-references (id, aspect,
term name, evidence code), EC numbers, protein existence level (1 = evidence at protein level ...
5 = uncertain), organism and NCBI taxon, and whether the entry is reviewed (Swiss-Prot).

Free text is cleaned the way ProtST/ProtCLIP feed it to a text encoder: evidence tags
(``{ECO:0000269|PubMed:123}``), literature pointers (``(PubMed:123, PubMed:456)``) and the
``-!- TOPIC:`` headers are removed, whitespace is collapsed.

XML is read with ``xml.etree.ElementTree.iterparse`` one ``<entry>`` at a time (memory stays flat
for any file size); expat >= 2.4.1, which ships with supported Pythons, refuses entity-expansion
bombs.
"""

from __future__ import annotations

import gzip
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

EXISTENCE_LEVELS = {
    "evidence at protein level": 1,
    "evidence at transcript level": 2,
    "inferred from homology": 3,
    "predicted": 4,
    "uncertain": 5,
}
_EVIDENCE_TAG_RE = re.compile(r"\s*\{ECO:[^}]*\}")
_PUBMED_RE = re.compile(r"\s*\((?:PubMed|Ref\.)[^()]*\)")
_SPACE_RE = re.compile(r"\s+")
_DOUBLE_STOP_RE = re.compile(r"(?<!\.)\.\.(?!\.)")
_EC_RE = re.compile(r"^\d+\.(\d+|-)\.(\d+|-)\.(n?\d+|-)$")
_GO_ID_RE = re.compile(r"^GO:\d{7}$")
_NS = "{http://uniprot.org/uniprot}"


class UniProtFormatError(ValueError):
    """A UniProt file cannot be read; the message names the file."""


@dataclass
class GoRef:
    """A GO cross-reference of an entry: id, aspect ("F"/"P"/"C" or ""), term name, evidence code."""

    id: str
    aspect: str = ""
    name: str = ""
    evidence: str = ""


@dataclass
class UniProtEntry:
    """One UniProtKB entry; text fields are "" when absent.

    Attributes:
        accession: primary accession.
        accessions: all accessions, primary first.
        entry_name: "HLAA_HUMAN".
        name: recommended full name (submitted name for unreviewed entries).
        sequence: canonical sequence or None.
        function, location, similarity: cleaned free text of those comments.
        go: GO cross-references.
        ec: EC numbers (valid "a.b.c.d" forms only).
        existence: protein existence level 1-5, or None.
        organism: scientific name; taxon: NCBI taxon id as a string.
        reviewed: True for Swiss-Prot, False for TrEMBL, None when unknown.
        annotation_score: UniProt annotation score when the source gives one.
    """

    accession: str
    accessions: tuple[str, ...] = ()
    entry_name: str = ""
    name: str = ""
    sequence: str | None = None
    function: str = ""
    location: str = ""
    similarity: str = ""
    go: list[GoRef] = field(default_factory=list)
    ec: list[str] = field(default_factory=list)
    existence: int | None = None
    organism: str = ""
    taxon: str = ""
    reviewed: bool | None = None
    annotation_score: float | None = None


def clean_text(text: str) -> str:
    """Drop evidence tags and PubMed pointers, collapse whitespace."""
    text = _EVIDENCE_TAG_RE.sub("", text)
    text = _PUBMED_RE.sub("", text)
    text = _SPACE_RE.sub(" ", text).strip()
    text = text.replace(" .", ".").replace(" ,", ",")
    return _DOUBLE_STOP_RE.sub(".", text)


def existence_level(value: str | int | None) -> int | None:
    """Map "1: Evidence at protein level", "Evidence at protein level", "1" or 1 to 1..5; else None."""
    if value is None:
        return None
    if isinstance(value, int):
        return value if 1 <= value <= 5 else None
    text = str(value).strip().rstrip(";").strip()
    match = re.match(r"^([1-5])\b", text)
    if match:
        return int(match.group(1))
    return EXISTENCE_LEVELS.get(text.lower())


def valid_ec(values) -> list[str]:
    """EC numbers that look like "a.b.c.d" (partial "-" allowed), deduplicated in order."""
    out: list[str] = []
    for value in values:
        value = value.strip().removeprefix("EC ").strip()
        if _EC_RE.match(value) and value not in out:
            out.append(value)
    return out


def open_text(path: str | Path):
    """Open a text file, gunzipping when it starts with the gzip magic bytes."""
    path = Path(path)
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _is_xml(path: Path) -> bool:
    with open_text(path) as handle:
        head = handle.read(512).lstrip()
    return head.startswith("<")


def iter_uniprot(path: str | Path) -> Iterator[UniProtEntry]:
    """Yield the entries of a UniProt flat file or XML file (format told by content).

    Raises:
        FileNotFoundError: no such file.
        UniProtFormatError: unreadable or malformed file (the message names it and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: UniProt file not found")
    try:
        if _is_xml(path):
            yield from _iter_xml(path)
        else:
            yield from _iter_flat(path)
    except (OSError, EOFError, ET.ParseError) as exc:
        raise UniProtFormatError(f"{path}: unreadable UniProt file ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- flat file


def _iter_flat(path: Path) -> Iterator[UniProtEntry]:
    lines: list[str] = []
    start = 1
    with open_text(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if line.startswith("//"):
                if lines:
                    entry = _parse_flat(lines, f"{path}:{start}")
                    if entry is not None:
                        yield entry
                lines, start = [], lineno + 1
            else:
                lines.append(line.rstrip("\n"))
    if any(line.startswith("ID ") for line in lines):
        raise UniProtFormatError(f"{path}:{start}: entry not terminated by '//' (truncated file?)")


def _parse_flat(lines: list[str], where: str) -> UniProtEntry | None:
    accessions: list[str] = []
    entry_name, reviewed = "", None
    de_lines, comments, seq_parts = [], [], []
    go, ec, existence, organism, taxon = [], [], None, [], ""
    in_seq = False
    for line in lines:
        tag, body = line[:2], line[5:]
        if in_seq:
            seq_parts.append(line.replace(" ", ""))
        elif tag == "ID":
            parts = body.split()
            entry_name = parts[0] if parts else ""
            reviewed = True if "Reviewed;" in body else False if "Unreviewed;" in body else None
        elif tag == "AC":
            accessions.extend(a.strip() for a in body.split(";") if a.strip())
        elif tag == "DE":
            de_lines.append(body)
        elif tag == "OS":
            organism.append(body.strip())
        elif tag == "OX":
            match = re.search(r"NCBI_TaxID=(\d+)", body)
            if match and not taxon:
                taxon = match.group(1)
        elif tag == "CC":
            comments.append(body)
        elif tag == "DR" and body.startswith("GO;"):
            parts = [p.strip() for p in body.rstrip(".").split(";")]
            if len(parts) >= 3 and _GO_ID_RE.match(parts[1]):
                aspect, _, term = parts[2].partition(":")
                evidence = parts[3].split(":")[0] if len(parts) > 3 else ""
                go.append(GoRef(parts[1], aspect if aspect in ("F", "P", "C") else "", term, evidence))
        elif tag == "PE":
            existence = existence_level(body)
        elif tag == "SQ":
            in_seq = True
    if not accessions:
        if entry_name:
            raise UniProtFormatError(f"{where}: entry {entry_name} has no AC line")
        return None
    if not seq_parts and not organism:
        return None  # not a protein entry (e.g. a keyword-list file: ID/AC lines but no OS/SQ)
    name, ec = _parse_de(de_lines)
    topics = _cc_topics(comments)
    sequence = "".join(seq_parts).upper() or None
    organism_name = " ".join(organism).rstrip(".")
    return UniProtEntry(
        accession=accessions[0],
        accessions=tuple(accessions),
        entry_name=entry_name,
        name=name,
        sequence=sequence,
        function=" ".join(topics.get("FUNCTION", [])),
        location=" ".join(topics.get("SUBCELLULAR LOCATION", [])),
        similarity=" ".join(topics.get("SIMILARITY", [])),
        go=go,
        ec=valid_ec(ec),
        existence=existence,
        organism=re.sub(r"\s*\(.*$", "", organism_name) or organism_name,
        taxon=taxon,
        reviewed=reviewed,
    )


def _parse_de(de_lines: list[str]) -> tuple[str, list[str]]:
    name, fallback, ec = "", "", []
    depth_contains = False
    for body in de_lines:
        stripped = body.strip()
        if stripped.startswith(("Contains:", "Includes:")):
            depth_contains = True  # names of the mature chains / domains: not the entry's name
            continue
        match = re.search(r"(RecName|SubName|AltName):\s*Full=([^;{]+)", stripped)
        if match and not depth_contains:
            if match.group(1) in ("RecName", "SubName") and not name:
                name = match.group(2).strip()
            elif not fallback:
                fallback = match.group(2).strip()
        if not match and not name and not stripped.startswith(("Short=", "EC=", "Flags:", "Full=")):
            fallback = fallback or stripped.rstrip(".;")  # pre-2008 DE lines: plain names
        for number in re.findall(r"EC=([0-9n.\-]+)", stripped):
            if not depth_contains:
                ec.append(number.rstrip("."))
    return name or fallback, ec


def _cc_topics(comments: list[str]) -> dict[str, list[str]]:
    topics: dict[str, list[str]] = {}
    topic, buffer = None, []

    def flush():
        if topic is not None and buffer:
            text = clean_text(" ".join(buffer))
            if text:
                topics.setdefault(topic, []).append(text)

    for body in comments:
        if body.startswith("-!- "):
            flush()
            head, _, rest = body[4:].partition(":")
            topic, buffer = head.strip().upper(), [rest.strip()]
        elif body.startswith("----") or body.startswith("Copyrighted") or body.startswith("Distributed"):
            flush()
            topic, buffer = None, []
        elif topic is not None:
            buffer.append(body.strip())
    flush()
    return topics


# ----------------------------------------------------------------------------- XML


def _iter_xml(path: Path) -> Iterator[UniProtEntry]:
    with open_text(path) as handle:
        context = ET.iterparse(handle, events=("end",))
        for _, elem in context:
            if elem.tag == _NS + "entry" or elem.tag == "entry":
                entry = _parse_xml_entry(elem)
                elem.clear()
                if entry is not None:
                    yield entry


def _ns(elem: ET.Element) -> str:
    return elem.tag[: elem.tag.index("}") + 1] if elem.tag.startswith("{") else ""


def _parse_xml_entry(elem: ET.Element) -> UniProtEntry | None:
    ns = _ns(elem)
    accessions = tuple(a.text.strip() for a in elem.findall(ns + "accession") if a.text)
    if not accessions:
        return None
    dataset = elem.get("dataset", "")
    name_elem = elem.find(f"{ns}protein/{ns}recommendedName/{ns}fullName")
    if name_elem is None:
        name_elem = elem.find(f"{ns}protein/{ns}submittedName/{ns}fullName")
    ec = [e.text for e in elem.findall(f"{ns}protein/*/{ns}ecNumber") if e.text]
    function, similarity, locations = [], [], []
    for comment in elem.findall(ns + "comment"):
        kind = comment.get("type")
        if kind in ("function", "similarity"):
            text = " ".join(t.text or "" for t in comment.findall(ns + "text"))
            (function if kind == "function" else similarity).append(clean_text(text))
        elif kind == "subcellular location":
            for loc in comment.iter(ns + "location"):
                if loc.text and loc.text.strip() not in locations:
                    locations.append(loc.text.strip())
    go = []
    taxon = ""
    for ref in elem.findall(ns + "dbReference"):
        kind = ref.get("type")
        if kind == "GO" and _GO_ID_RE.match(ref.get("id", "")):
            props = {p.get("type"): p.get("value", "") for p in ref.findall(ns + "property")}
            aspect, _, term = props.get("term", "").partition(":")
            evidence = props.get("evidence", "").split(":")[0]
            go.append(GoRef(ref.get("id"), aspect if aspect in ("F", "P", "C") else "", term, evidence))
        elif kind == "EC":
            ec.append(ref.get("id", ""))
    organism = ""
    org = elem.find(ns + "organism")
    if org is not None:
        for name in org.findall(ns + "name"):
            if name.get("type") == "scientific" and name.text:
                organism = name.text.strip()
        tax = org.find(ns + "dbReference")
        if tax is not None and tax.get("type") == "NCBI Taxonomy":
            taxon = tax.get("id", "")
    existence = None
    pe = elem.find(ns + "proteinExistence")
    if pe is not None:
        existence = existence_level(pe.get("type", ""))
    seq_elem = elem.find(ns + "sequence")
    sequence = None
    if seq_elem is not None and seq_elem.text and seq_elem.text.strip():
        sequence = re.sub(r"\s+", "", seq_elem.text).upper()
    name_text = elem.find(ns + "name")
    return UniProtEntry(
        accession=accessions[0],
        accessions=accessions,
        entry_name=name_text.text.strip() if name_text is not None and name_text.text else "",
        name=name_elem.text.strip() if name_elem is not None and name_elem.text else "",
        sequence=sequence,
        function=" ".join(t for t in function if t),
        location=", ".join(locations) + ("." if locations else ""),
        similarity=" ".join(t for t in similarity if t),
        go=go,
        ec=valid_ec(ec),
        existence=existence,
        organism=organism,
        taxon=taxon,
        reviewed=True if dataset == "Swiss-Prot" else False if dataset == "TrEMBL" else None,
    )
