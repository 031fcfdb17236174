"""Publishing checkpoints to object storage / a shared file system (pretrain/engine/checkpoint_store.py)."""

from __future__ import annotations

import json
import shutil
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
    sizes = {p.name: p.stat().st_size for p in (run / "checkpoints" / tag).iterdir() if p.name != "COMPLETE"}
    assert checkpoint_store.remote_latest(remote) == (tag, {"step": 2, "world_size": 2, "files": sizes})
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
    assert all((got / p.name).read_bytes() == p.read_bytes() for p in want.iterdir() if p.name != "COMPLETE")
    assert json.loads((got / "COMPLETE").read_text())["files"] == {  # the remote record: every file's size
        p.name: p.stat().st_size for p in want.iterdir() if p.name != "COMPLETE"
    }
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
    # the resumed run drops that best at its next save (promote) and publishes without it: the remote
    # record goes too, so yet another fresh machine does not bring the abandoned best back
    (run / best_checkpoint.FILE).unlink()
    shutil.rmtree(run / "checkpoints" / "step00000004")
    tag = _torch_checkpoint(run, 3)
    checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": 3, "world_size": 1}, 2, run)
    assert not storage.exists(storage.join(remote, best_checkpoint.FILE))
    again = tmp_path / "again"
    assert checkpoint_store.fetch(again / "checkpoints", remote, again) == "step00000003"
    assert best_checkpoint.read(again) is None


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


# ------------------------------------------------ the remote COMPLETE lists every file's size


def _torn(remote: str, tag: str, name: str, damage: str) -> None:
    """Damage the remote copy of one file of ``tag``: cut to half its size, or removed."""
    path = storage.join(remote, "checkpoints", tag, name)
    if damage == "removed":
        storage.remove_file(path)
    else:
        data = storage.read_bytes(path)
        storage.write_bytes(path, data[: len(data) // 2])


MODEL_STATES = "zero_pp_rank_1_mp_rank_00_model_states.pt"  # not a rank_<r>.pt: only the sizes list it


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_a_fetched_tag_that_lost_part_of_a_file_is_refused_and_the_previous_one_taken(tmp_path, remote, damage, caplog):
    run = tmp_path / "run"
    for step in (2, 4):
        tag = _local_checkpoint(run, step)
        checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": step, "world_size": 2}, 2, run)
    _torn(remote, "step00000004", MODEL_STATES, damage)
    fresh = tmp_path / "fresh"
    with caplog.at_level("ERROR"):
        assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000002"
    assert "step00000004" in caplog.text and "refused" in caplog.text and MODEL_STATES in caplog.text
    assert not (fresh / "checkpoints" / "step00000004").exists()  # the bad copy is not kept
    assert latest_tag(fresh / "checkpoints") == "step00000002"  # what checkpoint.load resumes from
    got, want = fresh / "checkpoints" / "step00000002", run / "checkpoints" / "step00000002"
    assert all((got / p.name).read_bytes() == p.read_bytes() for p in want.iterdir() if p.name != "COMPLETE")
    assert not list((fresh / "checkpoints").glob(".fetch-*"))
    # every tag damaged: the resume stops with the files named rather than training from scratch
    _torn(remote, "step00000002", "rank_0.pt", damage)
    other = tmp_path / "other"
    with pytest.raises(checkpoint_store.RemoteCheckpointsUnusable, match=r"step00000004.*step00000002.*rank_0\.pt"):
        checkpoint_store.fetch(other / "checkpoints", remote, other)


@pytest.mark.parametrize("marker", ['{"world_size": 2}', '{"step": 4, "wor'])
def test_a_damaged_remote_marker_is_skipped_and_the_previous_tag_taken(tmp_path, remote, marker, caplog):
    """A remote COMPLETE without an integer step (or not JSON) made rank 0 raise (KeyError, uncaught)
    while the other ranks waited; now that tag is logged and left out, as a local one is."""
    run = tmp_path / "run"
    for step in (2, 4):
        tag = _local_checkpoint(run, step)
        checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": step, "world_size": 2}, 3, run)
    storage.write_text(storage.join(remote, "checkpoints", "step00000004", "COMPLETE"), marker)
    assert [t for _, t in checkpoint_store.remote_complete_tags(remote)] == ["step00000002"]
    fresh = tmp_path / "fresh"
    with caplog.at_level("WARNING"):
        assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000002"
    assert "step00000004/COMPLETE is damaged" in caplog.text and "not used" in caplog.text


def test_an_old_remote_marker_without_sizes_still_fetches(tmp_path, remote):
    """Checkpoints published before the sizes were recorded carry only step and world_size."""
    run = tmp_path / "run"
    tag = _local_checkpoint(run, 2)
    checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": 2, "world_size": 2}, 2, run)
    storage.write_text(storage.join(remote, "checkpoints", tag, "COMPLETE"), json.dumps({"step": 2, "world_size": 2}))
    fresh = tmp_path / "fresh"
    assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == tag
    assert latest_tag(fresh / "checkpoints") == tag
    assert json.loads((fresh / "checkpoints" / tag / "COMPLETE").read_text()) == {"step": 2, "world_size": 2}


def test_a_pinned_best_of_another_size_than_recorded_is_left_out(tmp_path, remote, caplog):
    """A file replaced by a loadable torch file of another size passes every check but the size."""
    import torch

    run = tmp_path / "run"
    _publish_pinning(run, remote, best_step=2)
    replaced = tmp_path / "replaced.pt"
    torch.save({"module": {"w": torch.zeros(64)}}, replaced)
    storage.upload_file(replaced, storage.join(remote, "checkpoints", "step00000002", "mp_rank_00_model_states.pt"))
    fresh = tmp_path / "fresh"
    with caplog.at_level("ERROR"):
        assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000006"
    assert "mp_rank_00_model_states.pt has" in caplog.text and "were written" in caplog.text
    assert not (fresh / "checkpoints" / "step00000002").exists()


def test_the_remote_record_joins_every_nodes_files():
    parts = [{"rank_0.pt": 10, "a.pt": 5, "zero_to_fp32.py": 7}, None, {"rank_1.pt": 10, "zero_to_fp32.py": 8}, None]
    record = checkpoint_store.remote_record({"step": 3, "world_size": 2}, parts, "remote/step3")
    assert record == {
        "step": 3,
        "world_size": 2,
        "files": {"a.pt": 5, "rank_0.pt": 10, "rank_1.pt": 10, "zero_to_fp32.py": None},  # two sizes: unknown
    }
    with pytest.raises(ValueError, match=r"no node uploaded rank_2\.pt, rank_3\.pt to remote/step3"):
        checkpoint_store.remote_record({"step": 3, "world_size": 4}, parts, "remote/step3")


def _node_worker(rank: int, init_file: str, out: str, remote: str) -> None:
    """One node of a two-node run without a shared file system: its own staging, its own rank's files."""
    from tests.spawn_ranks import gloo_rank

    def results() -> dict:
        import os

        os.environ["LOCAL_RANK"] = "0"  # every rank leads its node
        run = Path(out) / f"node{rank}"
        d = run / "checkpoints" / "step00000002"
        d.mkdir(parents=True)
        (d / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(bytes([rank]) * (100 + rank))
        (d / f"rank_{rank}.pt").write_bytes(bytes([rank]) * (10 + rank))
        if rank == 0:  # what checkpoint.save's rank 0 writes: it sees only its own node's files
            (d / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 2}))
        checkpoint_store.publish(run / "checkpoints", remote, "step00000002", {"step": 2, "world_size": 2}, 2, run)
        return {}

    gloo_rank(rank, 2, init_file, out, results, stem="node")


def test_a_multi_node_publish_records_every_nodes_files(tmp_path):
    from tests.spawn_ranks import run_ranks

    remote = str(tmp_path / "shared")
    run_ranks(_node_worker, lambda r: (r, str(tmp_path / "init"), str(tmp_path), remote), 2, tmp_path, 120, "node")
    record = json.loads(storage.read_text(storage.join(remote, "checkpoints", "step00000002", "COMPLETE")))
    assert record["files"] == {
        "rank_0.pt": 10,
        "rank_1.pt": 11,
        "zero_pp_rank_0_mp_rank_00_model_states.pt": 100,
        "zero_pp_rank_1_mp_rank_00_model_states.pt": 101,
    }
    # node 0 resuming where it wrote its part: its own copy lacks node 1's files, so it is fetched whole
    node0 = tmp_path / "node0"
    assert checkpoint_store.fetch(node0 / "checkpoints", remote, node0) == "step00000002"
    assert sorted(p.name for p in (node0 / "checkpoints" / "step00000002").iterdir()) == ["COMPLETE", *record["files"]]


def test_an_older_runs_best_json_survives_a_fresh_machine_resume(tmp_path, remote):
    """A run from before best_checkpoint.json (RUN/best.json only) publishes its best as the record the
    remote keeps, so a fresh machine resumes against it and fetches the checkpoint it pins."""
    from pretrain.engine import best_checkpoint
    from pretrain.engine.checkpoint_tags import checkpoint_problem

    run = tmp_path / "run"
    run.mkdir()
    (run / best_checkpoint.LEGACY_FILE).write_text(json.dumps({"step": 2, "score": 0.3, "metric": "val/mean_R@10"}))
    for step in (2, 4, 6):
        tag = _torch_checkpoint(run, step)
        pinned = best_checkpoint.pinned_tag(run, step)  # what checkpoint.save passes
        checkpoint_store.publish(run / "checkpoints", remote, tag, {"step": step, "world_size": 1}, 1, run, pinned)
    assert not (run / best_checkpoint.FILE).exists()  # the local file is left as it was
    fresh = tmp_path / "fresh"
    assert checkpoint_store.fetch(fresh / "checkpoints", remote, fresh) == "step00000006"
    old = {"metric": "val/mean_R@10", "mode": "max", "step": 2, "tag": "step00000002", "score": 0.3}
    assert best_checkpoint.read(fresh) == best_checkpoint.read(run) == old
    assert checkpoint_problem(fresh / "checkpoints" / "step00000002") is None  # export/best can be written


def _waiting_worker(rank: int, init_file: str, out: str) -> None:
    """Rank 0 transfers for twice the group's timeout while rank 1 has nothing to do; then rank 1 fails."""
    import time

    from pretrain.engine import collectives
    from tests.spawn_ranks import gloo_rank

    def results() -> dict:
        collectives.WAIT_POLL_S = 0.2
        slow = (lambda: (time.sleep(3.0), "fetched")[1]) if rank == 0 else None
        got = collectives.while_others_wait(slow, "fetching the best checkpoint")

        def fail():
            raise OSError("disk gone")

        try:
            collectives.while_others_wait(fail if rank == 1 else None, "downloading step00000002")
            message = None
        except RuntimeError as e:
            message = str(e)
        return {"got": got, "message": message}

    gloo_rank(rank, 2, init_file, out, results, timeout_s=1.5, stem="wait")


def test_ranks_waiting_for_a_long_transfer_outlast_the_group_timeout(tmp_path):
    """A download longer than the process group's timeout (here 1.5 s) does not time the other ranks out:
    they meet in small collectives meanwhile. A transfer that fails on one rank fails on every rank."""
    from tests.spawn_ranks import run_ranks

    r0, r1 = run_ranks(_waiting_worker, lambda r: (r, str(tmp_path / "init"), str(tmp_path)), 2, tmp_path, 120, "wait")
    assert r0["got"] == "fetched" and r1["got"] is None
    assert r1["message"] == "downloading step00000002 failed: disk gone"
    assert r0["message"] == "downloading step00000002 failed on another rank (see its log)"
