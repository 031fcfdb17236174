"""Publishing checkpoints to object storage / a shared file system (pretrain/engine/checkpoint_store.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_shards import storage
from pretrain.engine import checkpoint_store
from pretrain.engine.checkpoint import finished_step, latest_tag
from pretrain.engine.checkpoint_universal import saved_world_size
from tests.s3_server import s3  # noqa: F401 - the fixture


@pytest.fixture(params=["shared_fs", "s3"])
def remote(request, tmp_path):
    """A remote location: a directory standing in for a shared file system, or a prefix on moto's S3."""
    if request.param == "shared_fs":
        return str(tmp_path / "shared")
    server = request.getfixturevalue("s3")
    return server.url("runs", request.node.name.replace("[", "-").rstrip("]"))


def _local_checkpoint(run_dir, step: int) -> str:
    """A staged checkpoint as pretrain.engine.checkpoint.save leaves it (files of two ranks + COMPLETE)."""
    tag = f"step{step:08d}"
    d = run_dir / "checkpoints" / tag
    d.mkdir(parents=True)
    for r in (0, 1):
        (d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(bytes([step, r]) * 100)
        (d / f"rank_{r}.pt").write_bytes(bytes([r]) * 10)
    (d / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 2}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(step)))
    return tag


def test_publish_writes_complete_then_latest_after_every_file(tmp_path, remote, monkeypatch):
    run = tmp_path / "run"
    tag = _local_checkpoint(run, 2)
    events = []
    real_upload, real_write = storage.upload_file, storage.write_text
    monkeypatch.setattr(storage, "upload_file", lambda src, dst: (events.append(str(dst)), real_upload(src, dst)))
    monkeypatch.setattr(storage, "write_text", lambda dst, t: (events.append(str(dst)), real_write(dst, t)))
    checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": 2, "world_size": 2}, 2, run)
    names = [e.rsplit("/", 2)[-2:] for e in events]
    assert names[-2:] == [[tag, "COMPLETE"], ["checkpoints", "latest"]]  # the publish point comes last
    staged = [p.name for p in (run / "checkpoints" / tag).iterdir() if p.name != "COMPLETE"]
    assert sorted(n[-1] for n in names[:-2]) == sorted([*staged, "metrics.jsonl"])
    assert checkpoint_store.remote_latest(remote) == (tag, {"step": 2, "world_size": 2})
    assert finished_step(tmp_path / "elsewhere", remote=remote) == 2


def test_a_tag_without_complete_is_never_resumed(tmp_path, remote):
    run = tmp_path / "run"
    checkpoint_store.publish(
        run / "checkpoints", remote, _local_checkpoint(run, 2), {"step": 2, "world_size": 2}, 3, run
    )
    # an upload that died after its files but before COMPLETE, with `latest` already pointing at it
    # (the order publish never uses, but a foreign writer or a partial copy might)
    storage.write_bytes(storage.join(remote, "checkpoints", "step00000004", "rank_0.pt"), b"half")
    storage.write_text(storage.join(remote, "checkpoints", "latest"), "step00000004")
    assert checkpoint_store.remote_latest(remote)[0] == "step00000002"
    fresh = tmp_path / "fresh_node"
    assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000002"
    assert latest_tag(fresh / "checkpoints") == "step00000002"


def test_fetch_restores_a_run_on_a_fresh_machine_and_prunes_old_tags(tmp_path, remote):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        tag = _local_checkpoint(run, step)
        checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": step, "world_size": 2}, 2, run)
    assert [t for _, t in checkpoint_store.remote_complete_tags(remote)] == ["step00000004", "step00000006"]
    fresh = tmp_path / "fresh_node"
    assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000006"
    got = fresh / "checkpoints" / "step00000006"
    want = run / "checkpoints" / "step00000006"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    assert all((got / p.name).read_bytes() == p.read_bytes() for p in want.iterdir())
    assert (fresh / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    assert not list((fresh / "checkpoints").glob(".fetch-*"))
    assert checkpoint_store.fetch(tmp_path / "empty" / "checkpoints", storage.join(remote, "none"), tmp_path) is None


def test_wrong_credentials_fail_the_save_with_the_url(tmp_path, s3, monkeypatch):  # noqa: F811
    from tests.s3_server import reset_fsspec_cache

    run = tmp_path / "run"
    tag = _local_checkpoint(run, 2)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    reset_fsspec_cache()
    try:
        with pytest.raises(RuntimeError, match=r"uploading checkpoint step00000002 to s3://.*access denied"):
            checkpoint_store.publish(run / "checkpoints", s3.url("denied"), tag, {"step": 2, "world_size": 2}, 2, run)
    finally:
        monkeypatch.undo()
        reset_fsspec_cache()


def test_a_fresh_machine_sees_the_world_size_of_the_remote_checkpoint(tmp_path, remote):
    """Elastic resume from object storage: the engine is configured for the checkpoint's world size
    before it is built, so that size must be read after the fetch, not from the (empty) local staging."""
    run = tmp_path / "run"
    checkpoint_store.publish(
        run / "checkpoints", remote, _local_checkpoint(run, 2), {"step": 2, "world_size": 2}, 2, run
    )
    fresh = tmp_path / "fresh_node" / "checkpoints"
    assert saved_world_size(fresh) is None  # nothing local yet
    assert checkpoint_store.fetch(fresh, remote, fresh.parent) == "step00000002"  # what Trainer.setup does first
    assert saved_world_size(fresh) == 2
    assert latest_tag(fresh) == "step00000002"  # what checkpoint.load will then load


def test_republishing_an_export_never_pairs_the_old_config_with_new_weights(tmp_path, remote, monkeypatch):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"weights v1")
    (export / "config.yaml").write_text("version: 1\n")
    checkpoint_store.publish_export(export, remote)
    target = storage.join(remote, "export")
    assert storage.read_text(storage.join(target, "config.yaml")) == "version: 1\n"
    (export / "model.safetensors").write_bytes(b"weights v2")
    (export / "config.yaml").write_text("version: 2\n")
    seen = []  # whether the remote holds a config.yaml at the moment each file is overwritten
    real_upload = storage.upload_file

    def upload(src, dst):
        seen.append((Path(src).name, storage.exists(storage.join(target, "config.yaml"))))
        real_upload(src, dst)

    monkeypatch.setattr(storage, "upload_file", upload)
    checkpoint_store.publish_export(export, remote)
    assert seen == [("model.safetensors", False), ("config.yaml", False)]
    assert storage.read_bytes(storage.join(target, "model.safetensors")) == b"weights v2"
    assert storage.read_text(storage.join(target, "config.yaml")) == "version: 2\n"


def _torch_checkpoint(run_dir, step: int) -> str:
    """A staged checkpoint of one rank whose files torch reads back (a resume verifies them)."""
    import torch

    from pretrain.engine.checkpoint_tags import file_sizes

    tag = f"step{step:08d}"
    d = run_dir / "checkpoints" / tag
    d.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((4,), float(step))}}, d / "mp_rank_00_model_states.pt")
    torch.save({"cursor": {"epoch": 0, "batch": step}}, d / "rank_0.pt")
    (d / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 1, "files": file_sizes(d)}))
    return tag


def _publish_pinning(run, remote, best_step: int, steps=(2, 4, 6), keep: int = 1) -> None:
    """Publish checkpoints at ``steps`` (retention ``keep``) while RUN/best_checkpoint.json pins ``best_step``."""
    from pretrain.engine import best_checkpoint

    best = f"step{best_step:08d}"
    for step in steps:
        tag = _torch_checkpoint(run, step)
        if step == best_step:
            record = {"metric": "val/zeroshot_fmax_ec", "mode": "max", "step": step, "tag": tag, "score": 0.5}
            best_checkpoint.write_json(run / best_checkpoint.FILE, record)
        pinned = best if step >= best_step else None
        checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": step, "world_size": 1}, keep, run, pinned)


def test_a_fresh_machine_fetches_the_pinned_best_checkpoint_too(tmp_path, remote):
    """Resuming on a new node brings the best checkpoint beside the latest, so the export can write
    export/best; it is verified like the checkpoint resumed from."""
    from pretrain.engine import best_checkpoint
    from pretrain.engine.checkpoint_tags import checkpoint_problem

    run = tmp_path / "run"
    _publish_pinning(run, remote, best_step=2)
    assert [t for _, t in checkpoint_store.remote_complete_tags(remote)] == ["step00000002", "step00000006"]
    fresh = tmp_path / "fresh_node"
    assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000006"
    assert best_checkpoint.read(fresh) == best_checkpoint.read(run)
    got, want = fresh / "checkpoints" / "step00000002", run / "checkpoints" / "step00000002"
    assert checkpoint_problem(got) is None
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    assert all((got / p.name).read_bytes() == p.read_bytes() for p in want.iterdir() if p.name != "COMPLETE")
    assert latest_tag(fresh / "checkpoints") == "step00000006"  # the resume still loads the newest
    assert not list((fresh / "checkpoints").glob(".fetch-*"))


def test_a_damaged_or_missing_remote_best_is_left_out_and_the_resume_goes_on(tmp_path, remote, caplog):
    run = tmp_path / "run"
    _publish_pinning(run, remote, best_step=2)
    # a file of the pinned checkpoint replaced by something torch cannot load safely
    storage.write_bytes(storage.join(remote, "checkpoints", "step00000002", "rank_0.pt"), b"\x80\x04not torch")
    fresh = tmp_path / "fresh"
    with caplog.at_level("ERROR"):
        assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000006"
    assert not (fresh / "checkpoints" / "step00000002").exists()  # the bad copy is not kept
    assert "step00000002" in caplog.text and "rank_0.pt" in caplog.text
    # a rank's file lost (a partial copy of the bucket)
    storage.remove_file(storage.join(remote, "checkpoints", "step00000002", "rank_0.pt"))
    caplog.clear()
    with caplog.at_level("ERROR"):
        assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000006"
    assert "rank_0.pt is missing" in caplog.text and not (fresh / "checkpoints" / "step00000002").exists()
    # the pinned tag is gone from the remote altogether
    storage.remove_tree(storage.join(remote, "checkpoints", "step00000002"))
    caplog.clear()
    other = tmp_path / "other"
    with caplog.at_level("ERROR"):
        assert checkpoint_store.fetch(other / "checkpoints", remote, other) == "step00000006"
    assert "step00000002" in caplog.text and "not complete under" in caplog.text
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["latest", "step00000006"]


def test_no_best_is_fetched_for_a_later_abandoned_step(tmp_path, remote):
    from pretrain.engine import best_checkpoint

    run = tmp_path / "run"
    _publish_pinning(run, remote, best_step=4, steps=(2, 4), keep=2)
    # the remote latest moved back to step 2 (a resume abandoned step 4): its best is not ours
    storage.write_text(storage.join(remote, "checkpoints", "latest"), "step00000002")
    fresh = tmp_path / "fresh"
    assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000002"
    assert best_checkpoint.read(fresh)["step"] == 4
    assert not (fresh / "checkpoints" / "step00000004").exists()


def test_previous_epoch_files_travel_with_the_checkpoints(tmp_path, remote):
    """data.hard_negatives=previous_epoch: RUN/hard_negatives/epoch<e>.npy is under the remote before the
    checkpoint that needs it is published, a file rewritten under its name goes up again, one dropped
    locally is dropped remotely, and a fresh machine gets them with the checkpoint."""
    import os

    run = tmp_path / "run"
    epochs = run / "hard_negatives"
    epochs.mkdir(parents=True)
    (epochs / "epoch0.npy").write_bytes(b"zero" * 10)
    tag = _local_checkpoint(run, 2)
    checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": 2, "world_size": 2}, 3, run)
    root = storage.join(remote, "hard_negatives")
    assert storage.read_bytes(storage.join(root, "epoch0.npy")) == b"zero" * 10

    (epochs / "epoch0.npy").write_bytes(b"ZERO" * 10)  # recomputed under the same name and size
    os.utime(epochs / "epoch0.npy", ns=(1, 1))
    (epochs / "epoch1.npy").write_bytes(b"one" * 10)
    assert checkpoint_store.sync_epoch_files_up(run, remote) == ["epoch0.npy", "epoch1.npy"]
    assert checkpoint_store.sync_epoch_files_up(run, remote) == []  # nothing changed since
    assert storage.read_bytes(storage.join(root, "epoch0.npy")) == b"ZERO" * 10

    (epochs / "epoch0.npy").unlink()  # the trainer keeps the last two epochs' files
    tag = _local_checkpoint(run, 4)
    checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": 4, "world_size": 2}, 3, run)
    assert [n for n in storage.listdir(root) if n.endswith(".npy")] == ["epoch1.npy"]

    fresh = tmp_path / "fresh_node"
    assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000004"
    assert sorted(p.name for p in (fresh / "hard_negatives").iterdir()) == ["epoch1.npy"]
    assert (fresh / "hard_negatives" / "epoch1.npy").read_bytes() == b"one" * 10
