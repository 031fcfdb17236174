import numpy as np
import pytest

from pretrain.eval.retrieval import (
    chance_multi,
    multi_positive_ranks,
    positive_ranks,
    retrieval_metrics,
    text_groups,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_positive_ranks_identity_and_reversed():
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(50, 8)).astype(np.float32))
    assert (positive_ranks(x, x, block=7) == 0).all()
    # a candidate set where the positive is always the worst
    ranks = positive_ranks(x, -x, block=16)
    assert (ranks == 49).all()


# Hand-computed: candidates c0..c3, groups [0, 0, 1, 2].
#   q0 = (1, 0):     sims [1, .8, 0, -1]    exact 0, multi 0
#   q1 = (1, 0):     sims [1, .8, 0, -1]    exact 1 (c0 beats c1), multi 0 (c0 is a positive)
#   q2 = (.6, .8):   sims [.6, .96, .8, -.6] exact 1, multi 1
#   q3 = (0, 1):     sims [0, .6, 1, 0]     exact 3 (c0 ties c3: counts against), multi 3
_C = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], np.float32)
_Q = np.array([[1, 0], [1, 0], [0.6, 0.8], [0, 1]], np.float32)
_G = np.array([0, 0, 1, 2])


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_exact_and_multi_positive_ranks_hand_computed(block):
    assert positive_ranks(_Q, _C, block=block).tolist() == [0, 1, 1, 3]
    assert multi_positive_ranks(_Q, _C, _G, block=block).tolist() == [0, 0, 1, 3]


def test_ties_count_against_the_positive():
    same = np.ones((5, 4), np.float32) / 2.0  # a collapsed model
    assert (positive_ranks(same, same) == 4).all()
    emb = {m: same for m in ("sequence", "structure", "text")}
    emb.update({f"present_{m}": np.ones(5, bool) for m in ("sequence", "structure", "text")})
    m = retrieval_metrics(emb, [1])
    assert all(d["R@1"] == 0.0 for d in m["directions"].values())


def test_chance_multi_hand_computed():
    sizes = np.array([2, 2, 1, 1])
    assert chance_multi(sizes, 4, 1) == pytest.approx(0.375)  # mean of g / n
    # k=2: 1 - C(n-g, 2) / C(4, 2): g=2 -> 5/6, g=1 -> 1/2
    assert chance_multi(sizes, 4, 2) == pytest.approx((5 / 6 + 5 / 6 + 0.5 + 0.5) / 4)
    assert chance_multi(sizes, 4, 4) == 1.0


def test_text_groups():
    assert text_groups(["a", "b", "a ", "", ""]).tolist() == [0, 1, 0, -4, -5]


def test_retrieval_metrics_multi_positive_hand_computed():
    emb = {"sequence": _Q, "text": _C, "present_sequence": np.ones(4, bool), "present_text": np.ones(4, bool)}
    d = retrieval_metrics(emb, [1, 2], groups=_G)["directions"]["seq->text"]
    assert d["R@1"] == 0.25 and d["R@2"] == 0.75
    assert d["R@1_multi"] == 0.5 and d["R@2_multi"] == 0.75
    assert d["chance_R@1"] == 0.25 and d["chance_R@1_multi"] == pytest.approx(0.375)
    assert d["median_rank"] == 2.0 and d["median_rank_multi"] == 1.5
    assert d["curve"]["k"] == [1, 2, 3, 4]
    assert d["curve"]["exact"] == [0.25, 0.75, 0.75, 1.0]
    assert d["curve"]["multi"] == [0.5, 0.75, 0.75, 1.0]


def test_retrieval_metrics_six_directions_and_presence():
    rng = np.random.default_rng(0)
    n = 40
    base = _unit(rng.normal(size=(n, 16)).astype(np.float32))
    emb = {
        "sequence": base,
        "structure": _unit(base + 0.01 * rng.normal(size=base.shape)).astype(np.float32),
        "text": _unit(rng.normal(size=(n, 16))).astype(np.float32),
        "present_sequence": np.ones(n, bool),
        "present_structure": np.ones(n, bool),
        "present_text": np.arange(n) < 30,
    }
    m = retrieval_metrics(emb, [1, 5, 10], groups=np.arange(n))
    assert set(m["directions"]) == {
        "seq->struct",
        "struct->seq",
        "seq->text",
        "text->seq",
        "struct->text",
        "text->struct",
    }
    assert m["directions"]["seq->struct"]["R@1"] == 1.0
    assert m["directions"]["seq->text"]["n"] == 30
    assert m["directions"]["seq->text"]["chance_R@10"] == 10 / 30
    d = m["directions"]["text->seq"]
    # singleton groups: multi-positive equals exact
    assert d["R@5_multi"] == d["R@5"] and d["chance_R@5_multi"] == pytest.approx(d["chance_R@5"])
    assert len(d["curve"]["exact"]) == 30 and d["curve"]["exact"][9] == d["R@10"]
    assert set(m["summary"]["seq->struct"]) >= {"R@1", "R@10", "R@10_multi"}
