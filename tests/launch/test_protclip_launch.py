"""End-to-end: ``loss.objective=protclip`` trains with the real launcher (2 gloo ranks, ZeRO-2)."""

from __future__ import annotations

import json

import pytest

from pretrain.engine.export import load_exported
from tests.conftest import run_launcher

pytestmark = pytest.mark.slow

TERMS = ["loss", "loss_gc", "loss_mlm", "loss_bsr", "loss_pda"]


def test_two_rank_zero2_protclip_trains_and_exports(tmp_path, small_demo):
    run = tmp_path / "run"
    over = ["loss.objective=protclip", "data.loader=local", "train.max_steps=3", "train.stage1_steps=1"]
    over += [
        "train.frozen_encoders=[text]",
        "train.activation_checkpointing=[sequence, text]",
    ]  # as the recipe, and more
    p = run_launcher(run, small_demo, over, config="zero2.json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in TERMS:
            assert key in r and r[key] == r[key], key  # present and not NaN
        assert "loss_seq_struct" not in r
    model, cfg = load_exported(run / "export")
    assert cfg.loss.objective == "protclip" and model.protclip is not None
