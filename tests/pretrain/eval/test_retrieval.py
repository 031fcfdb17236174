import numpy as np

from pretrain.eval.retrieval import positive_ranks, retrieval_metrics


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_positive_ranks_identity_and_reversed():
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(50, 8)).astype(np.float32))
    assert (positive_ranks(x, x, block=7) == 0).all()
    # a candidate set where the positive is always the worst
    ranks = positive_ranks(x, -x, block=16)
    assert (ranks == 49).all()


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
    m = retrieval_metrics(emb, [1, 5, 10])
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
