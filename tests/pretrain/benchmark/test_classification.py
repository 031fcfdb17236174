"""pretrain.benchmark.classification: nearest-centroid / k-NN class accuracy against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.benchmark.classification import ClassificationTaskConfig, centroid_predict, knn_predict, run
from pretrain.benchmark.data import BenchmarkDataError
from pretrain.benchmark.suite import from_dict
from tests.pretrain.benchmark.helpers import make_context


def _unit(deg):
    return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]


def test_centroid_and_knn_by_hand():
    x_tr = np.array([_unit(0), _unit(20), _unit(90), _unit(100), _unit(180)])
    y_tr = ["a", "a", "b", "b", "c"]
    q = np.array([_unit(50), _unit(60), _unit(170)])
    # centroids at 10, 95, 180 degrees: 50 -> a (40 vs 45 degrees), 60 -> b (50 vs 35), 170 -> c
    assert centroid_predict(q, x_tr, y_tr) == ["a", "b", "c"]
    # k = 3 at 60 degrees: nearest 90 (b), 20 (a), 100 (b) -> b; at 170: 180 (c), 100 (b), 90 (b) -> b
    assert knn_predict(q, x_tr, y_tr, k=3) == ["a", "b", "b"]
    assert knn_predict(q, x_tr, y_tr, k=1) == ["a", "b", "c"]


def test_classification_task_accuracy_per_level(tmp_path):
    ids = ["tr1", "tr2", "tr3", "tr4", "te1", "te2", "te3", "te4"]
    deg = [0, 20, 90, 110, 8, 100, 50, 200]
    (tmp_path / "classes.tsv").write_text(
        "id\tfold\tfamily\tsplit\n"
        "tr1\tF1\tfa\ttrain\ntr2\tF1\tfb\ttrain\ntr3\tF2\tfc\ttrain\ntr4\tF2\tfc\ttrain\n"
        "te1\tF1\tfa\ttest\nte2\tF2\tfc\ttest\nte3\tF2\tfd\ttest\nte4\t\tfa\ttest\n"
    )
    ctx = make_context(tmp_path, ids, ["MKT"] * len(ids), {"sequence": np.array([_unit(d) for d in deg])})
    cfg = from_dict(
        ClassificationTaskConfig,
        {"labels": "classes.tsv", "levels": ["fold", "family"], "features": ["sequence"], "baselines": []},
        "task",
    )
    out = run(ctx, "fold", cfg)
    acc = {(r["subset"], r["method"]): r for r in out["rows"]}
    # fold centroids at 10 (F1) and 100 (F2): te1 8 -> F1 ok, te2 100 -> F2 ok, te3 50 -> F1 (wrong);
    # te4 has no fold -> not scored
    assert acc[("fold", "centroid/sequence")]["value"] == pytest.approx(2 / 3)
    assert acc[("fold", "centroid/sequence")]["n"] == 3
    # family centroids fa 0, fb 20, fc 100: te1 8 -> fa, te2 -> fc,
    # te3 50 -> fb (30 vs 50 degrees; fd is unseen: wrong anyway), te4 200 -> fc (wrong)
    assert acc[("family", "centroid/sequence")]["value"] == pytest.approx(2 / 4)
    assert out["info"]["family"]["unseen_test_classes"] == 1
    assert out["info"]["fold"]["majority_accuracy"] == pytest.approx(1 / 3)  # F1 (ties with F2, seen first)


def test_bad_split_values_name_the_file(tmp_path):
    (tmp_path / "classes.tsv").write_text("id\tfamily\tsplit\nA\tf\ttraining\n")
    ctx = make_context(tmp_path, ["A"], ["MKT"], {"sequence": np.array([[1.0, 0.0]])})
    cfg = from_dict(ClassificationTaskConfig, {"labels": "classes.tsv", "levels": ["family"]}, "task")
    with pytest.raises(BenchmarkDataError, match=r"classes.tsv: column 'split' holds \['training'\]"):
        run(ctx, "fam", cfg)
