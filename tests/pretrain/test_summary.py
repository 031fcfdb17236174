"""``python -m pretrain.summary`` (pretrain/summary.py) on finished, failing and live runs."""

import json

from pretrain.summary import main


def _run(tmp_path, rows, tail=""):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run


def test_summary_of_a_finished_run(tmp_path, capsys):
    rows = [{"step": 10, "loss": 13.4, "samples_per_s": 50.0}, {"step": 20, "loss": 10.5, "samples_per_s": 52.0}]
    assert main(["--run-dir", str(_run(tmp_path, rows))]) == 0
    assert (
        "steps: 20  loss: 13.400 (step 10) -> 10.500 (step 20)  throughput: 52.0 samples/s" in capsys.readouterr().out
    )


def test_summary_of_a_run_stopped_on_non_finite_steps_while_a_line_is_half_written(tmp_path, capsys):
    rows = [{"step": 1, "loss": None}, {"step": 2, "loss": 9.5}, {"step": 3, "loss": None, "samples_per_s": 20.0}]
    assert main(["--run-dir", str(_run(tmp_path, rows, tail='{"step": 4, "lo'))]) == 0
    assert "steps: 3  loss: 9.500 (step 2) -> non-finite (step 3)  throughput: 20.0" in capsys.readouterr().out


def test_summary_without_a_run_directory(tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path / "missing")]) == 2
    assert "no run directory" in capsys.readouterr().err
