"""benchmarks/structure_profile.py runs end to end on generated backbones (a smoke run of the script)."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def test_profile_script_runs_on_generated_backbones(capsys):
    spec = importlib.util.spec_from_file_location("structure_profile", REPO / "benchmarks" / "structure_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--synthetic", "--lengths", "16", "--batch", "2", "--layers", "1", "--repeats", "1", "--no-profile"]
    assert module.main(args) in (0, None)
    out = capsys.readouterr().out
    assert "16" in out and "forward" in out
