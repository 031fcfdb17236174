"""End-to-end: the paper recipes, shrunk to tiny encoders by overrides, train on 2 gloo ranks.

Everything but the sizes (and the weight files, which do not exist here) comes from the recipe
files: loss weights and objective, pooling, schedule shape, false-negative grouping. The DeepSpeed
JSON is the recipe's own (align_pro_650M: ZeRO-3; protclip_650M: ZeRO-3). The Align-Pro run also
switches on ``loss.false_negatives=text`` to exercise that path end to end.
"""

from __future__ import annotations

import json

import pytest

from pretrain.config import CONFIGS_DIR
from tests.conftest import run_launcher

pytestmark = pytest.mark.slow

SHRINK = [
    "model.sequence.weights=null",
    "model.sequence.embed_dim=32",
    "model.sequence.attention_heads=4",
    "model.sequence.max_length=80",
    "model.text.pretrained_dir=null",
    "model.text.hidden_size=32",
    "model.text.attention_heads=4",
    "model.text.intermediate_size=64",
    "model.text.max_length=64",
    "model.structure.node_hidden=[16, 4]",
    "model.structure.edge_hidden=[16, 1]",
    "model.embed_dim=32",
    "data.loader=local",
    "train.max_steps=3",
    "train.stage1_steps=1",
    "train.checkpoint_every=3",
    "train.eval_at_end=false",
]
PROTCLIP_SHRINK = [
    "model.sequence.max_length=80",  # the recipe's 1022 would dominate the CPU time
    "loss.protclip.bsr_hidden=32",
    "loss.protclip.bsr_heads=4",
    "loss.protclip.pda_proj_dim=16",
    "loss.protclip.pda_prototypes=8",
]
ALIGN_PRO_TERMS = [
    "loss_seq_struct",
    "loss_seq_text",
    "loss_struct_text",
    "loss_intra_seq",
    "loss_intra_struct",
    "loss_intra_text",
]
CASES = {
    # with false-negative grouping on: collate group ids -> trainer -> grouped loss across 2 ranks
    "align_pro_650M": (["loss.false_negatives=text"], ALIGN_PRO_TERMS),
    "protclip_650M": (PROTCLIP_SHRINK, ["loss_gc", "loss_mlm", "loss_bsr", "loss_pda"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_shrunk_paper_recipe_trains_two_ranks(tmp_path, small_demo, name):
    extra, terms = CASES[name]
    run = tmp_path / "run"
    recipe = CONFIGS_DIR / "recipes" / f"{name}.yaml"
    p = run_launcher(run, small_demo, [*SHRINK, *extra], recipe=recipe, config="zero3.json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ["loss", *terms]:
            assert key in r and r[key] == r[key], key  # present and not NaN
    resolved = (run / "config.yaml").read_text()
    assert "esm2_t33_650M" in resolved and "pooling: mean" in resolved  # the recipe, not the demo
    assert (run / "checkpoints" / "latest").read_text() == "step00000003"
