"""pretrain.engine.best_checkpoint: the best checkpoint by validation is pinned, survives retention and a
resume, and is exported as RUN/export/best.

The retention test drives ``checkpoint.save`` on a real DeepSpeed ZeRO-2 engine (1 gloo rank), noting
chosen scores the way the validator does; the end-to-end test runs the Trainer (ZeRO-3) with zero-shot
EC Fmax as the selection metric and exports.
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import pytest
import torch

from pretrain.engine import best_checkpoint
from pretrain.run import close_process_group
from tests.conftest import free_port
from tests.pretrain.engine.trainer_ranks import train_rank
from tests.spawn_ranks import join_group, run_ranks, trainer_overrides

TIMEOUT_S = 240.0


def _engine():
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _step(engine) -> None:
    engine.backward(engine(torch.randn(2, 8)).pow(2).mean())
    engine.step()


def _tags(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.is_dir())


# step -> validation score noted just before that step's checkpoint (max is best)
SCORES = {1: 0.2, 2: 0.5, 3: 0.3, 4: 0.4, 5: 0.1}


def _retention_worker(port: int, out: str) -> None:
    join_group(0, 1, port)
    try:
        from pretrain.engine import checkpoint
        from pretrain.run import init_process_group

        init_process_group()
        run = Path(out) / "run"
        ckpt = run / "checkpoints"
        engine = _engine()
        seen = {}

        def save(step):
            rank_state = {"cursor": {"epoch": 0, "batch": step}, "rng": checkpoint.rng_state()}
            checkpoint.save(engine, ckpt, step, {"step": step}, rank_state, keep=1)
            seen[step] = (_tags(ckpt), best_checkpoint.read(run))

        for step, score in SCORES.items():
            _step(engine)
            best_checkpoint.note_validation(engine, "val/mean_R@10", "max", score)
            save(step)
        # Step 6 validated at 0.9, but the weights moved (step 7) before the next checkpoint: not pinned.
        _step(engine)
        best_checkpoint.note_validation(engine, "val/mean_R@10", "max", 0.9)
        _step(engine)
        save(7)
        # A resumed run: a fresh engine loads step 7 and goes on; it must beat the pinned 0.5.
        engine = _engine()
        client, _ = checkpoint.load(engine, ckpt)
        seen["resumed_from"] = client["step"]
        for step, score in ((8, 0.45), (9, 0.6)):
            _step(engine)
            best_checkpoint.note_validation(engine, "val/mean_R@10", "max", score)
            save(step)
        torch.save(seen, Path(out) / "rank0.pt")
    except Exception:  # noqa: BLE001 - reported to the parent
        (Path(out) / "rank0.err").write_text(traceback.format_exc())
        raise
    finally:
        close_process_group()


@pytest.mark.slow
def test_the_pinned_best_survives_retention_and_a_resume(tmp_path):
    port = free_port()
    (seen,) = run_ranks(_retention_worker, lambda r: (port, str(tmp_path)), 1, tmp_path, TIMEOUT_S, "rank")
    best = {s: (v[1]["step"], v[1]["score"]) if v[1] else None for s, v in seen.items() if isinstance(s, int)}
    assert best[1] == (1, 0.2) and best[2] == (2, 0.5) and best[3] == best[4] == best[5] == (2, 0.5)
    assert best[7] == (2, 0.5)  # 0.9 scored weights that were never saved
    # keep=1 deletes everything but the newest, except the pinned step 2
    assert seen[1][0] == ["step00000001"]
    assert seen[5][0] == ["step00000002", "step00000005"]
    assert seen[7][0] == ["step00000002", "step00000007"]
    assert seen["resumed_from"] == 7
    assert best[8] == (2, 0.5) and seen[8][0] == ["step00000002", "step00000008"]  # the resumed run keeps it
    assert best[9] == (9, 0.6) and seen[9][0] == ["step00000009"]  # a better one replaces it; the old one goes
    record = json.loads((tmp_path / "run" / best_checkpoint.FILE).read_text())
    assert record == {"metric": "val/mean_R@10", "mode": "max", "step": 9, "tag": "step00000009", "score": 0.6}


class _Engine:
    """Stands for DeepSpeed's counters only (what promote compares); no weights involved."""

    global_steps = 3
    global_samples = 12


def test_promote_modes_abandoned_timelines_and_damaged_files(tmp_path):
    engine = _Engine()
    assert best_checkpoint.promote(tmp_path, engine, 3, "step3") is None  # nothing noted
    best_checkpoint.note_validation(engine, "val/loss", "min", 2.0)
    assert best_checkpoint.promote(tmp_path, engine, 3, "step3")["tag"] == "step3"
    best_checkpoint.note_validation(engine, "val/loss", "min", 2.5)
    assert best_checkpoint.promote(tmp_path, engine, 4, "step4")["tag"] == "step3"  # higher is worse
    best_checkpoint.note_validation(engine, "val/loss", "min", float("nan"))
    assert best_checkpoint.promote(tmp_path, engine, 5, "step5")["tag"] == "step3"  # NaN never wins
    assert best_checkpoint.pinned_tag(tmp_path, 5) == "step3"
    assert best_checkpoint.pinned_tag(tmp_path, 2) is None  # resumed before the best: not ours to keep
    assert best_checkpoint.promote(tmp_path, _Engine(), 2, "step2") is None  # ... and dropped
    assert not (tmp_path / best_checkpoint.FILE).exists()
    best_checkpoint.note_validation(engine, "val/loss", "min", 3.0)
    best_checkpoint.promote(tmp_path, engine, 6, "step6")
    best_checkpoint.note_validation(engine, "val/mean_R@10", "max", 0.1)  # the recipe changed its metric
    assert best_checkpoint.promote(tmp_path, engine, 7, "step7")["metric"] == "val/mean_R@10"
    (tmp_path / best_checkpoint.FILE).write_text('{"step": "7"')
    assert best_checkpoint.read(tmp_path) is None
    (tmp_path / best_checkpoint.FILE).write_text(
        json.dumps({"metric": "m", "mode": "max", "step": 1, "tag": "../x", "score": 1})
    )
    assert best_checkpoint.read(tmp_path) is None  # a tag must name a directory of RUN/checkpoints
    with pytest.raises(ValueError, match="select_mode"):
        best_checkpoint.note_validation(engine, "val/loss", "lowest", 1.0)


def _trainer_worker(port: int, out: str, shards: str, run_dir: str, overrides: list) -> None:
    # ZeRO-3: the zero-shot prompts go through the text encoder outside the engine's forward
    train_rank(0, 1, port, out, shards, run_dir, "zero3.json", overrides, write_config=True)


SELECT = [
    "train.stage1_steps=0",
    "train.validate_every=1",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=1",
    "eval.validation_samples=48",
    "eval.validation_zeroshot=[ec]",
    "eval.select_metric=val/zeroshot_fmax_ec",
]


@pytest.mark.slow
def test_trainer_pins_the_best_zero_shot_checkpoint_and_exports_it(tmp_path, small_demo):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pretrain.engine.export import consolidate_checkpoint, export_checkpoint, export_step

    run = tmp_path / "run"
    over = [*SELECT, "train.max_steps=4"]
    port = free_port()
    run_ranks(_trainer_worker, lambda r: (port, str(tmp_path), str(small_demo), str(run), over), 1, tmp_path,
              TIMEOUT_S, "rank")  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    val = {r["step"]: r["val/zeroshot_fmax_ec"] for r in rows if "val/zeroshot_fmax_ec" in r}
    assert sorted(val) == [1, 2, 3, 4] and all(v is not None and 0 < v <= 1 for v in val.values())
    want_step = max(val, key=lambda s: (val[s], -s))  # strictly better replaces: the first maximum
    record = best_checkpoint.read(run)
    assert (record["step"], record["metric"]) == (want_step, "val/zeroshot_fmax_ec")
    assert math.isclose(record["score"], val[want_step], rel_tol=1e-9)
    kept = {"step00000004", record["tag"]}
    assert set(_tags(run / "checkpoints")) == kept  # keep_checkpoints=1, plus the pinned best
    assert not (run / best_checkpoint.LEGACY_FILE).exists()  # one record of the best

    best_dir = run / "export" / "best"
    assert export_step(best_dir) == want_step and export_step(run / "export") == 4
    with safe_open(str(best_dir / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["select_metric"] == "val/zeroshot_fmax_ec" and float(meta["select_score"]) == record["score"]
    assert json.loads((best_dir / "best.json").read_text()) == record
    want = consolidate_checkpoint(run / "checkpoints" / record["tag"])
    got = load_file(str(best_dir / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in got)

    # The offline export (python -m pretrain.export) writes the same best beside the last.
    (run / "export").rename(tmp_path / "engine_export")
    export_checkpoint(run)
    again = load_file(str(run / "export" / "best" / "model.safetensors"))
    assert all(torch.equal(again[k], got[k]) for k in got)
    assert export_step(run / "export" / "best") == want_step


def test_select_metric_must_be_a_validation_metric_of_the_recipe(small_demo, tmp_path):
    from pretrain.config import ConfigError, load_config
    from pretrain.run import prepare

    with pytest.raises(ConfigError, match="eval.validation_zeroshot"):
        load_config(overrides=["eval.select_metric=val/zeroshot_fmax_ec"])
    with pytest.raises(ConfigError, match="eval.select_mode"):
        load_config(overrides=["eval.select_mode=best"])
    with pytest.raises(ConfigError, match="go_xx"):
        load_config(overrides=["eval.validation_zeroshot=[go_xx]"])
    with pytest.raises(ConfigError, match="train.validate_every=0"):
        over = [*trainer_overrides(small_demo), "train.validate_every=0", "eval.select_metric=val/mean_R@10"]
        prepare(None, over, "zero2.json", tmp_path / "r", 1)


def test_remote_retention_keeps_the_pinned_tag(tmp_path):
    from pretrain.engine import checkpoint_store

    remote = tmp_path / "remote"  # a shared file system location: the same code path as object storage
    for step in (1, 2, 3):
        tag = remote / "checkpoints" / f"step{step:08d}"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 1}))
    checkpoint_store._prune(str(remote), keep=1, step=3, pinned="step00000001")
    assert _tags(remote / "checkpoints") == ["step00000001", "step00000003"]
    checkpoint_store._prune(str(remote), keep=1, step=3)
    assert _tags(remote / "checkpoints") == ["step00000003"]


def test_selection_defaults_to_mean_r10_higher_is_better():
    from pretrain.eval.config import EvalConfig

    assert best_checkpoint.selection(EvalConfig()) == ("val/mean_R@10", "max")
    assert best_checkpoint.selection(EvalConfig(ks=[1, 5])) == ("val/mean_R@5", "max")  # 10 is no cut-off
    chosen = EvalConfig(select_metric="val/zeroshot_fmax_ec", select_mode="min")
    assert best_checkpoint.selection(chosen) == ("val/zeroshot_fmax_ec", "min")


def test_a_run_without_select_metric_pins_its_best_mean_r10(tmp_path):
    """What the trainer's validation does on every rank: the default metric is noted and pinned."""
    from pretrain.eval.config import EvalConfig

    engine, cfg = _Engine(), EvalConfig()
    val = {"val/mean_R@10": 0.25, "val/mean_R@1": 0.5, "val/time_s": 3.0}
    assert best_checkpoint.note_metrics(engine, cfg, val) == ("val/mean_R@10", 0.25)
    record = best_checkpoint.promote(tmp_path, engine, 3, "step00000003")
    assert record == {"metric": "val/mean_R@10", "mode": "max", "step": 3, "tag": "step00000003", "score": 0.25}
    assert best_checkpoint.read(tmp_path) == record
    with pytest.raises(KeyError, match=r"val/mean_R@10.*val/mean_R@1"):
        best_checkpoint.note_metrics(engine, cfg, {"val/mean_R@1": 0.5})


def test_an_older_runs_best_json_is_read_beaten_and_dropped(tmp_path, caplog):
    """Runs written before best_checkpoint.json kept RUN/best.json: a resume reads it back."""
    legacy = tmp_path / best_checkpoint.LEGACY_FILE
    legacy.write_text(json.dumps({"step": 4, "score": 0.3, "metric": "val/mean_R@10"}))
    old = {"metric": "val/mean_R@10", "mode": "max", "step": 4, "tag": "step00000004", "score": 0.3}
    assert best_checkpoint.read(tmp_path) == old
    assert best_checkpoint.pinned_tag(tmp_path, 6) == "step00000004"  # retention keeps its checkpoint
    engine = _Engine()
    best_checkpoint.note_validation(engine, "val/mean_R@10", "max", 0.25)
    assert best_checkpoint.promote(tmp_path, engine, 6, "step00000006") == old  # must beat the old best
    assert not (tmp_path / best_checkpoint.FILE).exists()
    best_checkpoint.note_validation(engine, "val/mean_R@10", "max", 0.35)
    assert best_checkpoint.promote(tmp_path, engine, 8, "step00000008")["tag"] == "step00000008"
    assert best_checkpoint.read(tmp_path)["score"] == 0.35  # best_checkpoint.json wins over best.json
    # A legacy best of a step after the resumed one (an abandoned timeline) is dropped for good.
    (tmp_path / best_checkpoint.FILE).unlink()
    legacy.write_text(json.dumps({"step": 9, "score": 0.9}))
    assert best_checkpoint.read(tmp_path)["metric"] == "val/mean_R@10"  # older files named no metric
    assert best_checkpoint.promote(tmp_path, _Engine(), 7, "step00000007") is None
    assert best_checkpoint.read(tmp_path) is None and not legacy.exists()
    legacy.write_text('{"step": 4, "sco')  # cut by a kill before its writes were atomic
    with caplog.at_level("WARNING"):
        assert best_checkpoint.read(tmp_path) is None
    assert "best.json" in caplog.text and "damaged" in caplog.text


def test_the_remote_keeps_an_older_runs_best_as_best_checkpoint_json(tmp_path):
    """train.remote_dir keeps no best.json: an older run's record goes up converted, as read() sees it."""
    assert best_checkpoint.published_record(tmp_path) is None  # nothing to publish
    legacy = tmp_path / best_checkpoint.LEGACY_FILE
    legacy.write_text(json.dumps({"step": 4, "score": 0.3}))
    old = {"metric": "val/mean_R@10", "mode": "max", "step": 4, "tag": "step00000004", "score": 0.3}
    assert json.loads(best_checkpoint.published_record(tmp_path)) == best_checkpoint.read(tmp_path) == old
    assert not (tmp_path / best_checkpoint.FILE).exists()  # converted for the upload only
    new = {"metric": "val/mean_R@10", "mode": "max", "step": 6, "tag": "step00000006", "score": 0.4}
    best_checkpoint.write_json(tmp_path / best_checkpoint.FILE, new)
    assert json.loads(best_checkpoint.published_record(tmp_path)) == new  # the run's own record wins
    (tmp_path / best_checkpoint.FILE).unlink()
    legacy.write_text('{"step": 4, "sco')
    assert best_checkpoint.published_record(tmp_path) is None  # damaged: nothing pinned, nothing published
