"""pretrain.benchmark.scoring: weighted Fmax / AUPR equal the eval metrics on redrawn sets, and the
bootstrap intervals cover a known value at about the nominal rate."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.benchmark.scoring import AuprTerms, FmaxTerms, mean_interval, multilabel_metrics
from pretrain.eval.metrics import fmax, micro_aupr


def _random_task(rng, n=40, labels=12):
    truth = rng.random((n, labels)) < 0.25
    truth[np.arange(n), rng.integers(0, labels, n)] = True  # every protein has a label
    scores = np.clip(truth * 0.4 + rng.random((n, labels)) * 0.6, 0, 1)
    scores[rng.random((n, labels)) < 0.3] = 0.0  # some labels not predicted at all
    scores[:3] = np.round(scores[:3], 2)  # scores on thresholds (the 1e-6 rule)
    return scores, truth


def test_weighted_terms_equal_eval_metrics_on_full_and_redrawn_sets():
    rng = np.random.default_rng(0)
    scores, truth = _random_task(rng)
    f, a = FmaxTerms(scores, truth), AuprTerms(scores, truth)
    assert f.fmax() == pytest.approx(fmax(scores, truth)["fmax"], abs=1e-12)
    assert a.aupr() == pytest.approx(micro_aupr(scores, truth), abs=1e-12)
    for seed in range(5):
        idx = np.random.default_rng(seed).integers(0, len(truth), len(truth))
        w = np.bincount(idx, minlength=len(truth)).astype(float)
        assert f.fmax(w) == pytest.approx(fmax(scores[idx], truth[idx])["fmax"], abs=1e-12)
        assert a.aupr(w) == pytest.approx(micro_aupr(scores[idx], truth[idx]), abs=1e-12)


def test_fmax_and_aupr_by_hand():
    # protein 0: truth {a, b}, scores a=0.9, b=0.3, c=0.6; protein 1: truth {c}, scores c=0.8
    scores = np.array([[0.9, 0.3, 0.6], [0.0, 0.0, 0.8]])
    truth = np.array([[1, 1, 0], [0, 0, 1]], bool)
    # t in (0.6, 0.8]: p = (1 + 1) / 2 = 1, r = (1/2 + 1) / 2 = 0.75 -> F = 6/7 (the best)
    # t <= 0.3: p = (2/3 + 1) / 2, r = 1 -> F = 2 * 5/6 / (11/6) = 10/11 = 0.909 (better)
    m = multilabel_metrics(scores, truth, resamples=0)
    assert m["fmax"].value == pytest.approx(10 / 11)
    # AUPR: ranking 0.9(+) 0.8(+) 0.6(-) 0.3(+) 0,0(-): AP = (1 + 1 + 3/4) / 3
    assert m["aupr"].value == pytest.approx((1 + 1 + 0.75) / 3)
    assert m["fmax"].low is None  # no resample, no interval


def test_every_test_protein_needs_a_label():
    with pytest.raises(ValueError, match="at least one true label"):
        FmaxTerms(np.zeros((2, 2)), np.array([[1, 0], [0, 0]], bool))


def test_bootstrap_interval_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(1)
    covered = 0
    sims = 200
    for s in range(sims):
        x = rng.exponential(1.0, size=60)  # skewed, true mean 1
        iv = mean_interval(x, resamples=400, seed=s)
        covered += iv.low <= 1.0 <= iv.high
    # percentile bootstrap on n=60 exponential under-covers a little; 95 % nominal
    assert 0.86 <= covered / sims <= 0.99, covered / sims


def test_paired_draws_share_the_seed():
    rng = np.random.default_rng(2)
    scores, truth = _random_task(rng, n=30)
    a = multilabel_metrics(scores, truth, resamples=200, seed=3)
    b = multilabel_metrics(scores, truth, resamples=200, seed=3)
    assert a["fmax"] == b["fmax"] and a["fmax"].low < a["fmax"].value < a["fmax"].high


@pytest.mark.parametrize("path", ["dense", "dense_blocks", "per_draw"])
def test_aupr_of_many_redraws_equals_one_at_a_time(monkeypatch, path):
    from pretrain.benchmark import scoring

    if path == "dense_blocks":
        monkeypatch.setattr(scoring, "DENSE_BLOCK", 45)  # a few distinct scores x 30 proteins per block
    if path == "per_draw":
        monkeypatch.setattr(scoring, "DENSE_FACTOR", 0)  # too many distinct scores: the loop
    rng = np.random.default_rng(4)
    scores, truth = _random_task(rng, n=30, labels=9)
    scores = np.round(scores, 1)  # few distinct values, many ties: the dense path's case
    a = AuprTerms(scores, truth)
    weights = np.stack([np.bincount(rng.integers(0, 30, 30), minlength=30) for _ in range(7)]).astype(float)
    weights[0] = 0.0
    weights[0, 0] = 1.0  # a redraw of one protein
    truth_free = AuprTerms(scores, np.zeros_like(truth))  # no positive at all: undefined everywhere
    for _ in range(2):  # the second call reads the kept counts
        got = a.aupr_many(weights)
        want = [a.aupr(w) for w in weights]
        assert got == pytest.approx(want, abs=1e-12)
        assert got == pytest.approx([micro_aupr(scores[np.repeat(np.arange(30), w.astype(int))],
                                                truth[np.repeat(np.arange(30), w.astype(int))]) for w in weights],
                                    abs=1e-12)  # fmt: skip
    assert np.isnan(truth_free.aupr_many(weights)).all()


def test_counted_bootstrap_draws_what_the_one_at_a_time_bootstrap_draws():
    from pretrain.benchmark.bootstrap import bootstrap, bootstrap_counts

    x = np.random.default_rng(5).exponential(1.0, size=37)
    one = bootstrap(lambda idx: float(x[idx].mean()), 37, resamples=250, seed=9)
    many = bootstrap_counts(lambda w: w @ x / w.sum(1), 37, resamples=250, seed=9, batch=64)
    assert many.value == pytest.approx(one.value, abs=1e-12) and many.resamples == one.resamples == 250
    assert (many.low, many.high) == pytest.approx((one.low, one.high), abs=1e-12)
    undefined = bootstrap_counts(lambda w: np.where(w[:, 0] > 1, np.nan, 1.0), 37, resamples=100, seed=9)
    assert 0 < undefined.resamples < 100  # NaN draws are left out and counted out of the resamples
