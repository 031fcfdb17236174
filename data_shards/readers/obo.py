"""Gene Ontology OBO 1.2 reader (``.obo`` or ``.obo.gz``): terms, alt ids, ancestors, propagation.

Only ``[Term]`` stanzas are read (``[Typedef]`` and others are skipped). A term's ``parents`` are its
``is_a`` targets plus its ``relationship: part_of`` targets, the two relations that GO annotation
propagation (CAFA) follows; ``regulates`` and friends are ignored. Obsolete terms are kept in
``terms`` (so their names and namespaces can be looked up) but :meth:`Ontology.canonical` maps them
to None, so they never enter propagated label sets; :meth:`Ontology.current` is the reading that
follows an obsolete term's single ``replaced_by`` (what annotation builds use).

This module's public API is fixed (the evaluation helper imports it)::

    onto = load_obo("go-basic.obo.gz")
    onto.canonical("GO:0019952")        # alt id -> "GO:0000003"
    onto.propagate({"GO:0004672"})      # the id plus every is_a/part_of ancestor
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_NAMESPACE_ASPECT = {
    "molecular_function": "F",
    "biological_process": "P",
    "cellular_component": "C",
}
_GO_ID_RE = re.compile(r"GO:\d{7}")
# How an id reads (:meth:`Ontology.reading`): the first three keep it, the last two drop it.
READINGS = ("current", "alt_id", "replaced", "obsolete", "unknown")
_MAX_REPLACEMENTS = 8  # replaced_by hops followed before giving up (guards a cycle in a bad file)
_DEF_RE = re.compile(r'^"((?:[^"\\]|\\.)*)"')


@dataclass
class GoTerm:
    """One GO term.

    Attributes:
        id: primary id, "GO:0000003".
        name: the term name.
        namespace: "molecular_function", "biological_process" or "cellular_component".
        definition: the ``def:`` text without its quotes and references ("" when absent).
        parents: direct is_a and part_of targets.
        is_obsolete: True for obsolete terms.
        alt_ids: secondary ids that mean this term.
        replaced_by: for an obsolete term, the term(s) its ``replaced_by`` tags name to use instead.
    """

    id: str
    name: str
    namespace: str
    definition: str
    parents: frozenset[str]
    is_obsolete: bool
    alt_ids: tuple[str, ...]
    replaced_by: tuple[str, ...] = ()


class Ontology:
    """A loaded ontology: ``terms`` maps primary ids to :class:`GoTerm`.

    Lookups accept primary ids and alt ids alike. Ancestor sets are computed lazily and cached.
    :meth:`canonical` drops obsolete ids; :meth:`current` follows a single ``replaced_by`` instead.
    """

    def __init__(self, terms: dict[str, GoTerm], source: str = ""):
        self.terms = terms
        self.source = source
        self._alt: dict[str, str] = {}
        for term in terms.values():
            for alt in term.alt_ids:
                if alt not in terms:  # a primary id always wins over someone's alt id
                    self._alt.setdefault(alt, term.id)
        self._ancestors: dict[str, frozenset[str]] = {}

    def __len__(self) -> int:
        return len(self.terms)

    def __contains__(self, go_id: object) -> bool:
        return isinstance(go_id, str) and self._term(go_id) is not None

    def _term(self, go_id: str) -> GoTerm | None:
        term = self.terms.get(go_id)
        if term is None and go_id in self._alt:
            term = self.terms[self._alt[go_id]]
        return term

    def canonical(self, go_id: str) -> str | None:
        """The primary id for ``go_id`` (itself or an alt id); None if unknown or obsolete."""
        term = self._term(go_id.strip()) if isinstance(go_id, str) else None
        if term is None or term.is_obsolete:
            return None
        return term.id

    def current(self, go_id: str) -> str | None:
        """Like :meth:`canonical`, but an obsolete id with exactly one ``replaced_by`` is followed to
        the current term GO says to use instead (annotations dated before the OBO keep their
        meaning). None if unknown, or obsolete with no or several replacements (``consider`` only)."""
        term = self._term(go_id.strip()) if isinstance(go_id, str) else None
        for _ in range(_MAX_REPLACEMENTS):
            if term is None or not term.is_obsolete:
                break
            term = self._term(term.replaced_by[0]) if len(term.replaced_by) == 1 else None
        if term is None or term.is_obsolete:  # no replacement, or a chain too long (a cycle)
            return None
        return term.id

    def reading(self, go_id: str) -> str:
        """Which rule :meth:`current` applies to ``go_id``: ``"current"`` (a current term's primary id),
        ``"alt_id"`` (one of its alt ids), ``"replaced"`` (obsolete, followed to its replacement),
        ``"obsolete"`` (obsolete with no single replacement: dropped) or ``"unknown"`` (not in the
        ontology: dropped). What annotation readers count when they report how dated ids were read."""
        go_id = go_id.strip() if isinstance(go_id, str) else go_id
        term = self._term(go_id) if isinstance(go_id, str) else None
        if term is None:
            return "unknown"
        if not term.is_obsolete:
            return "current" if term.id == go_id else "alt_id"
        return "replaced" if self.current(go_id) is not None else "obsolete"

    def ancestors(self, go_id: str) -> frozenset[str]:
        """Transitive is_a/part_of ancestors of ``go_id``, excluding itself (empty if unknown)."""
        term = self._term(go_id) if isinstance(go_id, str) else None
        if term is None:
            return frozenset()
        cached = self._ancestors.get(term.id)
        if cached is not None:
            return cached
        seen: set[str] = set()
        stack = [p for p in term.parents if p in self.terms]
        while stack:
            parent = stack.pop()
            if parent in seen:
                continue
            seen.add(parent)
            done = self._ancestors.get(parent)
            if done is not None:  # reuse a cached sub-result
                seen.update(done)
                continue
            stack.extend(p for p in self.terms[parent].parents if p in self.terms and p not in seen)
        seen.discard(term.id)  # guard against cycles in a malformed file
        result = frozenset(seen)
        self._ancestors[term.id] = result
        return result

    def propagate(self, go_ids: Iterable[str]) -> set[str]:
        """Canonical ids of ``go_ids`` plus all their ancestors; unknown and obsolete ids are dropped."""
        out: set[str] = set()
        for go_id in go_ids:
            primary = self.canonical(go_id)
            if primary is None:
                continue
            out.add(primary)
            out.update(self.ancestors(primary))
        return out

    def aspect(self, go_id: str) -> str | None:
        """ "F", "P" or "C" from the term's namespace; None if unknown."""
        term = self._term(go_id) if isinstance(go_id, str) else None
        return None if term is None else _NAMESPACE_ASPECT.get(term.namespace)

    def name(self, go_id: str) -> str:
        """The term name; "" if unknown."""
        term = self._term(go_id) if isinstance(go_id, str) else None
        return "" if term is None else term.name

    def definition(self, go_id: str) -> str:
        """The term definition; "" if unknown."""
        term = self._term(go_id) if isinstance(go_id, str) else None
        return "" if term is None else term.definition


def _open_text(path: Path):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _strip_value(value: str) -> str:
    """Drop trailer modifiers ``{...}`` and ``! comment`` from an id-valued tag."""
    value = value.split("!", 1)[0]
    value = value.split("{", 1)[0]
    return value.strip()


def _finish(stanza: dict, where: str, terms: dict[str, GoTerm]) -> None:
    go_id = stanza.get("id")
    if not go_id:
        raise ValueError(f"{where}: [Term] stanza without an id")
    if not _GO_ID_RE.fullmatch(go_id):
        return  # not a GO term (e.g. a cross-ontology term in an extension file): skip it
    terms[go_id] = GoTerm(
        id=go_id,
        name=stanza.get("name", ""),
        namespace=stanza.get("namespace", ""),
        definition=stanza.get("def", ""),
        parents=frozenset(stanza.get("parents", ())),
        is_obsolete=stanza.get("is_obsolete", False),
        alt_ids=tuple(stanza.get("alt_ids", ())),
        replaced_by=tuple(stanza.get("replaced_by", ())),
    )


def load_obo(path: str | Path) -> Ontology:
    """Read an OBO 1.2 file (plain or gzipped).

    Args:
        path: ``.obo`` or ``.obo.gz``.

    Returns:
        The :class:`Ontology`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not readable text, has a stanza without an id, or holds no GO terms;
            the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: OBO file not found")
    terms: dict[str, GoTerm] = {}
    stanza: dict | None = None
    stanza_line = 0
    try:
        with _open_text(path) as handle:
            for lineno, raw in enumerate(handle, 1):
                line = raw.strip()
                if not line or line.startswith("!"):
                    continue
                if line.startswith("["):
                    if stanza is not None:
                        _finish(stanza, f"{path}:{stanza_line}", terms)
                    stanza = {} if line == "[Term]" else None
                    stanza_line = lineno
                    continue
                if stanza is None:
                    continue  # header or a non-Term stanza
                tag, sep, value = line.partition(":")
                if not sep:
                    raise ValueError(f"{path}:{lineno}: not a 'tag: value' line: {line[:60]!r}")
                tag, value = tag.strip(), value.strip()
                if tag == "id":
                    stanza["id"] = _strip_value(value)
                elif tag == "name":
                    stanza["name"] = value
                elif tag == "namespace":
                    stanza["namespace"] = _strip_value(value)
                elif tag == "def":
                    match = _DEF_RE.match(value)
                    stanza["def"] = match.group(1).replace('\\"', '"') if match else value
                elif tag == "alt_id":
                    stanza.setdefault("alt_ids", []).append(_strip_value(value))
                elif tag == "is_a":
                    stanza.setdefault("parents", []).append(_strip_value(value))
                elif tag == "relationship":
                    parts = _strip_value(value).split()
                    if len(parts) == 2 and parts[0] == "part_of":
                        stanza.setdefault("parents", []).append(parts[1])
                elif tag == "replaced_by":
                    stanza.setdefault("replaced_by", []).append(_strip_value(value))
                elif tag == "is_obsolete":
                    stanza["is_obsolete"] = value.lower().startswith("true")
            if stanza is not None:
                _finish(stanza, f"{path}:{stanza_line}", terms)
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: unreadable OBO file ({type(exc).__name__}: {exc})") from None
    if not terms:
        raise ValueError(f"{path}: no GO [Term] stanzas found (is this an OBO file?)")
    return Ontology(terms, source=str(path))
