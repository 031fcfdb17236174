import json

import numpy as np

from pretrain.eval.metrics import fmax, micro_aupr
from pretrain.eval.retrieval import retrieval_metrics
from pretrain.report import main

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(run):
    run.mkdir()
    rows = []
    for step in range(10, 101, 10):
        rows.append(
            {
                "step": step,
                "loss": 12 - step / 20,
                "loss_seq_text": 4 - step / 60,
                "loss_seq_struct": 4.1,
                "lr": 1e-3,
                "samples_per_s": 30.0,
            }
        )
        if step % 50 == 0:
            rows.append(
                {
                    "step": step,
                    "val/mean_R@1": step / 500,
                    "val/mean_R@10": step / 200,
                    "val/seq->text/R@10": step / 250,
                    "val/num_proteins": 256,
                }
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 11')  # torn last line
    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=(n, 8)).astype(np.float32)
    emb = {m: x + 0.5 * rng.normal(size=x.shape).astype(np.float32) for m in ("sequence", "structure", "text")}
    emb.update({f"present_{m}": np.ones(n, bool) for m in ("sequence", "structure", "text")})
    truth = rng.random((n, 6)) < 0.3
    methods = {}
    for name, noise in (("probe/sequence", 0.3), ("zeroshot/sequence", 0.8), ("baseline/kmer", 0.5)):
        s = np.clip(truth + noise * rng.random(truth.shape), 0, 1)
        methods[name] = {**fmax(s, truth), "aupr": micro_aupr(s, truth)}
    ev = {
        "shards": "fake/heldout",
        "num_proteins": n,
        "retrieval": retrieval_metrics(emb, [1, 5, 10], groups=np.arange(n) // 2),
        "function": {
            "GO-MF": {"n_test": n, "n_labels": 6, "methods": methods},
            "EC": {"n_test": n, "n_labels": 6, "methods": methods},
            "GO-CC": {"skipped": "no held-out protein has a label"},
        },
        "fold": {
            "key": "family",
            "n_test": n,
            "n_classes": 4,
            "majority_accuracy": 0.25,
            "methods": {"probe/concat": {"accuracy": 0.9}, "baseline/kmer": {"accuracy": 0.8}},
        },
    }
    (run / "eval.json").write_text(json.dumps(ev))
    return run


def test_report_writes_pngs_and_markdown(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert main(["--run-dir", str(run)]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    pngs = ["fold.png", "function_fmax.png", "function_pr.png", "loss.png", "recall_at_k.png", "validation.png"]
    assert files == sorted(["README.md", *pngs])
    for name in pngs:
        data = (run / "report" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    md = (run / "report" / "README.md").read_text()
    for name in pngs:
        assert f"({name})" in md
    assert "| seq->text | 60 |" in md and "baseline/kmer" in md and "majority class" in md
    assert "GO-CC | no held-out protein has a label" in md


def test_report_on_an_empty_run_and_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--run-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["README.md"]
    assert "Nothing to report" in (tmp_path / "rep" / "README.md").read_text()
    assert main(["--run-dir", str(tmp_path / "missing")]) == 2


def test_a_run_stopped_on_non_finite_steps_is_reported(tmp_path, capsys):
    """The logger writes NaN as null; the runs stopped on non-finite losses are the ones people inspect."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "loss": None, "lr": 1e-3}, {"step": 2, "loss": 9.5, "lr": 1e-3, "samples_per_s": 20.0}]
    rows += [{"step": 3, "loss": None, "lr": 1e-3, "samples_per_s": 20.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert main(["--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert "loss 9.500 (step 2) → non-finite" in (run / "report" / "README.md").read_text()
