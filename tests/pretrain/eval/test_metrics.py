import numpy as np
import pytest

from pretrain.eval.metrics import THRESHOLDS, accuracy, fmax, micro_aupr, propagate_scores

# Protein 2 has no label: it is excluded even though it predicts everything.
TRUTH = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
SCORES = np.array([[0.9, 0.4, 0.4], [0.2, 0.2, 0.6], [0.99, 0.99, 0.99]], np.float32)


def test_fmax_hand_computed_with_ties_and_unlabelled_protein():
    r = fmax(SCORES, TRUTH)
    # t in (0.2, 0.4]: P0 predicts {0,1,2} (p 2/3, r 1), P1 predicts {2} (p 1, r 1): F = 10/11
    assert r["n"] == 2
    assert r["fmax"] == pytest.approx(10 / 11)
    assert r["threshold"] == 0.21
    assert r["precision"] == pytest.approx(5 / 6) and r["recall"] == 1.0 and r["coverage"] == 1.0
    curve = dict(zip(r["curve"]["threshold"], zip(r["curve"]["precision"], r["curve"]["recall"])))
    assert curve[0.2] == pytest.approx((0.5, 1.0))  # everything predicted
    assert curve[0.4] == pytest.approx((5 / 6, 1.0))  # a score equal to t counts as predicted
    assert curve[0.41] == pytest.approx((1.0, 0.75))
    # t in (0.6, 0.9]: only P0 predicts: precision over 1 protein, recall over both
    assert curve[0.9] == pytest.approx((1.0, 0.25))
    assert 0.91 not in curve  # nobody predicts: precision undefined, threshold skipped
    assert len(r["curve"]["threshold"]) == 90


def test_fmax_float32_scores_on_a_threshold_count():
    r = fmax(np.array([[0.7]], np.float32), np.array([[True]]))
    assert r["fmax"] == 1.0 and r["threshold"] == 0.01
    assert r["curve"]["threshold"][-1] == 0.7  # float32(0.7) < 0.7 but is predicted at t = 0.70


def test_fmax_edge_cases():
    assert fmax(np.zeros((2, 3)), np.zeros((2, 3), bool)) == {"fmax": None, "n": 0}
    r = fmax(np.zeros((1, 2)), np.array([[True, False]]))  # never predicts anything
    assert r["fmax"] == 0.0 and r["threshold"] is None and r["curve"]["threshold"] == []
    with pytest.raises(ValueError):
        fmax(np.zeros((1, 2)), np.zeros((2, 1), bool))
    assert len(THRESHOLDS) == 100 and THRESHOLDS[0] == 0.01 and THRESHOLDS[-1] == 1.0


def test_fmax_blocked_equals_unblocked():
    rng = np.random.default_rng(0)
    scores = rng.random((37, 11)).astype(np.float32)
    truth = rng.random((37, 11)) < 0.3
    a, b = fmax(scores, truth), fmax(scores, truth, block=4)
    assert a["fmax"] == pytest.approx(b["fmax"])
    for key in ("threshold", "precision", "recall"):
        assert a["curve"][key] == pytest.approx(b["curve"][key])


def test_micro_aupr_hand_computed():
    scores = np.array([[0.9, 0.8], [0.7, 0.1], [0.99, 0.99]])
    truth = np.array([[1, 0], [1, 0], [0, 0]], bool)  # last protein unlabelled: excluded
    assert micro_aupr(scores, truth) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # tied scores form one operating point: (P .5, R .5) then (P 2/3, R 1)
    tied = micro_aupr(np.array([[0.5, 0.5, 0.2]]), np.array([[1, 0, 1]], bool))
    assert tied == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert micro_aupr(np.zeros((1, 2)), np.zeros((1, 2), bool)) is None


def test_propagate_scores_takes_the_max_of_descendants():
    labels = ["a", "b", "c"]
    anc = {"a": [], "b": ["a"], "c": ["a", "b"]}
    out = propagate_scores(np.array([[0.1, 0.2, 0.9], [0.5, 0.1, 0.3]], np.float32), labels, anc)
    np.testing.assert_allclose(out, [[0.9, 0.9, 0.9], [0.5, 0.3, 0.3]])


def test_propagation_before_scoring_changes_fmax():
    # truth: zinc ion binding propagated to ion binding and binding; only the leaf is predicted
    labels = ["binding", "ion binding", "zinc ion binding"]
    anc = {"binding": [], "ion binding": ["binding"], "zinc ion binding": ["binding", "ion binding"]}
    truth = np.ones((1, 3), bool)
    scores = np.array([[0.0, 0.0, 0.8]], np.float32)
    assert fmax(scores, truth)["fmax"] == pytest.approx(0.5)  # p 1, r 1/3
    assert fmax(propagate_scores(scores, labels, anc), truth)["fmax"] == 1.0


def test_accuracy():
    assert accuracy(["a", None, "c"], ["a", "b", "b"]) == pytest.approx(1 / 3)
    assert accuracy([], []) is None
