import numpy as np
import pytest

from pretrain.eval.baseline import kmer_ids, nearest_neighbours, transfer_scores

DB = ["ACDEFGHIK", "MMMMMMMMM", "WWWWYYYY", "ACDEFGHIK"]


def test_kmer_ids():
    assert kmer_ids("ACD").tolist() == [0 * 441 + 1 * 21 + 2]
    assert kmer_ids("ABC").tolist() == [0 * 441 + 20 * 21 + 1]  # B is not standard: X
    assert kmer_ids("AC").tolist() == []
    assert len(kmer_ids("ACDEF")) == 3


@pytest.mark.parametrize("block", [1, 2, 1024])
def test_jaccard_nearest_neighbours(block):
    idx, sim = nearest_neighbours(["ACDEFGHIK", "MMMM", "ACDEF", "", "QQQQ"], DB, block=block)
    # exact copy -> the first of two identical entries; ACDEF shares 3 of 7 3-mers; no k-mer -> -1
    assert idx.tolist()[:4] == [0, 1, 0, -1]
    np.testing.assert_allclose(sim[:4], [1.0, 1.0, 3 / 7, 0.0], rtol=1e-6)
    assert sim[4] == 0.0 and idx[4] == 0  # nothing shared: similarity 0, first entry


def test_cosine_nearest_neighbours():
    idx, sim = nearest_neighbours(["MMMM"], DB, metric="cosine")
    assert idx.tolist() == [1] and sim[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        nearest_neighbours(["A"], DB, metric="blast")


def test_transfer_scores():
    truth = np.array([[1, 0], [0, 1]], bool)
    out = transfer_scores(np.array([1, -1, 0]), np.array([0.5, 0.0, 1.0], np.float32), truth)
    np.testing.assert_allclose(out, [[0, 0.5], [0, 0], [1, 0]])
