"""Sequence-cluster tables for homology-aware train / held-out splits.

``build --split-heldout`` keeps proteins that share a UniProt accession or an identical sequence
on one side. Benchmarks of function prediction want more: no held-out protein above some sequence
identity (30 % is the usual rule) to any training protein. That needs an all-against-all search,
which belongs to a dedicated tool; this module reads its answer. The workflow:

    python -m data_shards build --out data/all ...                  # no split yet
    python -m data_shards fasta data/all --out all.fasta            # ids are the record ids
    mmseqs easy-cluster all.fasta clu tmp --min-seq-id 0.3 -c 0.5 --cov-mode 0
    python -m data_shards build --out data/split ... --split-heldout 0.2 --split-clusters clu_cluster.tsv

The table is MMseqs2's ``*_cluster.tsv`` (``mmseqs createtsv`` writes the same): one
``representative<TAB>member`` line per member, representatives listed as their own members.
Any two-column table of that shape works (e.g. converted CD-HIT or Foldseek clusters).
"""

from __future__ import annotations

import gzip
from pathlib import Path


class ClusterTableError(ValueError):
    """The cluster table cannot be used; the message names the file and the line."""


def load_clusters(path: str | Path) -> dict[str, str]:
    """member id → representative id from a ``representative<TAB>member`` table (plain or .gz).

    Raises:
        ClusterTableError: a line without exactly two non-empty tab-separated fields, or a member
            listed under two representatives.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    members: dict[str, str] = {}
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                fields = line.split("\t")
                if len(fields) != 2 or not all(fields):
                    raise ClusterTableError(f"{path}:{number}: expected 'representative<TAB>member', got {line[:80]!r}")
                rep, member = fields
                if members.setdefault(member, rep) != rep:
                    raise ClusterTableError(
                        f"{path}:{number}: {member} is listed under two representatives ({members[member]}, {rep})"
                    )
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ClusterTableError(f"{path}: unreadable cluster table ({exc})") from None
    if not members:
        raise ClusterTableError(f"{path}: empty cluster table")
    return members
