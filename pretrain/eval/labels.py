"""Function labels for evaluation: GO per aspect (propagated with the ontology), hierarchical EC,
fold / family classes, and the index <-> label maps saved beside the probes.

GO: each annotated id is mapped to its primary id and propagated up is_a / part_of with the OBO
(:mod:`data_shards.readers.obo`); obsolete ids are dropped; ids the ontology does not know (the
demo corpus' made-up ids, or terms newer than the OBO) are kept as they are, unpropagated, under
the aspect the record gives, and counted. The three aspect roots are removed (every protein has
them; CAFA does not score them).

EC: "1.2.3.4" becomes {"1.", "1.2.", "1.2.3.", "1.2.3.4"}; "1.2.-.-" becomes {"1.", "1.2."}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GO_TASKS = {"GO-MF": "F", "GO-BP": "P", "GO-CC": "C"}
GO_ROOTS = frozenset({"GO:0003674", "GO:0008150", "GO:0005575"})


def ec_prefixes(ec: str) -> list[str]:
    """Hierarchical EC labels, most general first: "2.7.11.1" -> ["2.", "2.7.", "2.7.11.", "2.7.11.1"].

    Levels from the first "-" on are dropped; an unparsable number gives [].
    """
    parts = [p.strip() for p in str(ec).strip().split(".")]
    if not parts or not parts[0] or parts[0] == "-":
        return []
    out = []
    for level, part in enumerate(parts[:4]):
        if not part or part == "-":
            break
        prefix = ".".join(parts[: level + 1])
        out.append(prefix if level == 3 else prefix + ".")
    return out


def ec_label_sets(ec_lists: Iterable[list[str]]) -> list[set[str]]:
    """EC numbers per protein -> propagated EC label sets (prefix closure)."""
    return [{p for ec in ecs for p in ec_prefixes(ec)} for ecs in ec_lists]


@dataclass
class GoLabels:
    """Propagated GO label sets of one aspect, with the names seen and bookkeeping counts."""

    sets: list[set[str]]
    names: dict[str, str] = field(default_factory=dict)
    unknown_ids: int = 0  # annotations the ontology does not know (kept unpropagated)
    obsolete_ids: int = 0  # annotations dropped as obsolete
    known_ids: int = 0  # annotations found in the ontology
    name_mismatches: int = 0  # ... whose name in the shard differs from the ontology's (wrong ids?)


def go_label_sets(go_lists: Iterable[list[dict]], aspect: str, ontology=None) -> GoLabels:
    """Per-protein GO label sets of ``aspect`` ("F", "P" or "C"), propagated when ``ontology`` is set.

    Args:
        go_lists: per protein, the shard's ``text.go`` entries ({"id", "aspect", "name"}).
        aspect: the aspect kept.
        ontology: a :class:`data_shards.readers.obo.Ontology`, or None (no propagation).
    """
    out = GoLabels(sets=[])
    for terms in go_lists:
        labels: set[str] = set()
        for term in terms:
            go_id = str(term.get("id", "")).strip()
            if not go_id:
                continue
            if ontology is not None and go_id in ontology:
                if (ontology.aspect(go_id) or term.get("aspect")) != aspect:
                    continue  # counted by the call for its own aspect
                out.known_ids += 1
                if term.get("name") and term["name"].strip().lower() != ontology.name(go_id).strip().lower():
                    out.name_mismatches += 1
                primary = ontology.canonical(go_id)
                if primary is None:
                    out.obsolete_ids += 1
                    continue
                for t in ontology.propagate([primary]):
                    if ontology.aspect(t) == aspect:
                        labels.add(t)
                        out.names.setdefault(t, ontology.name(t))
                continue
            if term.get("aspect") != aspect:
                continue
            if ontology is not None:
                out.unknown_ids += 1
            labels.add(go_id)
            if term.get("name"):
                out.names.setdefault(go_id, term["name"])
        out.sets.append(labels - GO_ROOTS)
    return out


def go_ancestors_in(labels: list[str], ontology=None) -> dict[str, list[str]]:
    """For each label, its ancestors that are also labels (for score propagation)."""
    present = set(labels)
    if ontology is None:
        return {t: [] for t in labels}
    return {t: sorted(a for a in ontology.ancestors(t) if a in present) for t in labels}


def ec_ancestors_in(labels: list[str]) -> dict[str, list[str]]:
    """For each EC label, its shorter prefixes that are also labels."""
    present = set(labels)
    out = {}
    for t in labels:
        full = t.rstrip(".")
        prefixes = ec_prefixes(full)
        out[t] = [p for p in prefixes if p != t and p in present]
    return out


class LabelSpace:
    """An ordered label vocabulary: column j of every score / truth matrix is ``labels[j]``."""

    def __init__(self, labels: Iterable[str], names: dict[str, str] | None = None):
        self.labels = sorted(set(labels))
        self.index = {t: j for j, t in enumerate(self.labels)}
        self.names = {t: (names or {}).get(t, "") for t in self.labels}

    def __len__(self) -> int:
        return len(self.labels)

    def matrix(self, sets: list[set[str]]) -> np.ndarray:
        """Shapes: len(sets) label sets -> (N, L) bool; labels outside the space are ignored."""
        y = np.zeros((len(sets), len(self.labels)), dtype=bool)
        for i, s in enumerate(sets):
            cols = [self.index[t] for t in s if t in self.index]
            y[i, cols] = True
        return y

    def to_json(self, **extra) -> dict:
        return {"labels": self.labels, "names": self.names, **extra}

    def save(self, path: Path, **extra) -> None:
        """Write ``labels.json``: {"labels": [...index order...], "names": {...}, **extra}."""
        Path(path).write_text(json.dumps(self.to_json(**extra), indent=1))

    @classmethod
    def load(cls, path: Path) -> LabelSpace:
        data = json.loads(Path(path).read_text())
        space = cls(data["labels"], data.get("names"))
        if space.labels != list(data["labels"]):
            raise ValueError(f"{path}: labels are not in sorted order")
        return space


def class_labels(meta: list[dict], key: str) -> list[str | None]:
    """Per-protein class (fold / family) from ``meta[key]``; None when absent or empty."""
    out = []
    for m in meta:
        v = m.get(key)
        out.append(None if v is None or v == "" else str(v))
    return out
