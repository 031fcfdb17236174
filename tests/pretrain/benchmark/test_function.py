"""pretrain.benchmark.function: the DeepFRI protocol on hand-made data with real MMseqs2 runs; the CAFA
files it writes give the reported Fmax under the CAFA evaluator (cafaeval)."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.benchmark.data import BenchmarkDataError
from pretrain.benchmark.function import FunctionTaskConfig, SplitConfig, knn_scores, run, write_cafa
from pretrain.benchmark.scoring import FmaxTerms
from pretrain.benchmark.suite import from_dict
from pretrain.errors import ConfigError
from tests.pretrain.benchmark.helpers import make_context

AA = "ACDEFGHIKLMNPQRSTVWY"


def _seq(rng, n=150):
    return "".join(rng.choice(list(AA), n))


def _mutate(rng, seq, share):
    s = list(seq)
    for i in rng.choice(len(s), round(share * len(s)), replace=False):
        s[i] = rng.choice([a for a in AA if a != s[i]])
    return "".join(s)


def _cafa_fmax(directory, gt="ground_truth.tsv") -> dict[str, float]:
    cafaeval = pytest.importorskip("cafaeval.evaluation")
    _, best = cafaeval.cafa_eval(str(directory / "labels.obo"), str(directory / "predictions"), str(directory / gt))
    table = best["f"].reset_index()
    return dict(zip(table["filename"], table["f"]))


def test_knn_scores_by_hand():
    x_tr = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y_tr = np.array([[1, 0], [0, 1], [1, 1]], bool)
    q = np.array([[np.sqrt(0.5), np.sqrt(0.5)]])  # cos 0.707 to the first two, -0.707 to the third
    np.testing.assert_allclose(knn_scores(q, x_tr, y_tr, k=2), [[0.5, 0.5]])
    np.testing.assert_allclose(knn_scores(q, x_tr, y_tr, k=3), [[0.5, 0.5]])  # negative cosine: weight 0
    q2 = np.array([[0.8, 0.6]])  # weights 0.8 and 0.6
    np.testing.assert_allclose(knn_scores(q2, x_tr, y_tr, k=2), [[0.8 / 1.4, 0.6 / 1.4]])


def test_function_task_by_hand_with_mmseqs_baseline_identity_bins_and_cafa(tmp_path):
    rng = np.random.default_rng(3)
    t = [_seq(rng) for _ in range(4)]
    q = [t[0], _mutate(rng, t[1], 0.2), _seq(rng)]  # identity to training: 1.0, 0.8, none
    ids = ["T0-A", "T1-A", "T2-A", "T3-A", "Q0-A", "Q1-A", "Q2-A"]
    # vocabulary a..e as EC numbers; e is never used
    a, b, c, d, e = "1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4", "5.5.5.5"
    labels = {"T0-A": [a], "T1-A": [b], "T2-A": [c], "T3-A": [a, d], "Q0-A": [a], "Q1-A": [b, c], "Q2-A": [d]}
    (tmp_path / "ec.tsv").write_text(
        f"### EC-numbers\n{a}\t{b}\t{c}\t{d}\t{e}\n### PDB-chain\tEC-numbers\n"
        + "".join(f"{k}\t{','.join(v)}\n" for k, v in labels.items())
    )
    (tmp_path / "train.txt").write_text("T0-A\nT1-A\nT2-A\nT3-A\n")
    (tmp_path / "test.txt").write_text("Q0-A\nQ1-A\nQ2-A\nNOT-IN-TABLE\n")
    angle = {"T0-A": 0, "T1-A": 60, "T2-A": 120, "T3-A": 200, "Q0-A": 5, "Q1-A": 65, "Q2-A": 205}
    x = np.array([[np.cos(np.radians(angle[i])), np.sin(np.radians(angle[i]))] for i in ids])
    ctx = make_context(tmp_path, ids, t + q, {"sequence": x})
    cfg = from_dict(
        FunctionTaskConfig,
        {
            "annotations": "ec.tsv",
            "split": {"method": "lists", "train": "train.txt", "test": "test.txt"},
            "k": 1,
            "features": ["sequence"],
            "baselines": ["mmseqs", "kmer"],
        },
        "task",
    )
    out = run(ctx, "EC", cfg)
    info = out["info"]["EC"]
    assert info["label_space"] == 5 and info["n_train"] == 4 and info["n_test"] == 3 and info["test_listed"] == 4
    assert info["labels_in_test"] == 4 and info["test_labels_unseen_in_train"] == 0
    assert info["subset_sizes"] == {"all": 3, "id<30%": 1, "id<50%": 1, "id<95%": 2}
    got = {(r["method"], r["subset"], r["metric"]): r for r in out["rows"]}
    # k-NN (k=1): Q0 -> T0 {a}, Q1 -> T1 {b}, Q2 -> T3 {a, d}, all scored 1.0
    # P = (1 + 1 + 1/2) / 3, R = (1 + 1/2 + 1) / 3 -> F = 5/6
    assert got[("knn/sequence", "all", "fmax")]["value"] == pytest.approx(5 / 6)
    assert got[("knn/sequence", "id<95%", "fmax")]["value"] == pytest.approx(0.75)  # Q1, Q2
    assert got[("knn/sequence", "id<30%", "fmax")]["value"] == pytest.approx(2 / 3)  # Q2: p 1/2, r 1
    # MMseqs2 best hit: Q0 -> T0 at identity 1.0 ({a}: 1.0), Q1 -> T1 at 0.8 ({b}: 0.8), Q2 no hit
    # t <= 0.8: P = (1 + 1) / 2, R = (1 + 1/2 + 0) / 3 = 1/2 -> F = 2/3 (t > 0.8: P 1, R 1/3 -> 1/2)
    assert got[("baseline/mmseqs", "all", "fmax")]["value"] == pytest.approx(2 / 3, abs=0.02)
    assert got[("baseline/mmseqs", "id<30%", "fmax")]["value"] == 0.0
    assert ("baseline/kmer (fallback)", "all", "fmax") in got
    row = got[("knn/sequence", "all", "fmax")]
    assert row["n"] == 3 and row["low"] <= row["value"] <= row["high"] and row["resamples"] > 0
    cafa = tmp_path / "out" / "EC" / "EC" / "cafa"
    assert (cafa / "ground_truth_idlt95.tsv").read_text().count("\n") == 3  # Q1 {b, c}, Q2 {d}
    scored = _cafa_fmax(cafa)
    assert scored["knn_sequence.tsv"] == pytest.approx(5 / 6, abs=1e-9)
    assert scored["baseline_mmseqs.tsv"] == pytest.approx(got[("baseline/mmseqs", "all", "fmax")]["value"], abs=1e-9)


def test_cafa_files_rescored_give_the_reported_fmax(tmp_path):
    rng = np.random.default_rng(5)
    n, labels = 40, 15
    truth = rng.random((n, labels)) < 0.2
    truth[np.arange(n), rng.integers(0, labels, n)] = True
    scores = np.where(rng.random((n, labels)) < 0.6, rng.random((n, labels)) * 0.98, 0.0) + truth * 0.0
    scores = np.clip(scores + truth * rng.random((n, labels)) * 0.3, 0, 0.985)  # below the last CAFA threshold
    ids = [f"P{i}" for i in range(n)]
    vocab = [f"GO:{j:07d}" for j in range(labels)]
    write_cafa(tmp_path, vocab, ids, truth, {"knn/x": scores}, {}, "molecular_function")
    assert _cafa_fmax(tmp_path)["knn_x.tsv"] == pytest.approx(FmaxTerms(scores, truth).fmax(), abs=1e-9)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"task.split.method: 'blast'"):
        from_dict(FunctionTaskConfig, {"annotations": "x", "split": {"method": "blast"}}, "task")
    with pytest.raises(ConfigError, match=r"task: unknown key\(s\) \['kk'\]"):
        from_dict(FunctionTaskConfig, {"annotations": "x", "kk": 3}, "task")
    with pytest.raises(ConfigError, match="needs the train and test"):
        from_dict(SplitConfig, {"method": "lists"}, "split")


def test_train_and_test_lists_must_not_share_ids(tmp_path):
    (tmp_path / "ec.tsv").write_text("### EC-numbers\n1.1.1.1\n### PDB-chain\tEC-numbers\nA-A\t1.1.1.1\nB-A\t1.1.1.1\n")
    (tmp_path / "train.txt").write_text("A-A\nB-A\n")
    (tmp_path / "test.txt").write_text("B-A\n")
    ctx = make_context(tmp_path, ["A-A", "B-A"], ["MKTAYIAK", "MKTAYIAK"], {"sequence": np.eye(2)})
    cfg = from_dict(
        FunctionTaskConfig,
        {"annotations": "ec.tsv", "split": {"method": "lists", "train": "train.txt", "test": "test.txt"}},
        "task",
    )
    with pytest.raises(BenchmarkDataError, match=r"train.txt: 1 ids are also in the valid / test lists"):
        run(ctx, "EC", cfg)
