"""benchmarks/length_grouping_speed.py: both plans time the same proteins; grouping pads less (quick run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import length_grouping_speed  # noqa: E402


def test_quick_run_times_the_same_proteins_with_less_padding(tmp_path, capsys):
    raw = tmp_path / "raw.json"
    assert length_grouping_speed.main(["--quick", "--work", str(tmp_path / "work"), "--json", str(raw)]) == 0
    result = json.loads(raw.read_text())
    none, window = result["rows"]["none"], result["rows"]["window"]
    assert "demo corpus" in result["data"]  # --quick never reads the shared data
    assert none["real_tokens"] == window["real_tokens"] > 0  # the same proteins, composed differently
    assert window["padding"] < none["padding"] and window["positions"] < none["positions"]
    assert window["epoch_padding"] < none["epoch_padding"]
    assert len(none["wall_s"]) == len(window["cpu_s"]) == 1 and min(none["wall_s"] + window["wall_s"]) > 0
    assert len(result["speedup"]["wall"]) == 1
    assert "| window |" in capsys.readouterr().out
