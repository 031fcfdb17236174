"""``python -m pretrain.eval`` on an untrained tiny export over a small demo corpus."""

import json
import shutil

import numpy as np
import pytest

from pretrain.engine.export import load_exported
from pretrain.eval.__main__ import main, parse_tasks
from pretrain.eval.embed import embed_shards
from pretrain.eval.labels import LabelSpace
from pretrain.eval.probes import load_probe, predict

METHODS = {
    "probe/sequence",
    "probe/structure",
    "probe/concat",
    "zeroshot/sequence",
    "zeroshot/structure",
    "baseline/kmer",
}


@pytest.fixture
def run_dir(tiny_export, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_export, run / "export")
    return run


def test_all_tasks_on_a_run_dir(run_dir, tiny_obo, capsys):
    rc = main(
        ["--run-dir", str(run_dir), "--tasks", "all", "--go-obo", str(tiny_obo), "--probe-steps", "30", "--no-progress"]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["num_proteins"] == 48 and ev["tasks"] == sorted(["retrieval", "go", "ec", "fold", "zeroshot", "baseline"])
    # retrieval keeps the keys the trainer and the summary read, and adds multi-positive + curves
    r = ev["retrieval"]
    assert len(r["directions"]) == 6 and set(r["summary"]) == set(r["directions"])
    d = r["directions"]["seq->text"]
    assert {"R@1", "R@10", "chance_R@10", "median_rank", "R@10_multi", "chance_R@10_multi"} <= set(d)
    assert len(d["curve"]["exact"]) == 48 and "curve" not in printed["retrieval"]["directions"]["seq->text"]
    # GO-MF/BP/CC and EC: every method scored, on the same held-out proteins
    for task in ("GO-MF", "GO-BP", "GO-CC", "EC"):
        res = ev["function"][task]
        assert set(res["methods"]) == METHODS, task
        assert res["n_test"] > 0
        for m in res["methods"].values():
            assert 0.0 <= m["fmax"] <= 1.0 and 0.0 <= m["aupr"] <= 1.0
    go = ev["function"]["GO-MF"]
    assert go["propagated"] and go["unknown_go_ids"] > 0  # demo ids are made up: not in the tiny OBO
    fold = ev["fold"]
    assert fold["key"] == "family" and fold["n_classes"] == 32 and fold["n_test"] == 48
    assert set(fold["methods"]) == {"probe/sequence", "probe/structure", "probe/concat", "baseline/kmer"}
    # the 3-mer baseline finds same-family proteins on the demo corpus (shared motifs)
    assert fold["methods"]["baseline/kmer"]["accuracy"] > 0.5
    # probes saved with their label maps; reloaded probes score like the evaluated ones
    for task in ("go_mf", "go_bp", "go_cc", "ec", "fold"):
        d = run_dir / "probes" / task
        assert (d / "labels.json").is_file() and (d / "concat.safetensors").is_file(), task
    space = LabelSpace.load(run_dir / "probes" / "ec" / "labels.json")
    probe, meta = load_probe(run_dir / "probes" / "ec" / "sequence.safetensors")
    assert meta["n_train"] > 0 and any(label.endswith(".") for label in space.labels)
    model, cfg = load_exported(run_dir / "export")
    emb = embed_shards(model, cfg, cfg.data.eval_shards, 48)
    assert predict(probe, emb["sequence"]).shape == (48, len(space))


def test_model_dir_with_baseline_only_and_errors(tiny_export, capsys, tmp_path):
    out = tmp_path / "full.json"
    rc = main(["--model", str(tiny_export), "--tasks", "retrieval,baseline", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["function"]["GO-MF"]["methods"]) == {"baseline/kmer"}  # no probes trained
    assert set(printed["fold"]["methods"]) == {"baseline/kmer"}
    assert "curve" in json.loads(out.read_text())["function"]["EC"]["methods"]["baseline/kmer"]
    assert main(["--model", str(tiny_export), "--tasks", "retrieval,nope"]) == 2
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err


def test_held_out_proteins_also_in_the_training_shards_are_counted(tiny_export, capsys, caplog):
    assert main(["--model", str(tiny_export), "--tasks", "baseline", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["settings"]["train_test_shared_ids"] == 0 and "memorisation" not in caplog.text
    argv = ["--model", str(tiny_export), "--tasks", "baseline", "--train-shards", res["shards"], "--no-progress"]
    assert main([*argv, "--max-samples", "12"]) == 0  # the held-out shards against themselves
    assert json.loads(capsys.readouterr().out)["settings"]["train_test_shared_ids"] == 12
    assert "12 of the 12 held-out proteins" in caplog.text


def test_fold_key_absent_is_skipped(tiny_export, capsys):
    rc = main(
        [
            "--model",
            str(tiny_export),
            "--tasks",
            "fold",
            "--fold-key",
            "scop_fold",
            "--probe-steps",
            "5",
            "--max-samples",
            "8",
            "--max-train-samples",
            "8",
            "--no-progress",
        ]
    )
    assert rc == 0
    fold = json.loads(capsys.readouterr().out)["fold"]
    assert fold["key"] == "scop_fold" and "skipped" in fold


def test_parse_tasks():
    assert parse_tasks("all") == {"retrieval", "go", "ec", "fold", "zeroshot", "baseline"}
    assert parse_tasks("retrieval, go") == {"retrieval", "go"}
    with pytest.raises(ValueError):
        parse_tasks("")


def test_embed_shards_matches_the_stream_batches(tiny_export):
    """The one-pass embedding keeps the rows, ids and numbers of iter_eval_batches."""
    from pretrain.data.stream import iter_eval_batches

    model, cfg = load_exported(tiny_export)
    emb = embed_shards(model, cfg, cfg.data.eval_shards, 16, max_samples=20)
    batches = list(iter_eval_batches(cfg, cfg.data.eval_shards, 16, 20))
    ids = [i for b, _ in batches for i in b["ids"]]
    assert emb["ids"] == ids == emb["annotations"].ids
    first = batches[0][0]
    seq = model.encode_sequence(first["seq_tokens"]).detach().numpy()
    np.testing.assert_allclose(emb["sequence"][:16], seq, atol=1e-5)
    assert emb["annotations"].texts[0] and emb["annotations"].meta[0]["family"]


def test_zeroshot_alone_needs_no_training_set(tiny_export, tmp_path, capsys):
    argv = ["--model", str(tiny_export), "--tasks", "zeroshot", "--train-shards", str(tmp_path / "none")]
    assert main([*argv, "--max-samples", "12", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["function"]) == {"GO-MF", "GO-BP", "GO-CC", "EC"} and "fold" not in res
    assert set(res["function"]["EC"]["methods"]) == {"zeroshot/sequence", "zeroshot/structure"}
    assert res["settings"]["num_train_proteins"] == 0
