"""PPI from complexes: pair building from a chain table, rank AUROC by hand, cosine scoring."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.benchmark import ppi
from tests.conftest import SHARED_DATA

HEADER = "structure_file\tchain\tpdb_id\tuniprot\ttaxon\tprotein_name\tgo_mf\tgo_bp\tgo_cc\tec\tgo_source\tsequence\n"
ROWS = [  # file, chain, accession, sequence
    ("db5.5/1AAA_r_b.pdb.gz", "A", "P1", "MKV"),
    ("db5.5/1AAA_r_b.pdb.gz", "B", "P2", "MKW"),
    ("db5.5/1AAA_l_b.pdb.gz", "C", "P3", "GGH"),
    ("db5.5/1AAA_l_u.pdb.gz", "A", "P3", "GGH"),  # unbound: left out
    ("db5.5/2BBB_r_b.pdb.gz", "E", "P1", "MKV"),
    ("db5.5/2BBB_l_b.pdb.gz", "F", "P4", "LLL"),
    ("dips_test/cc_3ccc.pdb1_0.dill_l_b_COMPLEX.pdb.gz", "A", "P5", "AAAA"),
    ("dips_test/cc_3ccc.pdb1_0.dill_r_b_COMPLEX.pdb.gz", "B", "P5", "AAAA"),  # homodimer
    ("dips_test/cc_3ccc.pdb2_1.dill_r_b_COMPLEX.pdb.gz", "C", "", "WWW"),
    ("dips_test/cc_3ccc.pdb2_1.dill_l_b_COMPLEX.pdb.gz", "D", "", "YYY"),
    ("esm/5yh2.pdb.gz", "A", "P9", "MMM"),  # not a complex source
    ("db5.5/4DDD_r_b.pdb.gz", "", "P8", "MMM"),  # no chain id
]


def _table(tmp_path, rows=ROWS):
    (tmp_path / "annotations").mkdir(parents=True)
    path = tmp_path / "annotations" / "chains.tsv"
    lines = [f"../structures/{f}\t{c}\t\t{u}\t\t\t\t\t\t\t\t{s}\n" for f, c, u, s in rows]
    path.write_text(HEADER + "".join(lines))
    return path


def _id(file, chain):
    return f"../structures/{file}:{chain}"


def test_auroc_by_hand():
    # positives at ranks 5 and 3 of 5: (8 - 3) / (2 * 3)
    assert ppi.auroc(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0])) == pytest.approx(5 / 6)
    assert ppi.auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5  # a tie counts half
    assert ppi.auroc(np.array([0.1, 0.2]), np.array([1, 0])) == 0.0
    assert ppi.auroc(np.array([0.1, 0.2]), np.array([1, 1])) is None


def test_chains_and_pairs_from_a_chain_table(tmp_path):
    chains = ppi.complex_chains(_table(tmp_path))
    assert [c.id for c in chains] == [_id(f, c) for f, c, _, _ in ROWS[:3] + ROWS[4:10]]
    assert chains[0].entry == "db5.5/1AAA" and chains[0].side == "r" and chains[0].pdb_id == "1AAA"
    assert chains[7].entry == "dips_test/3ccc.pdb2_1" and chains[7].pdb_id == "3CCC"
    assert chains[0].path == (tmp_path / "structures" / ROWS[0][0]).resolve()

    pairs = ppi.interaction_pairs(chains, seed=3)
    pos = {(p.a, p.b) for p in pairs if p.label}
    ids = [c.id for c in chains]
    want = {(ids[0], ids[2]), (ids[1], ids[2]), (ids[3], ids[4]), (ids[5], ids[6]), (ids[7], ids[8])}
    assert pos == {tuple(sorted(p)) for p in want}  # receptor x ligand only: not A-B of 1AAA_r
    neg = [p for p in pairs if not p.label]
    assert len(neg) == len(pos) and len({(p.a, p.b) for p in neg}) == len(neg)
    by_id = {c.id: c for c in chains}
    for p in neg:
        x, y = by_id[p.a], by_id[p.b]
        assert x.pdb_id != y.pdb_id and (p.a, p.b) not in pos
        assert {x.uniprot, y.uniprot} not in ({"P1", "P3"}, {"P2", "P3"}, {"P1", "P4"}, {"P5"})
    assert ppi.interaction_pairs(chains, seed=3) == pairs  # seeded
    assert ppi.interaction_pairs(chains, seed=4) != pairs

    within = ppi.interaction_pairs(chains, pairing="all")
    assert (ids[0], ids[1]) in {(p.a, p.b) for p in within if p.label}
    no_homo = {(p.a, p.b) for p in ppi.interaction_pairs(chains, drop_identical=True) if p.label}
    assert no_homo == pos - {tuple(sorted((ids[5], ids[6])))}


def test_bad_file_name_and_too_few_negatives_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"chains.tsv:3: .*1AA_r_b.pdb.gz.* not a db5.5 complex file name"):
        ppi.complex_chains(_table(tmp_path, [ROWS[0], ("db5.5/1AA_r_b.pdb.gz", "A", "", "MK")]))
    one_entry = [c for c in ppi.complex_chains(_table(tmp_path / "b")) if c.pdb_id == "1AAA"]
    with pytest.raises(ValueError, match="found only 0 of 2 negative pairs"):
        ppi.interaction_pairs(one_entry, max_tries=10)


def test_benchmark_scores_pairs_by_cosine(tmp_path):
    pairs = [ppi.Pair("a", "b", 1), ppi.Pair("c", "d", 1), ppi.Pair("a", "c", 0), ppi.Pair("b", "d", 0)]
    lookup = {
        "a": np.array([1.0, 0.0]),
        "b": np.array([2.0, 0.2]),  # cos(a, b) ~ 0.995
        "c": np.array([0.0, 3.0]),  # cos(a, c) = 0
        "d": np.array([-0.5, 1.0]),  # cos(c, d) ~ 0.894, cos(b, d) ~ -0.36
    }
    out = ppi.ppi_benchmark(lookup, pairs, sequences={"a": "MK", "b": "MK"}, resamples=300)
    assert out["auroc"]["value"] == 1.0 and out["n_positive"] == 2 and out["n_negative"] == 2
    assert out["identical_sequence_positive"] == 1 and out["identical_sequence_negative"] == 0
    assert out["mean_cosine_positive"] == pytest.approx((2 / np.sqrt(4.04) + 1 / np.sqrt(1.25)) / 2)
    assert 0.0 <= out["auroc"]["low"] <= out["auroc"]["high"] <= 1.0
    lookup["d"] = np.array([1.0, 0.5])  # cos: (a,b) .995 > (b,d) .934 > (c,d) .447 > (a,c) 0: 3 of 4 in order
    assert ppi.ppi_benchmark(lookup, pairs, resamples=0)["auroc"]["value"] == 0.75
    with pytest.raises(ValueError, match="no embedding for 1 chain"):
        ppi.ppi_benchmark({k: v for k, v in lookup.items() if k != "d"}, pairs)


TABLE = SHARED_DATA / "annotations" / "pdb_chains.tsv"


@pytest.mark.skipif(not TABLE.is_file(), reason="../shared/data is absent")
def test_real_docking_benchmark_and_dips_pairs():
    chains = ppi.complex_chains(TABLE)
    sources = {c.entry.split("/")[0] for c in chains}
    assert sources == {"db5.5", "dips_test"} and all(c.path.is_file() for c in chains[:20])
    pairs = ppi.interaction_pairs(chains, seed=0)
    n_pos = sum(p.label for p in pairs)
    assert n_pos > 100 and len(pairs) == 2 * n_pos
    by_id = {c.id: c for c in chains}
    assert all(by_id[p.a].entry == by_id[p.b].entry and by_id[p.a].side != by_id[p.b].side for p in pairs if p.label)
