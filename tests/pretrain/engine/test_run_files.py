"""The run-directory files the trainer keeps (pretrain/engine/run_files.py): a crash must not block a resume."""

import json

from pretrain.engine.run_files import truncate_jsonl


def test_truncation_on_resume_drops_later_rows_and_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # SIGKILL mid-write
    truncate_jsonl(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    truncate_jsonl(tmp_path / "absent.jsonl", 3)  # nothing to do
