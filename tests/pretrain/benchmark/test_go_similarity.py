"""GO semantic similarity: IC, Lin / Resnik and BMA against hand-computed values on a tiny ontology."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_shards.readers.obo import load_obo
from pretrain.benchmark import go_similarity as gs
from tests.conftest import SHARED_DATA

# root (MF) <- A <- C (is_a); A <- D (part_of); root <- B; E is a BP root of its own.
TINY_OBO = """format-version: 1.2

[Term]
id: GO:0000001
name: root
namespace: molecular_function

[Term]
id: GO:0000002
name: A
namespace: molecular_function
is_a: GO:0000001 ! root

[Term]
id: GO:0000003
name: B
namespace: molecular_function
is_a: GO:0000001 ! root

[Term]
id: GO:0000004
name: C
namespace: molecular_function
is_a: GO:0000002 ! A

[Term]
id: GO:0000005
name: D
namespace: molecular_function
relationship: part_of GO:0000002 ! A

[Term]
id: GO:0000006
name: E
namespace: biological_process

[Term]
id: GO:0000007
name: obsolete C
namespace: molecular_function
is_obsolete: true
replaced_by: GO:0000004

[Term]
id: GO:0000008
name: obsolete with no replacement
namespace: molecular_function
is_obsolete: true
consider: GO:0000003
"""
ROOT, A, B, C, D, E = (f"GO:000000{i}" for i in range(1, 7))
OLD_C, GONE = "GO:0000007", "GO:0000008"  # obsolete: replaced by C; obsolete with only a `consider`
CORPUS = {"p1": {C}, "p2": {D}, "p3": {B}, "p4": {A}}  # propagated counts: root 4, A 3, B/C/D 1


@pytest.fixture
def onto(tmp_path):
    path = tmp_path / "tiny.obo"
    path.write_text(TINY_OBO)
    return load_obo(path)


def test_information_content_is_propagated_over_is_a_and_part_of(onto):
    ic = gs.information_content(onto, CORPUS)
    assert ic == pytest.approx({ROOT: 0.0, A: math.log(4 / 3), B: math.log(4), C: math.log(4), D: math.log(4)})
    assert E not in ic  # no protein reaches it: no IC


def test_dated_annotations_are_read_as_the_terms_go_says_to_use_today(onto):
    """GOA files older than the OBO: an obsolete id with one replaced_by counts as its replacement
    (as the shard builder reads it), one with no replacement is dropped, and both are counted."""
    dated = {"p1": {OLD_C}, "p2": {D}, "p3": {B, GONE}, "p4": {A}, "p5": {GONE, "GO:0000099"}}  # 99: unknown
    assert gs.information_content(onto, dated) == pytest.approx(gs.information_content(onto, CORPUS))
    ic = gs.information_content(onto, CORPUS)
    assert gs.aspect_terms(onto, [OLD_C, GONE, B], "F", ic) == [B, C]
    counts = gs.current_id_counts(onto, dated)
    assert counts == {"annotations": 7, "current": 3, "alt_id": 0, "replaced": 1, "obsolete": 2, "unknown": 1}
    lin = gs.TermSimilarity(onto, ic, "lin")
    sims = gs.pair_similarities([("p1", "p2")], dated, onto, ic)
    assert sims["MF"][1] == pytest.approx([lin(C, D)])  # p1's obsolete id scored as C


def test_lin_and_resnik_by_hand(onto):
    ic = gs.information_content(onto, CORPUS)
    lin, resnik = gs.TermSimilarity(onto, ic, "lin"), gs.TermSimilarity(onto, ic, "resnik")
    assert resnik(C, D) == pytest.approx(math.log(4 / 3))  # MICA = A, through D's part_of
    assert lin(C, D) == pytest.approx(math.log(4 / 3) / math.log(4))
    assert lin(C, A) == pytest.approx(2 * math.log(4 / 3) / (math.log(4) + math.log(4 / 3)))
    assert resnik(C, A) == pytest.approx(math.log(4 / 3))  # a term is its own ancestor
    assert lin(C, B) == 0.0 and resnik(C, B) == 0.0  # only the root in common
    assert lin(C, C) == 1.0 and lin(ROOT, ROOT) == 1.0 and resnik(C, C) == pytest.approx(math.log(4))
    # BMA of {C, B} vs {D}: rows max (lin(C,D), 0), column max lin(C,D) -> 0.75 lin(C,D)
    assert gs.best_match_average([C, B], [D], lin) == pytest.approx(0.75 * lin(C, D))
    assert gs.best_match_average([], [D], lin) is None
    with pytest.raises(ValueError, match="measure"):
        gs.TermSimilarity(onto, ic, "jaccard")


def test_spearman_with_ties_by_hand():
    assert gs.average_ranks(np.array([3.0, 1.0, 2.0, 2.0])) == pytest.approx([4, 1, 2.5, 2.5])
    assert gs.spearman(np.array([1, 2, 2, 3.0]), np.array([1, 3, 2, 4.0])) == pytest.approx(4.5 / math.sqrt(22.5))
    assert gs.spearman(np.array([1, 2, 3.0]), np.array([3, 2, 1.0])) == pytest.approx(-1.0)
    assert gs.spearman(np.array([1, 1, 1.0]), np.array([1, 2, 3.0])) is None


def test_benchmark_correlates_cosine_with_bma_per_aspect(onto):
    ic = gs.information_content(onto, CORPUS)
    lin = gs.TermSimilarity(onto, ic, "lin")
    terms = {**CORPUS, "p5": {C, E}}
    rng = np.random.default_rng(0)
    lookup = {p: rng.normal(size=4) for p in terms}
    pairs = gs.sample_pairs(list(terms), 10, seed=1)
    assert len(set(pairs)) == 10 and all(a < b for a, b in pairs)
    out = gs.go_similarity_benchmark(lookup, pairs, terms, onto, ic, resamples=200)
    cos = [lookup[a] @ lookup[b] / np.linalg.norm(lookup[a]) / np.linalg.norm(lookup[b]) for a, b in pairs]
    sims = [lin(next(iter(terms[a] - {E})), next(iter(terms[b] - {E}))) for a, b in pairs]
    mf = out["aspects"]["MF"]
    assert mf["n_pairs"] == 10
    assert mf["spearman"]["value"] == pytest.approx(gs.spearman(np.array(cos), np.array(sims)))
    assert mf["spearman"]["low"] <= mf["spearman"]["value"] <= mf["spearman"]["high"]
    assert out["aspects"]["BP"]["n_pairs"] == 0 and out["aspects"]["BP"]["spearman"] is None  # E has no IC
    with pytest.raises(ValueError, match="no embedding for 1 protein"):
        gs.go_similarity_benchmark({k: v for k, v in lookup.items() if k != "p1"}, pairs, terms, onto, ic)
    with pytest.raises(ValueError, match="cannot draw 11 pairs"):
        gs.sample_pairs(list(terms), 11)


OBO = SHARED_DATA / "annotations" / "go-basic_2021-12-15.obo.gz"


@pytest.mark.skipif(not OBO.is_file(), reason="../shared/data is absent")
def test_real_go_similarity_orders_related_terms(tmp_path):
    onto = load_obo(OBO)
    corpus = {
        "trypsin": {"GO:0004252", "GO:0006508"},  # serine-type endopeptidase; proteolysis
        "peptidase": {"GO:0008236"},  # serine-type peptidase
        "binder": {"GO:0003677", "GO:0006355"},  # DNA binding; regulation of transcription
        "kinase": {"GO:0004672"},
    }
    ic = gs.information_content(onto, corpus)
    lin = gs.TermSimilarity(onto, ic, "lin")
    assert ic["GO:0003674"] == 0.0  # molecular_function: every MF protein reaches it
    assert lin("GO:0004252", "GO:0008236") > lin("GO:0004252", "GO:0003677") >= 0.0
