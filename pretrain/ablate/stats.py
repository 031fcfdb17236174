"""Significance of a variant's difference from the reference: across seeds and held-out proteins.

The difference of one column is ``D = mean_s [M(variant_s) - M(reference_s)]`` over seed-matched
runs (seed s of both: same initialisation and data order), every run scored on the same held-out
proteins. Its variance has a seed level and a protein level (a crossed design: every seed sees
every protein):

* protein level, ``V_P``: a paired bootstrap over the proteins. Each of ``n_boot`` draws takes N
  proteins with replacement, one draw for both variants and every seed (they were evaluated on
  the same proteins), and recomputes every run's metric on it (R@10 from per-protein hits, Fmax
  from per-protein scores and labels, fold accuracy from per-protein correctness); ``V_P`` is the
  variance of D over the draws. It holds the protein-to-protein spread of the difference and the
  per-protein noise of the trained models (which proteins a model happens to rank well), both
  measured on many proteins;
* seed level, ``A = s² / S``: the spread of the S seed-matched differences ``s²`` over the seeds,
  as the paired t-test takes it. It holds a model-level offset (a run better or worse on every
  protein at once) and each seed's per-protein noise; the protein level holds that noise too, so
  the sum counts it twice, which errs on the safe side.

``SE = sqrt(A + V_P)``; the two-sided p-value is that of ``t = D / SE`` against Student's t with
Satterthwaite's d.f. ``(A + V_P)² / (A² / (S - 1) + V_P² / (N - 1))``, and the interval is
``D ± t_(1 - alpha/2) SE``. Neither part alone is right: the paired t-test treats the held-out
proteins as fixed (another protein sample would move every seed's difference together), a bootstrap
over proteins alone ignores how much another seed moves the result. When the proteins dominate the
test has their many d.f.; when the seeds do it falls back to the t-test's S - 1. On simulated null
data (3 seeds, 200 proteins, 400 experiments per setting; ``tests/pretrain/ablate/test_stats.py``)
it rejects 0.7 % at alpha 0.05 when runs differ protein by protein only and 3.5 / 4.8 / 6.0 % with a
model-level offset of sd 0.3 / 0.6 / 1.0 logits (binomial s.e. about 1.1 %), with power 0.67 against
0.55 for the paired t-test on a clear difference. (Subtracting the per-protein noise from ``s²``
instead, to avoid counting it twice, rejected up to 10 % in the same simulations: with 3 seeds the
excess is estimated too poorly.)
:func:`paired_t_test` (seed-level only) is kept for comparison.
"""

from __future__ import annotations

import math

import numpy as np

from pretrain.ablate.outcomes import COLUMNS, Parts


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h / a


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (the normal beyond 1000 d.f.)."""
    if df > 1000:
        return math.erfc(abs(t) / math.sqrt(2.0))
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p_two_sided: float, df: float) -> float:
    """The t > 0 with ``t_two_sided_p(t, df) == p_two_sided`` (bisection)."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > p_two_sided:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > p_two_sided else (lo, mid)
    return 0.5 * (lo + hi)


def paired_t_test(values: list[float | None], reference: list[float | None]) -> dict:
    """Two-sided paired t-test of seed-matched values against the reference's.

    Pairs where either value is None are left out. Returns ``{"n", "mean_diff", "t", "p"}``;
    ``p`` is None with fewer than 2 pairs. Equal differences with zero spread give p = 0 (a
    constant non-zero shift) or 1 (no difference).
    """
    diffs = [v - r for v, r in zip(values, reference) if v is not None and r is not None]
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean_diff": diffs[0] if diffs else None, "t": None, "p": None}
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0.0:
        return {"n": n, "mean_diff": mean, "t": None, "p": 0.0 if mean != 0.0 else 1.0}
    t = mean / (sd / math.sqrt(n))
    return {"n": n, "mean_diff": mean, "t": t, "p": t_two_sided_p(t, n - 1)}


def protein_draws(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` proteins is drawn in each of ``n_boot`` draws with replacement.

    Shapes:
        -> (n, n_boot) float64 counts; every column sums to n.
    """
    idx = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(idx.ravel(), minlength=n * n_boot).reshape(n_boot, n).T.astype(np.float64)


def seed_protein_test(
    variant: list[Parts], reference: list[Parts], alpha: float = 0.05, n_boot: int = 2000, seed: int = 0
) -> dict:
    """The seed x protein paired test of one column (see the module docstring).

    Args:
        variant, reference: seed-matched runs' :class:`Parts` (same length S, same N proteins in
            the same order).
        alpha: level of the interval (1 - alpha) and of ``significant``.
        n_boot: protein bootstrap draws; seed: their random seed (the same draws for every column).

    Returns:
        ``{"n", "n_proteins", "mean_diff", "se", "df", "t", "p", "ci", "seed_var", "protein_var",
        "n_boot", "significant"}``; ``p`` and ``ci`` are None with fewer than 2 seed pairs.
    """
    s = len(variant)
    if s != len(reference):
        raise ValueError(f"{s} variant runs against {len(reference)} reference runs: they must be seed-matched")
    observed = np.array([v.value() - r.value() for v, r in zip(variant, reference)])  # (S,)
    out = {"n": s, "mean_diff": float(observed.mean()) if s else None, "n_boot": n_boot}
    if s < 2:
        return {**out, "p": None, "ci": None, "significant": False}
    n = variant[0].matrix.shape[1]
    if any(p.matrix.shape[1] != n for p in [*variant, *reference]):
        raise ValueError("the runs were scored on different numbers of held-out proteins")
    w = protein_draws(n, n_boot, np.random.default_rng(seed))
    per_seed = np.stack([v.combine(v.matrix @ w) - r.combine(r.matrix @ w) for v, r in zip(variant, reference)])
    per_seed = per_seed[:, np.isfinite(per_seed).all(0)]  # (S, B'): draws where every run has a value
    scored = int((np.abs(np.stack([p.matrix for p in [*variant, *reference]])).sum((0, 1)) > 0).sum())
    diff = float(observed.mean())
    v_p = float(per_seed.mean(0).var(ddof=1)) if per_seed.shape[1] > 1 else 0.0
    a = float(observed.var(ddof=1)) / s  # the seed level, as the paired t-test has it
    var = a + v_p
    out.update(n_proteins=scored, seed_var=a, protein_var=v_p)
    if var <= 0.0:  # identical runs, or a constant shift on every draw
        p = 1.0 if diff == 0.0 else 0.0
        return {**out, "se": 0.0, "df": None, "t": None, "p": p, "ci": [diff, diff], "significant": p < alpha}
    df_den = a * a / (s - 1) + v_p * v_p / max(1, scored - 1)
    df = var * var / df_den if df_den > 0 else math.inf
    se = math.sqrt(var)
    t = diff / se
    p = t_two_sided_p(t, df)
    half = t_quantile(alpha, df) * se
    return {**out, "se": se, "df": df, "t": t, "p": p, "ci": [diff - half, diff + half], "significant": p < alpha}


def summarise(result, reference, alpha: float, parts=None, ref_parts=None, n_boot: int = 2000) -> None:
    """Fill ``mean``, ``sd`` and (against ``reference``, matched by seed) ``tests`` of a :class:`Result`.

    ``parts`` / ``ref_parts``: per run (in ``result.runs`` / ``reference.runs`` order) the
    :func:`pretrain.ablate.outcomes.column_parts` of its per-protein outcomes. ``tests[key]`` is
    :func:`seed_protein_test` (it marks ``significant``) with the :func:`paired_t_test` under
    ``"t_test"``; without parts, only the t-test (then it marks ``significant``).
    """
    for key in COLUMNS:
        vals = [run["metrics"].get(key) for run in result.runs]
        got = [v for v in vals if v is not None]
        result.mean[key] = sum(got) / len(got) if got else None
        mean = result.mean[key]
        result.sd[key] = math.sqrt(sum((v - mean) ** 2 for v in got) / (len(got) - 1)) if len(got) > 1 else None
        if reference is None or reference is result:
            continue
        ref_index = {run["seed"]: i for i, run in enumerate(reference.runs)}
        ref = [
            reference.runs[ref_index[run["seed"]]]["metrics"].get(key) if run["seed"] in ref_index else None
            for run in result.runs
        ]
        t_test = paired_t_test(vals, ref)
        if parts is None or ref_parts is None:
            test = {**t_test, "significant": t_test["p"] is not None and t_test["p"] < alpha}
        else:
            pairs = [
                (parts[i][key], ref_parts[ref_index[run["seed"]]][key])
                for i, run in enumerate(result.runs)
                if run["seed"] in ref_index and key in parts[i] and key in ref_parts[ref_index[run["seed"]]]
            ]
            test = seed_protein_test([v for v, _ in pairs], [r for _, r in pairs], alpha, n_boot)
            test["t_test"] = t_test
        result.tests[key] = test
