"""The ablation table: summaries, the ``*`` of the seed x protein test, the differences table, the README section."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.ablate.outcomes import COLUMNS, Parts, mean_of_ratios
from pretrain.ablate.runs import Result
from pretrain.ablate.stats import summarise
from pretrain.ablate.table import README_BEGIN, README_END, caption, differences_table, markdown_table, write_readme


def _result(name, values_by_seed, **kw):
    runs = [{"seed": s, "metrics": {**dict.fromkeys(COLUMNS), **m}, "wall_s": 1.0} for s, m in values_by_seed]
    return Result(name, f"{name}.yaml", "1/1/1; 0.1/0.1/0.1; yes", 2, [s for s, _ in values_by_seed], runs, **kw)


def test_without_outcomes_the_t_test_marks_significant_differences():
    full = _result(
        "demo",
        [(0, {"mean": 0.30, "EC Fmax": 0.5}), (1, {"mean": 0.32, "EC Fmax": 0.6}), (2, {"mean": 0.31, "EC Fmax": 0.4})],
    )
    worse = _result(
        "demo_x",
        [
            (0, {"mean": 0.20, "EC Fmax": 0.6}),
            (1, {"mean": 0.215, "EC Fmax": 0.4}),
            (2, {"mean": 0.205, "EC Fmax": 0.5}),
        ],
    )
    for r in (full, worse):
        summarise(r, full, 0.05)
    assert full.mean["mean"] == pytest.approx(0.31) and full.sd["mean"] == pytest.approx(0.01) and full.tests == {}
    assert worse.tests["mean"]["significant"] and not worse.tests["EC Fmax"]["significant"]
    assert worse.tests["mean"]["mean_diff"] == pytest.approx(-0.31 / 3)
    table = markdown_table([full, worse])
    header, _, row_full, row_worse = table.splitlines()
    assert "mean R@10" in header and "EC Fmax" in header and "GO-MF Fmax" not in header  # no value: no column
    assert "| 0.310 ± 0.010 | 0.500 ± 0.100 |" in row_full
    assert "| 0.207 ± 0.008* | 0.500 ± 0.100 |" in row_worse and "| 3 |" in row_worse


def _hits_parts(hits: np.ndarray) -> dict:
    return {"mean": Parts(np.stack([hits, np.ones_like(hits)]).astype(np.float64), mean_of_ratios)}


def test_with_outcomes_the_seed_protein_test_marks_and_the_t_test_is_kept():
    """Seed diffs 0.030 / 0.031 / 0.029 on 400 proteins: far beyond per-protein noise, yet the seed-only
    t-test sees them too; a 0.003 gap with the same per-protein noise is not marked."""
    rng = np.random.default_rng(0)
    n = 400
    ref_hits = [rng.random(n) < 0.2 for _ in range(3)]
    better = []
    for h, extra in zip(ref_hits, (12, 12, 12)):
        b = h.copy()
        b[np.flatnonzero(~h)[:extra]] = True  # 12 more hits of 400: +0.03
        better.append(b)
    close = [h.copy() for h in ref_hits]
    for c in close:
        c[np.flatnonzero(~c)[:1]] = True  # +0.0025
    runs = {
        "demo": (ref_hits, _result("demo", [(s, {"mean": float(h.mean())}) for s, h in enumerate(ref_hits)])),
        "better": (better, _result("better", [(s, {"mean": float(h.mean())}) for s, h in enumerate(better)])),
        "close": (close, _result("close", [(s, {"mean": float(h.mean())}) for s, h in enumerate(close)])),
    }
    ref_parts = [_hits_parts(h) for h in ref_hits]
    for hits, r in runs.values():
        summarise(r, runs["demo"][1], 0.05, [_hits_parts(h) for h in hits], ref_parts, n_boot=300)
    better_test, close_test = runs["better"][1].tests["mean"], runs["close"][1].tests["mean"]
    assert better_test["significant"] and better_test["mean_diff"] == pytest.approx(0.03)
    assert better_test["ci"][0] > 0 and "t_test" in better_test and better_test["n_proteins"] == n
    assert not close_test["significant"] and close_test["ci"][0] < 0 < close_test["ci"][1]
    rows = markdown_table([r for _, r in runs.values()]).splitlines()
    assert rows[3].count("*") == 1 and "*" not in rows[4]
    diffs = differences_table([r for _, r in runs.values()], "demo", 0.05).splitlines()
    assert diffs[0].startswith("| Δ vs `demo` (p, 95 % interval) | mean R@10 |") and len(diffs) == 4
    assert diffs[2].startswith("| `better` | +0.030 (p ") and "[+0.0" in diffs[2]


def test_caption_names_the_test_exactly():
    text = caption(
        machine="2-core CPU (x), no GPU",
        ranks=1,
        seeds=[0, 1, 2],
        overrides=["a=1"],
        reference="demo",
        alpha=0.05,
        n_boot=2000,
        method="probe/concat",
        base_recipe="demo.yaml",
    )
    assert (
        "`*` marks a difference from `demo` significant at p < 0.05 by a two-sided seed × protein paired test" in text
    )
    assert "paired bootstrap over the held-out proteins (2000 draws" in text and "Satterthwaite" in text
    assert "`base` is `demo.yaml` before training" in text
    one = caption(
        machine="m",
        ranks=1,
        seeds=[0],
        overrides=[],
        reference="demo",
        alpha=0.05,
        n_boot=10,
        method="m",
        base_recipe=None,
    )
    assert "One seed: no spread and no significance test" in one and "`base`" not in one


def test_readme_section_is_replaced_not_duplicated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold table\n{README_END}\n\nafter\n")
    write_readme(f"{README_BEGIN}\nnew table\n{README_END}", readme)
    text = readme.read_text()
    assert "new table" in text and "old table" not in text and text.endswith("\n\nafter\n")
    assert text.count(README_BEGIN) == 1
