"""The table's metrics: from an eval result, and rebuilt from per-protein outcomes (simulated and a real tiny eval)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.ablate import outcomes as oc
from pretrain.ablate.runs import EVAL_FILE, OUTCOMES_FILE, EvalSettings, evaluate_run_dir, load_outcomes
from pretrain.ablate.stats import seed_protein_test
from pretrain.eval.metrics import fmax

DIRECTIONS = ("seq->struct", "struct->seq", "seq->text", "text->seq", "struct->text", "text->struct")


def _retrieval(values):
    return {"directions": {d: {"n": 100, "R@10": v, "chance_R@10": 0.1} for d, v in zip(DIRECTIONS, values)}}


def test_r10_averages_both_directions_of_each_pair():
    r10, chance = oc.r10_of({"retrieval": _retrieval([0.1, 0.3, 0.2, 0.4, 0.0, 0.6])}, "x")
    assert r10 == pytest.approx({"seq<->struct": 0.2, "seq<->text": 0.3, "struct<->text": 0.3, "mean": 1.6 / 6})
    assert chance == 0.1
    with pytest.raises(RuntimeError, match=r"x: no R@10 for \['seq->struct'"):
        oc.r10_of({"retrieval": {"directions": {}}}, "x")
    with pytest.raises(ValueError, match="x: not a retrieval evaluation"):
        oc.r10_of({"retrieval": []}, "x")


def test_run_metrics_read_fmax_and_fold_of_the_chosen_method():
    result = {
        "retrieval": _retrieval([0.1] * 6),
        "function": {
            "GO-MF": {"methods": {"probe/concat": {"fmax": 0.4}, "probe/sequence": {"fmax": 0.3}}},
            "GO-BP": {"skipped": "no held-out protein has a label"},
            "EC": {"methods": {"probe/concat": {"fmax": 0.7}}},
        },
        "fold": {"methods": {"probe/concat": {"accuracy": 0.9}}},
    }
    metrics, chance = oc.run_metrics(result, "probe/concat", "x")
    assert metrics["GO-MF Fmax"] == 0.4 and metrics["EC Fmax"] == 0.7 and metrics["fold accuracy"] == 0.9
    assert metrics["GO-BP Fmax"] is None and metrics["GO-CC Fmax"] is None and metrics["mean"] == pytest.approx(0.1)
    assert oc.run_metrics(result, "probe/sequence", "x")[0]["GO-MF Fmax"] == 0.3
    assert chance == 0.1 and oc.run_metrics({}, "probe/concat", "x") == (dict.fromkeys(oc.COLUMNS), None)


def test_fmax_from_per_protein_parts_equals_cafa_fmax_on_any_protein_draw():
    rng = np.random.default_rng(0)
    scores = rng.random((60, 9)).astype(np.float32)
    scores[:5] = 0.0  # proteins with no prediction at any threshold
    scores[5, :] = 0.29  # float32 0.29 lies just below the 0.29 threshold: counted (within 1e-6)
    truth = rng.random((60, 9)) < 0.2
    truth[0] = False  # a protein without labels is not scored
    parts = oc.fmax_parts(scores, truth)
    assert parts.shape == (301, 60)
    sums, curve = parts.sum(1), fmax(scores, truth)["curve"]
    defined = sums[200:300] > 0  # thresholds where some protein has a prediction
    n = int(truth.any(1).sum())  # proteins without a label are not scored
    assert sums[300] == n and list(np.flatnonzero(defined) + 1) == [round(100 * t) for t in curve["threshold"]]
    assert sums[:100][defined] / sums[200:300][defined] == pytest.approx(curve["precision"], abs=1e-12)
    assert sums[100:200][defined] / n == pytest.approx(curve["recall"], abs=1e-12)
    assert oc.fmax_from_sums(parts.sum(1, keepdims=True))[0] == pytest.approx(fmax(scores, truth)["fmax"], abs=1e-12)
    for _ in range(5):  # a bootstrap draw = the proteins repeated as drawn
        draw = rng.integers(0, 60, 60)
        w = np.bincount(draw, minlength=60).astype(np.float64)
        got = oc.fmax_from_sums((parts @ w)[:, None])[0]
        assert got == pytest.approx(fmax(scores[draw], truth[draw])["fmax"], abs=1e-12)
    assert oc.fmax_from_sums(np.zeros((301, 1)))[0] != oc.fmax_from_sums(np.zeros((301, 1)))[0]  # no protein: NaN


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two untrained tiny exports (seeds 0, 1) on a small demo corpus, as ablate run directories."""
    from tests.pretrain.eval.tiny import build_corpus, build_export

    root = tmp_path_factory.mktemp("ablate_tiny")
    corpus = build_corpus(root / "corpus")
    runs = []
    for seed in (0, 1):
        build_export(corpus, root / f"seed{seed}" / "export", seed=seed)
        runs.append(root / f"seed{seed}")
    return runs


def test_real_tiny_evaluations_cache_and_test(tiny_runs):
    settings = EvalSettings(tasks="retrieval,go,ec,fold", probe_steps=10, max_train_samples=64)
    evaluated = [evaluate_run_dir(run, settings) for run in tiny_runs]
    parts = []
    for run, (result, per_protein) in zip(tiny_runs, evaluated):
        metrics, _ = oc.run_metrics(result, settings.method, "x")
        cols = oc.column_parts(per_protein, settings.method, "x")
        assert set(cols) == set(oc.COLUMNS)
        for key, value in metrics.items():  # every cell rebuilt exactly from the per-protein outcomes
            assert cols[key].value() == pytest.approx(value, abs=1e-12), key
        assert not any(k.endswith("probe/sequence") for k in per_protein)  # only the table's method is kept
        parts.append(cols)
        saved = load_outcomes(run / OUTCOMES_FILE)
        assert set(saved) == set(per_protein) and all(np.array_equal(saved[k], per_protein[k]) for k in saved)
    assert np.array_equal(evaluated[0][1]["ids"], evaluated[1][1]["ids"])
    # the same runs on both sides: no difference; two different models: a finite test with its interval
    same = seed_protein_test([parts[0]["mean"], parts[1]["mean"]], [parts[0]["mean"], parts[1]["mean"]], n_boot=50)
    assert same["p"] == 1.0 and same["ci"] == [0.0, 0.0]
    for key in ("mean", "EC Fmax", "fold accuracy"):
        out = seed_protein_test([parts[0][key]] * 2, [parts[1][key]] * 2, n_boot=100)
        assert 0.0 <= out["p"] <= 1.0 and out["ci"][0] <= out["mean_diff"] <= out["ci"][1]
        assert out["mean_diff"] == pytest.approx(parts[0][key].value() - parts[1][key].value())
    # the cache is reused while both files read back; a damaged npz is evaluated again
    run = tiny_runs[0]
    stamp = (run / EVAL_FILE).stat().st_mtime_ns
    evaluate_run_dir(run, settings)
    assert (run / EVAL_FILE).stat().st_mtime_ns == stamp
    (run / OUTCOMES_FILE).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a per-protein outcome file"):
        load_outcomes(run / OUTCOMES_FILE)
    result, per_protein = evaluate_run_dir(run, settings)
    assert (run / EVAL_FILE).stat().st_mtime_ns != stamp and "ids" in load_outcomes(run / OUTCOMES_FILE)
    assert json.loads((run / EVAL_FILE).read_text())["result"]["retrieval"] == evaluated[0][0]["retrieval"]


def test_damaged_outcomes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"f\.npz: damaged per-protein outcomes"):
        oc.column_parts({"ids": np.array(["a", "b"]), "retrieval/seq->struct": np.zeros(2)}, "probe/concat", "f.npz")
    path = tmp_path / "o.npz"
    np.savez(path, other=np.zeros(2))
    with pytest.raises(ValueError, match="no 'ids' array"):
        load_outcomes(path)
    np.savez(path, ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a per-protein outcome file"):  # never unpickled
        load_outcomes(path)
