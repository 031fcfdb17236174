"""The ablation's tests: the paired t-test, and the seed x protein paired test on simulated and real outcomes."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from pretrain.ablate.outcomes import Parts, mean_of_ratios
from pretrain.ablate.stats import (
    _betainc,
    paired_t_test,
    protein_draws,
    seed_protein_test,
    t_quantile,
    t_two_sided_p,
)


def test_paired_t_test_by_hand_and_at_its_nominal_rate():
    # diffs 1, 2, 4: mean 7/3, s.d. sqrt(7/3), t = sqrt(7); 2 d.f.: p = 1 - |t| / sqrt(t^2 + 2)
    out = paired_t_test([1.0, 2.0, 4.0], [0.0, 0.0, 0.0])
    assert out["t"] == pytest.approx(math.sqrt(7)) and out["p"] == pytest.approx(1 - math.sqrt(7) / 3)
    # 1 d.f. (Cauchy): p = 1 - 2 atan|t| / pi
    one = paired_t_test([1.0, 3.0], [0.5, 0.0])  # diffs 0.5, 3: t = 1.75 / (1.7678 / sqrt 2) = 1.4
    assert one["p"] == pytest.approx(1 - 2 * math.atan(abs(one["t"])) / math.pi)
    for df, t_crit in ((2, 4.302653), (4, 2.776445), (10, 2.228139)):  # textbook two-sided 5 % critical values
        assert _betainc(df / 2, 0.5, df / (df + t_crit**2)) == pytest.approx(0.05, abs=1e-5)
        assert t_quantile(0.05, df) == pytest.approx(t_crit, abs=1e-5)
    assert t_quantile(0.05, 5000) == pytest.approx(1.959964, abs=1e-5)
    assert t_two_sided_p(1.959964, 1e9) == pytest.approx(0.05, abs=1e-6)
    assert paired_t_test([1.0, 2.0], [0.0, 1.0])["p"] == 0.0  # a constant shift
    assert paired_t_test([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    assert paired_t_test([1.0, None, 3.0], [0.0, 1.0, None])["p"] is None  # one seed-matched pair
    rng = random.Random(0)  # no true difference: p < 0.05 in about 5 % of 3-seed experiments
    hits = sum(
        paired_t_test([rng.gauss(0, 1) for _ in range(3)], [rng.gauss(0, 1) for _ in range(3)])["p"] < 0.05
        for _ in range(4000)
    )
    assert 0.04 < hits / 4000 < 0.06


def test_protein_draws_are_with_replacement_and_complete():
    w = protein_draws(7, 500, np.random.default_rng(0))
    assert w.shape == (7, 500) and (w.sum(0) == 7).all() and (w >= 0).all()
    assert (w > 1).any() and (w == 0).any()  # repeats and omissions: with replacement
    assert abs(w.mean() - 1.0) < 0.05 and w.var() == pytest.approx(6 / 7, abs=0.08)  # multinomial(7, 1/7)


def _hits(ranks: np.ndarray) -> Parts:
    """A one-direction R@10-like column from (N,) 0/1 hits (every protein scored)."""
    return Parts(np.stack([ranks, np.ones_like(ranks)]).astype(np.float64), mean_of_ratios)


def _simulate(rng, n_seeds, n_proteins, shift=0.0, seed_sd=0.0):
    """Seed-matched variant / reference hit indicators on the same proteins.

    Protein i has a hit probability p_i (its difficulty, shared by every run); seed s of both rows
    shares a training state, and each run adds its own model-level logit offset (sd ``seed_sd``) and
    per-protein Bernoulli noise. ``shift`` moves the variant's logits (0: the null).
    """
    logit = np.log(rng.beta(0.5, 6, n_proteins) / 1.0)
    variant, reference = [], []
    for _ in range(n_seeds):
        state = rng.normal(0, 0.3, n_proteins)  # what seed s does to each protein in both rows
        for out, delta in ((variant, shift), (reference, 0.0)):
            z = logit + state + delta + rng.normal(0, seed_sd)
            out.append(_hits(rng.random(n_proteins) < 1 / (1 + np.exp(-z))))
    return variant, reference


@pytest.mark.parametrize("seed_sd", [0.0, 0.6])
def test_false_positive_rate_on_null_data_is_at_most_alpha(seed_sd):
    """Variant = reference's distribution (seed-matched, same proteins): p < 0.05 in at most about 5 % of
    the experiments, with runs that differ protein by protein only (0) and with a model-level offset per run
    (0.6 logits, where a seed-level variance estimated with the per-protein noise taken out rejected 10 %)."""
    rng = np.random.default_rng(1)
    sims, hits, covered = 400, 0, 0
    for i in range(sims):
        v, r = _simulate(rng, 3, 200, seed_sd=seed_sd)
        out = seed_protein_test(v, r, n_boot=200, seed=i)
        hits += out["p"] < 0.05
        covered += out["ci"][0] <= 0.0 <= out["ci"][1]
        assert (out["p"] < 0.05) == out["significant"]
    band = 3 * math.sqrt(0.05 * 0.95 / sims)  # 3 binomial standard errors: 0.05 + 0.033
    assert hits / sims < 0.05 + band, hits / sims
    assert covered == sims - hits  # the interval excludes 0 exactly when p < alpha


def test_power_on_a_clear_difference_beats_the_seed_only_t_test():
    rng = np.random.default_rng(2)
    sims, ours, t_test = 200, 0, 0
    for i in range(sims):
        v, r = _simulate(rng, 3, 200, shift=0.8)
        out = seed_protein_test(v, r, n_boot=200, seed=i)
        ours += out["p"] < 0.05 and out["mean_diff"] > 0
        t_test += paired_t_test([x.value() for x in v], [x.value() for x in r])["p"] < 0.05
    assert ours / sims > 0.6 and ours > 1.1 * t_test, (ours, t_test)


def test_model_level_seed_effects_count_as_seed_variance():
    """A large run-level offset (a model better on every protein at once) is seed-level variance: the test
    must not take the three seeds' differences for per-protein noise (its d.f. fall towards S - 1)."""
    rng = np.random.default_rng(3)
    sims, few_df, hits = 40, 0, 0
    for i in range(sims):
        v, r = _simulate(rng, 3, 400, seed_sd=1.0)
        out = seed_protein_test(v, r, n_boot=200, seed=i)
        few_df += out["df"] < 10 and out["seed_var"] > out["protein_var"]
        hits += out["p"] < 0.05
        assert out["se"] ** 2 == pytest.approx(out["seed_var"] + out["protein_var"])
        assert out["df"] >= 2 - 1e-9  # Satterthwaite: never below the seed level's S - 1
    assert few_df / sims > 0.7 and hits / sims < 0.15, (few_df, hits)


def test_degenerate_inputs():
    x = _hits(np.array([1, 0, 0, 1, 0, 0, 0, 1] * 5))
    same = seed_protein_test([x, x, x], [x, x, x], n_boot=50)
    assert same["p"] == 1.0 and same["mean_diff"] == 0.0 and same["ci"] == [0.0, 0.0] and not same["significant"]
    one = seed_protein_test([x], [x])
    assert one["p"] is None and not one["significant"]
    with pytest.raises(ValueError, match="seed-matched"):
        seed_protein_test([x, x], [x])
    with pytest.raises(ValueError, match="different numbers of held-out proteins"):
        seed_protein_test([x, x], [x, _hits(np.ones(3))])
