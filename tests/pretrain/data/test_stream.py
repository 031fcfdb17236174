"""The batch stream: deterministic order, exact resume from a cursor, Ray == in-process."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data_shards.manifest import load_manifest
from pretrain.config import ConfigError, load_config
from pretrain.data import stream
from pretrain.data.stream import BatchStream, Cursor, EpochPlan, local_stream, plan_for

VIEWS = {"sequence": True, "structure": True, "text": True}


def _cfg(shards, *extra):
    return load_config(overrides=[f"data.train_shards={shards / 'train'}", "data.batch_size=8", *extra])


def _plans(cfg, world):
    m = load_manifest(cfg.data.train_shards)
    return [EpochPlan(m, world, r, cfg.data.batch_size, cfg.train.seed) for r in range(world)]


def test_ranks_partition_each_epoch_without_repeats(small_demo):
    cfg = _cfg(small_demo)
    plans = _plans(cfg, 2)
    for epoch in range(2):
        nb = plans[0].batches_per_epoch(epoch)
        assert nb == plans[1].batches_per_epoch(epoch) > 0
        seen = [ref for p in plans for i in range(nb) for ref in p.batch_refs(epoch, i)]
        assert len(seen) == len(set(seen)) == 2 * nb * 8
    assert plans[0].batch_refs(0, 0) != plans[0].batch_refs(1, 0)  # reshuffled per epoch


def test_too_large_a_batch_is_a_config_error(small_demo):
    m = load_manifest(small_demo / "train")
    with pytest.raises(ConfigError, match="impossible"):
        EpochPlan(m, 2, 0, 10_000, 0).batches_per_epoch(0)
    with pytest.raises(ConfigError, match="impossible"):  # 384 samples: 48 per rank at 8 ranks
        EpochPlan(m, 8, 0, 49, 0).batches_per_epoch(0)


def _write_shards(root, num_samples, per_shard):
    from data_shards.schema import ProteinRecord
    from data_shards.writer import ShardWriter

    with ShardWriter(root, samples_per_shard=per_shard) as w:
        for i in range(num_samples):
            w.write(
                ProteinRecord(id=f"P{i:03d}", sequence="MKV" * 5, backbone=None, text=None, meta={"source": "test"})
            )
    return load_manifest(root)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_unequal_shards_leave_only_a_remainder_out_of_each_epoch(tmp_path, world):
    """Shards of unequal size (or fewer shards than ranks) still fill every rank's share: an epoch
    delivers all its samples but fewer than B per rank and fewer than ``world`` beyond the shares."""
    m = _write_shards(tmp_path / "train", 93, per_shard=40)
    assert [s.num_samples for s in m.shards] == [40, 40, 13]
    B, N = 4, 93
    plans = [EpochPlan(m, world, r, B, seed=3) for r in range(world)]
    for epoch in range(3):
        nb = plans[0].batches_per_epoch(epoch)
        assert all(p.batches_per_epoch(epoch) == nb for p in plans)
        assert nb == (N // world) // B
        seen = [ref for p in plans for i in range(nb) for ref in p.batch_refs(epoch, i)]
        left = plans[0].leftovers(epoch)
        assert len(seen) == len(set(seen)) == world * nb * B
        assert sorted(seen + left) == sorted((str(s.path), i) for s in m.shards for i in range(s.num_samples))
        assert len(left) < world * B + world


def test_balanced_shards_keep_the_shard_level_split(small_demo):
    """Eight equal shards over two ranks: each rank reads exactly the shards dealt to it."""
    m = load_manifest(small_demo / "train")
    order = EpochPlan(m, 2, 0, 8, seed=0).shard_order(0)
    for r in range(2):
        plan = EpochPlan(m, 2, r, 8, seed=0)
        shards = {ref[0] for i in range(plan.batches_per_epoch(0)) for ref in plan.batch_refs(0, i)}
        assert shards == {str(m.shards[i].path) for i in order[r::2]}


def test_no_two_random_streams_of_a_plan_coincide(small_demo):
    """numpy pads seed entropy with zeros: keys like [s, e] and [s, e, 0] would give one stream."""
    plan = EpochPlan(load_manifest(small_demo / "train"), 2, 0, 8, seed=0)
    keys = [plan._key(stream._SHARD_ORDER, e) for e in range(3)]
    keys += [plan._key(stream._KEEP, e) for e in range(3)]
    keys += [plan._key(stream._SHARE, e, r) for e in range(3) for r in range(3)]
    keys += [plan._key(stream._REMAP, e, k) for e in range(3) for k in range(1, 3)]
    keys += [plan._key(stream._KEEP_ONCE)]
    keys += [plan._key(stream._ARRANGE, e, k, w) for e in range(3) for k in range(3) for w in range(3)]
    keys += [
        EpochPlan(plan.manifest, 3, r, 8, seed=0).rng_key(e, i, resized)
        for e in range(3)
        for i in range(3)
        for r in range(3)
        for resized in ((), ((2, 1),), ((2, 1), (3, 1)))
    ]
    states = {tuple(np.random.SeedSequence(k).generate_state(4)) for k in keys}
    assert len(states) == len(keys) == len({tuple(k) for k in keys})


def _same_batch(a, b):
    assert a["ids"] == b["ids"]
    assert torch.equal(a["seq_tokens"], b["seq_tokens"])
    assert torch.equal(a["text_ids"], b["text_ids"])
    assert torch.equal(a["graph"]["node_s"], b["graph"]["node_s"])
    assert torch.equal(a["views"]["seq_tokens"], b["views"]["seq_tokens"])
    assert torch.equal(a["views"]["graph"]["node_v"], b["views"]["graph"]["node_v"])


def test_resume_from_cursor_replays_exactly_the_same_batches(small_demo):
    cfg = _cfg(small_demo)
    plan = _plans(cfg, 2)[1]
    full = list(itertools.islice(local_stream(cfg, plan, Cursor(), VIEWS), 30))
    resume_at = full[26][2]  # crosses an epoch boundary (24 batches per epoch)
    assert resume_at.epoch == 1
    resumed = list(itertools.islice(local_stream(cfg, plan, resume_at, VIEWS), 3))
    for (a, _, ca), (b, _, cb) in zip(full[27:], resumed):
        _same_batch(a, b)
        assert ca == cb


def test_batch_layout(small_demo):
    cfg = _cfg(small_demo)
    batch, bad, cursor = next(iter(local_stream(cfg, _plans(cfg, 1)[0], Cursor(), VIEWS)))
    assert bad == [] and batch["num_bad"] == 0 and cursor == Cursor(0, 1)
    assert batch["seq_tokens"].shape[0] == batch["text_ids"].shape[0] == 8
    assert int(batch["graph"]["num_graphs"]) == 8
    assert set(batch["present"]) == {"sequence", "structure", "text"}
    for v in batch["present"].values():
        assert v.dtype == torch.bool and v.shape == (8,)
    assert batch["present"]["sequence"].all()  # the demo corpus drops some structures / texts, never sequences


@pytest.mark.slow
def test_ray_stream_equals_local_stream(small_demo, tmp_path):
    ray = pytest.importorskip("ray")
    from pretrain.data.ray_stream import RayBatchStream

    cfg = _cfg(small_demo, "data.readers_per_rank=2", "data.prefetch_batches=3")
    plan = _plans(cfg, 2)[0]
    local = list(itertools.islice(local_stream(cfg, plan, Cursor(), VIEWS), 5))
    # length-aware batching is part of the plan, which both loaders share
    grouped_cfg = _cfg(
        small_demo,
        "data.readers_per_rank=2",
        "data.length_grouping=window",
        "data.length_window=4",
        f"data.length_cache={tmp_path}",
    )
    grouped_plan = plan_for(grouped_cfg, load_manifest(grouped_cfg.data.train_shards), 2, 1)
    grouped = list(itertools.islice(local_stream(grouped_cfg, grouped_plan, Cursor(0, 2), VIEWS), 3))
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 * 1024**2, _node_ip_address="127.0.0.1")
    try:
        stream = RayBatchStream(cfg, plan, Cursor(), VIEWS)
        remote = list(itertools.islice(stream, 5))
        # kill a reader mid-stream: the batch is rebuilt by a replacement, nothing lost
        ray.kill(stream.pool.actors[0], no_restart=True)
        more = list(itertools.islice(stream, 2))
        stream.close()
        grouped_stream = RayBatchStream(grouped_cfg, grouped_plan, Cursor(0, 2), VIEWS)
        grouped_remote = list(itertools.islice(grouped_stream, 3))
        grouped_stream.close()
    finally:
        ray.shutdown()
    for (a, _, ca), (b, _, cb) in zip(local, remote):
        _same_batch(a, b)
        assert ca == cb
    expected = list(itertools.islice(local_stream(cfg, plan, remote[-1][2], VIEWS), 2))
    for (a, _, _), (b, _, _) in zip(expected, more):
        _same_batch(a, b)
    assert [b["ids"] for b, _, _ in grouped] != [b["ids"] for b, _, _ in local[2:5]]
    for (a, _, ca), (b, _, cb) in zip(grouped, grouped_remote):
        _same_batch(a, b)
        assert ca == cb


def test_property_sampling_drops_low_confidence_samples(tmp_path):
    """ProtCLIP sampling: existence 5 or coverage < 3 never trains; reviewed entries always do."""
    from data_shards.manifest import load_manifest as _load
    from data_shards.schema import ProteinRecord
    from data_shards.writer import ShardWriter

    with ShardWriter(tmp_path / "train", samples_per_shard=20) as w:
        for i in range(40):
            rec = ProteinRecord(
                id=f"P{i:03d}", sequence="MKV" * 10, backbone=None, text={"name": "x"}, meta={"source": "test"}
            )
            existence, coverage = (5, 4) if i % 2 else (1, 4)
            w.write(rec, props={"existence": existence, "coverage": coverage, "reviewed": i % 4 == 3})
    m = _load(tmp_path / "train")
    plan = EpochPlan(m, 1, 0, 2, seed=0, property_sampling=True)
    kept = {ref for b in range(plan.batches_per_epoch(0)) for ref in plan.batch_refs(0, b)}
    index = {(str(s.path), j): k * 20 + j for k, s in enumerate(m.shards) for j in range(s.num_samples)}
    ids = {index[r] for r in kept}
    assert ids and all(i % 2 == 0 or i % 4 == 3 for i in ids)  # existence 5 only when reviewed
    assert any(i % 4 == 3 for i in ids)
    plain = EpochPlan(m, 1, 0, 2, seed=0)
    assert plain.batches_per_epoch(0) == 20


# ---------------------------------------------------------------- elastic resume (the remap rule)


def _stream_refs(plan, start, n=None):
    """Run ``plan``'s stream from ``start`` for ``n`` batches or to the end of ``start.epoch``.

    The stream's real cursor logic runs; building a batch is replaced by returning its refs.
    Returns (list of batches' refs, cursor after the last one).
    """
    stream = BatchStream(plan, start, lambda slot, refs, key: lambda: ({"refs": refs, "key": key}, []), prefetch=3)
    out, cursor = [], start
    if n == 0:
        return out, cursor
    for batch, _, cursor in stream:
        out.append(batch["refs"])
        if len(out) == n or cursor.epoch != start.epoch:
            break
    return out, cursor


def _run_phases(manifest, phases, batch_size=8, property_sampling=False):
    """Train through epoch 0 changing the number of ranks: ``phases`` = [(world, batches or None)].

    Each phase resumes from the previous phase's cursors like the trainer does (every new rank
    maps the saved cursors with ``resume_cursor``); None runs to the end of the epoch.
    Returns (refs delivered by every rank of every phase, the last phase's rank-0 plan and start cursor, end cursor).
    """
    seen, saved, saved_world = [], None, None
    for world, n in phases:
        plans = [EpochPlan(manifest, world, r, batch_size, 0, property_sampling) for r in range(world)]
        starts = {Cursor() if saved is None else p.resume_cursor(saved, saved_world) for p in plans}
        assert len(starts) == 1  # every new rank derives the same cursor on its own
        start = starts.pop()
        runs = [_stream_refs(p, start, n) for p in plans]
        ends = {end for _, end in runs}
        assert len(ends) == 1  # ranks step together
        end = ends.pop()
        seen += [ref for refs, _ in runs for batch in refs for ref in batch]
        for refs, _ in runs:
            assert all(len(b) == batch_size for b in refs)
        saved, saved_world = [end] * world, world
    return seen, plans[0], start, end


def _all_refs(manifest):
    return {(str(s.path), i) for s in manifest.shards for i in range(s.num_samples)}


@pytest.mark.parametrize(
    "phases",
    [
        [(2, 5), (1, None)],  # 2 -> 1
        [(1, 7), (2, None)],  # 1 -> 2
        [(2, 5), (3, None)],  # 2 -> 3 (8 shards: 3, 3, 2 per rank in the first segment)
        [(3, 4), (2, None)],  # 3 -> 2: the old plan's leftovers (the 2-shard rank is short) are redistributed
        [(2, 3), (1, 4), (3, None)],  # two changes in one epoch chain remainder segments
        [(2, 6), (1, 0), (2, None)],  # a relaunch that stopped before its first step
    ],
)
def test_elastic_resume_delivers_each_sample_of_the_epoch_at_most_once(small_demo, phases):
    m = load_manifest(small_demo / "train")
    seen, last_plan, last_start, end = _run_phases(m, phases)
    leftovers = last_plan.leftovers(0, last_start.resized)
    assert len(seen) == len(set(seen)), "a sample was delivered twice in the epoch"
    assert not set(seen) & set(leftovers)
    assert set(seen) | set(leftovers) == _all_refs(m), "a sample was skipped (neither delivered nor a leftover)"
    assert len(leftovers) < phases[-1][0] * 8  # only the last segment's partial global batch is left over
    assert end == Cursor(1, 0)  # the next epoch is the normal plan of the new world size (no history)


def test_elastic_remainder_keeps_the_seen_batches_and_a_new_rng_key(small_demo):
    m = load_manifest(small_demo / "train")
    old = [EpochPlan(m, 2, r, 8, 0) for r in range(2)]
    new = EpochPlan(m, 1, 0, 8, 0)
    cursor = new.resume_cursor([Cursor(0, 5)] * 2, 2)
    assert cursor == Cursor(0, 0, ((2, 5),))
    assert Cursor.from_dict(cursor.to_dict()) == cursor
    # 384 samples, 2 x 5 x 8 consumed: 304 left = 38 batches of 8 on one rank, nothing left over
    assert new.batches_per_epoch(0, cursor.resized) == 38 and new.leftovers(0, cursor.resized) == []
    consumed = {ref for p in old for i in range(5) for ref in p.batch_refs(0, i)}
    remainder = {ref for i in range(38) for ref in new.batch_refs(0, i, cursor.resized)}
    assert len(consumed) == 80 and len(remainder) == 304 and not consumed & remainder
    assert new.rng_key(0, 0, cursor.resized) != new.rng_key(0, 0)
    # resuming at the same world size keeps the cursor; inside a remainder segment too
    assert old[1].resume_cursor([Cursor(0, 5)] * 2, 2) == Cursor(0, 5)
    assert new.resume_cursor([Cursor(0, 3, ((2, 5),))], 1) == Cursor(0, 3, ((2, 5),))
    # at the start of an epoch nothing is remapped; after its last batch the next epoch starts
    assert new.resume_cursor([Cursor(2, 0)] * 2, 2) == Cursor(2, 0)
    assert new.resume_cursor([Cursor(0, old[0].batches_per_epoch(0))] * 2, 2) == Cursor(1, 0)


def test_elastic_resume_rejects_cursors_that_disagree(small_demo):
    m = load_manifest(small_demo / "train")
    new = EpochPlan(m, 1, 0, 8, 0)
    with pytest.raises(ValueError, match="identical cursor"):
        new.resume_cursor([Cursor(0, 5), Cursor(0, 6)], 2)
    with pytest.raises(ValueError, match="identical cursor"):
        new.resume_cursor([Cursor(0, 5)], 2)
    with pytest.raises(ValueError, match="has 24 batches"):
        new.batches_per_epoch(0, ((2, 99),))


def test_elastic_resume_with_property_sampling_stays_inside_the_epochs_draw(tmp_path):
    """With ProtCLIP sampling the epoch's samples are the old plan's draw; the remap keeps to it."""
    from data_shards.schema import ProteinRecord
    from data_shards.writer import ShardWriter

    with ShardWriter(tmp_path / "train", samples_per_shard=20) as w:
        for i in range(80):
            rec = ProteinRecord(
                id=f"P{i:03d}", sequence="MKV" * 10, backbone=None, text={"name": "x"}, meta={"source": "test"}
            )
            w.write(rec, props={"existence": 1 if i % 3 else 3, "coverage": 3 + i % 2, "reviewed": False})
    m = load_manifest(tmp_path / "train")
    old = [EpochPlan(m, 2, r, 2, 0, property_sampling=True) for r in range(2)]
    drawn = {ref for p in old for i in range(p.batches_per_epoch(0)) for ref in p.batch_refs(0, i)}
    drawn |= set(old[0].leftovers(0))
    assert 0 < len(drawn) < 80
    seen, last_plan, last_start, _ = _run_phases(m, [(2, 3), (1, None)], batch_size=2, property_sampling=True)
    leftovers = last_plan.leftovers(0, last_start.resized)
    assert len(seen) == len(set(seen))
    assert set(seen) | set(leftovers) == drawn and not set(seen) & set(leftovers)
