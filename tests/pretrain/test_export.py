"""``python -m pretrain.export --format hf``: the last export and the best by validation, each with its
transformers directories and a model card that names what it holds (pretrain/export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import load_config, save_config
from pretrain.engine import best_checkpoint
from pretrain.engine.checkpoint_tags import file_sizes
from pretrain.engine.export import export_step
from pretrain.export import main
from pretrain.hf_export import INFO_FILE
from pretrain.models.trimodal import TriModalModel
from tests.conftest import TINY_OVERRIDES

RECORD = {"metric": "val/mean_R@10", "mode": "max", "step": 2, "tag": "step00000002", "score": 0.4375}


def _checkpoint(run: Path, step: int, model: TriModalModel) -> None:
    """A ZeRO-0 fp32 checkpoint as DeepSpeed lays it out (the module's state), complete and latest."""
    tag = run / "checkpoints" / f"step{step:08d}"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    torch.save({"cursor": {"epoch": 0, "batch": step}}, tag / "rank_0.pt")
    (tag / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 1, "files": file_sizes(tag)}))
    (run / "checkpoints" / "latest").write_text(tag.name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, step 2 pinned best; {step: structure encoder state}."""
    run = tmp_path_factory.mktemp("export_cmd") / "run"
    cfg = load_config(overrides=TINY_OVERRIDES)
    save_config(cfg, run / "config.yaml")
    states = {}
    for step in (2, 4):
        torch.manual_seed(step)
        model = TriModalModel(cfg.model)
        _checkpoint(run, step, model)
        states[step] = {k: v.clone() for k, v in model.structure_encoder.state_dict().items()}
    best_checkpoint.write_json(run / best_checkpoint.FILE, RECORD)
    return run, states


def _structure_weights(hf: Path) -> dict:
    return load_file(str(hf / "structure" / "model.safetensors"))


def test_hf_format_converts_the_last_and_the_best_export(run, capsys):
    run, states = run
    (run / "eval.json").write_text(json.dumps({"num_proteins": 3, "shards": "heldout", "retrieval": {}}))
    assert main(["--run-dir", str(run), "--format", "hf"]) == 0
    printed = capsys.readouterr().out
    assert str(run / "export_hf") in printed and str(run / "export_best_hf") in printed
    assert export_step(run / "export") == 4 and export_step(run / "export" / "best") == 2
    for hf, step in ((run / "export_hf", 4), (run / "export_best_hf", 2)):
        got = _structure_weights(hf)
        assert all(torch.equal(got[k], states[step][k]) for k in states[step])
        assert json.loads((hf / INFO_FILE).read_text())["export_step"] == step

    best_info = json.loads((run / "export_best_hf" / INFO_FILE).read_text())
    assert best_info["selection"] == RECORD
    card = (run / "export_best_hf" / "README.md").read_text()
    assert "best checkpoint by validation: step 2 (checkpoint `step00000002`), `val/mean_R@10` = 0.438" in card
    assert "higher is better" in card and 'load_model("RUN/export/best")' in card
    # RUN/eval.json scored the last export: its figures are not this model's
    assert "evaluates the run's last export (`RUN/export`, step 4), not these weights (step 2)" in card
    assert "3 proteins" not in card
    last_card = (run / "export_hf" / "README.md").read_text()
    assert "selection" not in json.loads((run / "export_hf" / INFO_FILE).read_text())
    assert "best checkpoint by validation" not in last_card and 'load_model("RUN/export")' in last_card
    assert "From `RUN/eval.json`: 3 proteins" in last_card


def test_which_picks_one_and_a_missing_best_is_named(run, tmp_path, capsys):
    run, _ = run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export*"))
    assert main(["--run-dir", str(copy), "--format", "hf", "--which", "best"]) == 0
    assert (copy / "export_best_hf").is_dir() and not (copy / "export_hf").exists()
    assert main(["--run-dir", str(copy), "--which", "best"]) == 2
    assert "--which applies to --format hf" in capsys.readouterr().err
    (copy / best_checkpoint.FILE).unlink()  # nothing pinned: no export/best
    assert main(["--run-dir", str(copy), "--format", "hf", "--which", "best"]) == 2
    err = capsys.readouterr().err
    assert "no best export" in err and "best_checkpoint.json" in err
    assert main(["--run-dir", str(copy), "--format", "hf"]) == 0  # the default: the last only
    assert (copy / "export_hf").is_dir()


def test_an_older_run_with_only_best_json_exports_its_best(run, tmp_path):
    """Runs before best_checkpoint.json recorded RUN/best.json (step and score of the best mean R@10)."""
    run, states = run
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("export*", best_checkpoint.FILE))
    (old / best_checkpoint.LEGACY_FILE).write_text(json.dumps({"step": 2, "score": 0.4375, "metric": "val/mean_R@10"}))
    assert main(["--run-dir", str(old)]) == 0
    assert json.loads((old / "export" / "best" / best_checkpoint.RECORD_IN_EXPORT).read_text()) == RECORD
    assert export_step(old / "export" / "best") == 2
