"""Opt-in per-protein outcomes of ``pretrain.eval``: they give back every figure of the result exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.eval.__main__ import evaluate_export, flatten_per_protein, main
from pretrain.eval.metrics import fmax
from pretrain.eval.retrieval import direction_ranks, retrieval_metrics

TASKS = "retrieval,go,ec,fold,baseline"


@pytest.fixture(scope="module")
def evaluated(tiny_export):
    """The tiny export evaluated twice: by default, and with per-protein outcomes."""
    kw = dict(tasks=TASKS, probe_steps=20, max_train_samples=64)
    return evaluate_export(tiny_export, **kw), evaluate_export(tiny_export, **kw, per_protein=True)


def test_default_result_is_unchanged_by_the_option(evaluated):
    plain, with_outcomes = evaluated
    assert "per_protein" not in plain
    rest = {k: v for k, v in with_outcomes.items() if k not in ("per_protein", "timing")}
    assert json.dumps(rest, sort_keys=True) == json.dumps(
        {k: v for k, v in plain.items() if k != "timing"}, sort_keys=True
    )


def test_ranks_scores_and_correctness_give_back_every_figure(evaluated):
    result = evaluated[1]
    out = result["per_protein"]
    n = result["num_proteins"]
    assert out["ids"].shape == (n,) and out["ids"].dtype.kind == "U"
    assert set(out["retrieval"]) == set(result["retrieval"]["directions"])
    for name, ranks in out["retrieval"].items():
        d = result["retrieval"]["directions"][name]
        assert ranks.shape == (n,) and int((ranks >= 0).sum()) == d["n"]
        for k in (1, 5, 10):
            assert float((ranks[ranks >= 0] < k).mean()) == d[f"R@{k}"]
        assert float(np.median(ranks[ranks >= 0]) + 1) == d["median_rank"]
    assert set(out["function"]) == {"GO-MF", "GO-BP", "GO-CC", "EC"}
    for task, slot in out["function"].items():
        res = result["function"][task]
        assert slot["rows"].shape == (res["n_test"],) and slot["truth"].shape[0] == res["n_test"]
        assert set(slot["methods"]) == set(res["methods"])
        for method, scores in slot["methods"].items():
            assert scores.shape == slot["truth"].shape
            assert fmax(scores, slot["truth"])["fmax"] == res["methods"][method]["fmax"], (task, method)
    fold = out["fold"]
    assert set(fold["methods"]) == set(result["fold"]["methods"])
    for method, correct in fold["methods"].items():
        assert correct.dtype == bool and float(correct.mean()) == result["fold"]["methods"][method]["accuracy"]
    flat = flatten_per_protein(out)
    assert "retrieval/seq->text" in flat and "function/EC/methods/probe/concat" in flat and "fold/rows" in flat


def test_direction_ranks_mark_missing_modalities():
    rng = np.random.default_rng(0)
    emb = {m: rng.normal(size=(6, 4)).astype(np.float32) for m in ("sequence", "structure", "text")}
    emb["structure"] /= np.linalg.norm(emb["structure"], axis=1, keepdims=True)
    emb["sequence"][2] = emb["structure"][2]  # unit vectors: protein 2 is its own best match
    present = np.array([True, True, True, True, False, True])
    emb.update(present_sequence=np.ones(6, bool), present_structure=present, present_text=np.ones(6, bool))
    ranks = direction_ranks(emb)
    assert ranks["seq->struct"][4] == -1 and ranks["seq->text"][4] >= 0 and ranks["seq->struct"][2] == 0
    metrics = retrieval_metrics(emb, [1, 3])["directions"]["seq->struct"]
    r = ranks["seq->struct"]
    assert metrics["n"] == 5 and metrics["R@3"] == float((r[r >= 0] < 3).mean())


def test_cli_writes_a_plain_npz(tiny_export, tmp_path, capsys):
    path = tmp_path / "outcomes.npz"
    rc = main(["--model", str(tiny_export), "--tasks", "retrieval", "--per-protein", str(path), "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert "per_protein" not in printed
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"ids", *(f"retrieval/{d}" for d in printed["retrieval"]["directions"])}
        r = data["retrieval/seq->text"]
        assert float((r[r >= 0] < 10).mean()) == printed["retrieval"]["directions"]["seq->text"]["R@10"]
    assert main(["--model", str(tiny_export), "--tasks", "retrieval", "--per-protein", str(tmp_path)]) == 2
    assert "--per-protein" in capsys.readouterr().err
