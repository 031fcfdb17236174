"""Training from shards on S3 with checkpoints and export on S3 (a real S3 API on 127.0.0.1).

The DeepSpeed launcher runs 2 CPU ranks exactly as a user would; the moto server lives in the
test process and the ranks reach it through AWS_ENDPOINT_URL. No traffic leaves loopback.
"""

from __future__ import annotations

import json

import pytest

from data_shards import storage
from tests.conftest import run_launcher
from tests.s3_server import s3  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

# The recipe of test_resume's and test_ray_job's uninterrupted reference run, so that the session
# launches that run once for all three (max_steps sets the cosine schedule: it must match too).
COMMON = [
    "train.max_steps=5",
    "train.checkpoint_every=2",
    "train.stage1_steps=1",
    "train.eval_at_end=false",
    "data.loader=local",
]
TERMS = ["loss", "loss_seq_struct", "loss_seq_text", "loss_struct_text", "loss_intra_seq", "loss_intra_text"]


def _losses(run_dir) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r for r in rows if "loss" in r}


def test_s3_shards_train_and_a_checkpoint_round_trips_through_s3(tmp_path, small_demo, s3, reference_run):  # noqa: F811
    storage.upload_dir(small_demo, s3.url("demo"), last=("manifest.json",))
    on_s3 = [
        f"data.train_shards={s3.url('demo', 'train')}",
        f"data.eval_shards={s3.url('demo', 'heldout')}",
        f"train.remote_dir={s3.url('runs', 'r1')}",
        *COMMON,
    ]
    ref = reference_run(COMMON)  # local shards, local checkpoints

    # Machine A trains from S3, publishes the step-2 checkpoint, and dies after step 3.
    crashed = run_launcher(tmp_path / "machine_a", small_demo, on_s3, env={"ALIGN_PRO_KILL_AT_STEP": "3"})
    assert crashed.returncode != 0
    assert storage.read_text(s3.url("runs", "r1", "checkpoints", "latest")) == "step00000002"

    # Machine B has nothing local: it resumes from S3 and finishes.
    resumed = run_launcher(tmp_path / "machine_b", small_demo, on_s3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout

    want, got = _losses(ref), _losses(tmp_path / "machine_b")
    assert sorted(got) == [1, 2, 3, 4, 5]  # steps 1-2 come back with the checkpoint's metrics.jsonl
    for step in range(1, 6):
        for term in TERMS:
            assert got[step][term] == pytest.approx(want[step][term], rel=1e-6, abs=1e-6), (step, term)

    keys = s3.keys("runs/r1/")
    assert storage.read_text(s3.url("runs", "r1", "checkpoints", "latest")) == "step00000005"
    assert {"runs/r1/checkpoints/step00000005/COMPLETE", "runs/r1/checkpoints/step00000005/rank_1.pt"} <= set(keys)
    assert {"runs/r1/export/model.safetensors", "runs/r1/export/config.yaml", "runs/r1/config.yaml"} <= set(keys)

    from pretrain.engine.export import load_exported

    model, cfg = load_exported(s3.url("runs", "r1", "export"))
    assert cfg.train.remote_dir == s3.url("runs", "r1")
    assert sum(p.numel() for p in model.parameters()) > 0
    # The command-line tools take the export URL as well (a Path() would fold s3:// into s3:/).
    from pretrain.eval.__main__ import main as eval_main
    from pretrain.eval.export_embeddings import main as embed_main

    held_out = str(small_demo / "heldout")
    common = ["--model", s3.url("runs", "r1", "export"), "--shards", held_out, "--max-samples", "8", "--no-progress"]
    assert eval_main([*common, "--tasks", "retrieval", "--out", str(tmp_path / "eval.json")]) == 0
    assert embed_main([*common, "--modality", "sequence", "--out", str(tmp_path / "emb")]) == 0
    from pretrain.search import main as search_main

    index = ["--index", str(tmp_path / "emb"), "--target", "sequence", "-k", "3"]
    assert search_main(["binds ATP", *index, "--model", s3.url("runs", "r1", "export")]) == 0

    # Machine C has one rank and nothing local: the 2-rank checkpoint is fetched from S3 and resumed
    # through a universal conversion (elastic resume from object storage), then trains one more step.
    longer = [o for o in on_s3 if not o.startswith("train.max_steps=")] + ["train.max_steps=6"]
    shrunk = run_launcher(tmp_path / "machine_c", small_demo, longer, ranks=1)
    assert shrunk.returncode == 0, shrunk.stderr[-3000:]
    assert "resumed from step 5 (stage 2, epoch 0, 2 -> 1 ranks)" in shrunk.stdout
    assert (tmp_path / "machine_c" / "checkpoints" / "step00000005_universal" / "UNIVERSAL_COMPLETE").is_file()
    assert sorted(_losses(tmp_path / "machine_c")) == [1, 2, 3, 4, 5, 6]


def test_wrong_credentials_stop_the_launch_with_one_clear_error(tmp_path, small_demo, s3):  # noqa: F811
    over = [f"data.train_shards={s3.url('nowhere', 'train')}", *COMMON]
    run = run_launcher(tmp_path / "denied", small_demo, over, env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert run.returncode != 0
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "align-pro: error:" in line]
    assert len(errors) == 1, run.stderr[-3000:]
    assert s3.url("nowhere", "train", "manifest.json") in errors[0] and "access denied" in errors[0]
