"""Length-aware batching and once-drawn property sampling in the data plan (pretrain/data/batching.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data_shards.manifest import load_manifest
from pretrain.config import ConfigError, load_config
from pretrain.data.batching import LengthGrouping, padding_fraction, sample_lengths
from pretrain.data.plan_checks import check_resumable_plan, plan_record
from pretrain.data.sampling_plan import plan_settings
from pretrain.data.stream import KEPT_SET_KEY, BatchStream, Cursor, EpochPlan, local_stream, plan_for

VIEWS = {"sequence": True, "structure": False, "text": False}
B = 8


def _write(root, n=192, per_shard=48, props=None, seed=0):
    """``n`` sequence-only proteins of lengths 10..400 (log-uniform, like real sets: many short, a long tail)."""
    from data_shards.schema import ProteinRecord
    from data_shards.writer import ShardWriter

    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(10), np.log(400), n)).astype(int)
    with ShardWriter(root, samples_per_shard=per_shard) as w:
        for i, L in enumerate(lengths):
            rec = ProteinRecord(
                id=f"P{i:04d}",
                sequence="".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), L)),
                backbone=None,
                text=None,
                meta={"source": "test"},
            )
            w.write(rec, props=props(i) if props else None)
    return load_manifest(root), lengths


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    root = tmp_path_factory.mktemp("varied")
    manifest, lengths = _write(root / "train")
    return root, manifest, lengths


def _cfg(root, tmp_path, *extra):
    return load_config(
        overrides=[
            f"data.train_shards={root / 'train'}",
            f"data.batch_size={B}",
            f"data.length_cache={tmp_path / 'cache'}",
            *extra,
        ]
    )


def _refs(plan, epoch, resized=()):
    return [plan.batch_refs(epoch, i, resized) for i in range(plan.batches_per_epoch(epoch, resized))]


def _index(manifest):
    return {(str(s.path), j): k * 48 + j for k, s in enumerate(manifest.shards) for j in range(s.num_samples)}


def test_lengths_come_from_the_tar_index_and_are_cached(varied, tmp_path):
    _, manifest, lengths = varied
    got = sample_lengths(manifest, tmp_path / "cache")
    assert np.array_equal(np.concatenate(got), lengths)
    cached = sorted((tmp_path / "cache").glob("*.npy"))
    assert [p.stem for p in cached] == sorted(s.sha256 for s in manifest.shards)
    np.save(cached[0], np.arange(3), allow_pickle=False)  # a damaged cache entry is rebuilt
    assert np.array_equal(np.concatenate(sample_lengths(manifest, tmp_path / "cache")), lengths)


def test_manifest_lengths_are_used_without_opening_the_shards(tmp_path):
    manifest, lengths = _write(tmp_path / "train", n=20, per_shard=10, props=lambda i: {"length": 1000 + i})
    got = np.concatenate(sample_lengths(manifest, tmp_path / "cache"))
    assert list(got) == list(range(1000, 1020)) and not (tmp_path / "cache").exists()


def test_an_unreadable_shard_is_an_error_naming_it(tmp_path):
    manifest, _ = _write(tmp_path / "train", n=20, per_shard=10)
    manifest.shards[1].path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="shard-000001"):
        sample_lengths(manifest, tmp_path / "cache")


def test_padding_fraction_counts_pad_tokens():
    import esm

    pad = esm.Alphabet.from_architecture("ESM-1b").padding_idx
    tokens = torch.tensor([[0, 5, 5, 2, pad, pad], [0, 5, 5, 5, 5, 2]])
    assert padding_fraction({"seq_tokens": tokens}, pad) == pytest.approx(2 / 12)
    assert padding_fraction({"seq_tokens": tokens}) == pytest.approx(2 / 12)  # the default is ESM's pad


def test_off_is_todays_plan_bit_for_bit(varied, tmp_path):
    root, manifest, _ = varied
    plan = plan_for(_cfg(root, tmp_path), manifest, 2, 1)
    assert plan.arranger is None
    plain = EpochPlan(manifest, 2, 1, B, 0)
    assert _refs(plan, 0) == _refs(plain, 0) and _refs(plan, 1) == _refs(plain, 1)


def test_window_groups_lengths_keeps_the_epochs_samples_and_is_deterministic(varied, tmp_path):
    root, manifest, lengths = varied
    idx = _index(manifest)
    cfg = _cfg(root, tmp_path, "data.length_grouping=window", "data.length_window=4")
    for world in (1, 2):
        plain = [EpochPlan(manifest, world, r, B, 0) for r in range(world)]
        grouped = [plan_for(cfg, manifest, world, r) for r in range(world)]
        for epoch in range(2):
            for p, g in zip(plain, grouped):
                a, b = _refs(p, epoch), _refs(g, epoch)
                assert sorted(itertools.chain(*a)) == sorted(itertools.chain(*b))  # same samples, same rank
                assert p.leftovers(epoch) == g.leftovers(epoch)
                assert b == _refs(plan_for(cfg, manifest, world, p.rank), epoch)  # a fresh plan agrees
                # inside a window of 4 batches the batches hold disjoint length ranges
                for first in range(0, len(b) - 3, 4):
                    spans = sorted(
                        (min(lengths[idx[x]] for x in bt), max(lengths[idx[x]] for x in bt))
                        for bt in b[first : first + 4]
                    )
                    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
    # ranks take batch i from the same length quantile: their batch maxima are strongly correlated
    g = [plan_for(cfg, manifest, 2, r) for r in range(2)]
    peaks = [[max(lengths[idx[x]] for x in bt) for bt in _refs(p, 0)] for p in g]
    assert np.corrcoef(peaks)[0, 1] > 0.5


def _padding(cfg, manifest, n):
    stream = local_stream(cfg, plan_for(cfg, manifest, 1, 0), Cursor(), VIEWS)
    return float(np.mean([padding_fraction(b) for b, _, _ in itertools.islice(stream, n)]))


def test_padding_falls_with_length_grouping(varied, tmp_path):
    root, manifest, _ = varied
    off = _padding(_cfg(root, tmp_path), manifest, 24)
    window = _padding(_cfg(root, tmp_path, "data.length_grouping=window", "data.length_window=24"), manifest, 24)
    assert off > 0.4 and window < 0.25 * off, (off, window)


def _stream(plan, start, n):
    s = BatchStream(plan, start, lambda slot, refs, key: lambda: ({"refs": refs, "key": key}, []), prefetch=3)
    return [(b["refs"], b["key"], c) for b, _, c in itertools.islice(s, n)]


def test_resume_mid_epoch_sees_the_uninterrupted_batches(varied, tmp_path):
    root, manifest, _ = varied
    cfg = _cfg(root, tmp_path, "data.length_grouping=window", "data.length_window=3")
    plan = plan_for(cfg, manifest, 2, 1)
    full = _stream(plan, Cursor(), 20)  # 12 batches per epoch: crosses into epoch 1
    resumed = _stream(plan_for(cfg, manifest, 2, 1), full[4][2], 15)
    assert resumed == full[5:20]


@pytest.mark.parametrize("phases", [[(2, 5), (1, None)], [(1, 7), (3, None)]])
def test_elastic_resume_with_grouping_delivers_each_sample_at_most_once(varied, tmp_path, phases):
    root, manifest, _ = varied
    cfg = _cfg(root, tmp_path, "data.length_grouping=window", "data.length_window=3")
    seen, saved, saved_world = [], None, None
    for world, n in phases:
        plans = [plan_for(cfg, manifest, world, r) for r in range(world)]
        start = Cursor() if saved is None else plans[0].resume_cursor(saved, saved_world)
        total = plans[0].batches_per_epoch(0, start.resized)
        runs = [_stream(p, start, total - start.batch if n is None else n) for p in plans]
        seen += [ref for run in runs for refs, _, _ in run for ref in refs]
        saved, saved_world = [runs[0][-1][2]] * world, world
    left = plans[0].leftovers(0, start.resized)
    assert len(seen) == len(set(seen)) and not set(seen) & set(left)
    assert set(seen) | set(left) == set(_index(manifest))


def test_a_resume_with_another_grouping_is_refused(varied, tmp_path):
    root, manifest, _ = varied
    on = _cfg(root, tmp_path, "data.length_grouping=window", "data.length_window=4")
    saved = plan_record(on, plan_for(on, manifest, 1, 0))
    check_resumable_plan(saved, on, "ckpt", manifest)
    for other in (_cfg(root, tmp_path), _cfg(root, tmp_path, "data.length_grouping=window", "data.length_window=5")):
        with pytest.raises(ConfigError, match="data.length_(grouping|window)"):
            check_resumable_plan(saved, other, "ckpt", manifest)
    # a record written before these settings existed means: grouping off, per-epoch sampling
    old = {"data.batch_size": B, "data.property_sampling": False, "train.seed": 0}
    check_resumable_plan(old, _cfg(root, tmp_path), "ckpt", manifest)
    with pytest.raises(ConfigError, match="data.length_grouping 'none' -> 'window'"):
        check_resumable_plan(old, on, "ckpt", manifest)
    # the window size does not matter while grouping is off
    assert plan_settings(_cfg(root, tmp_path)) == plan_settings(_cfg(root, tmp_path, "data.length_window=9"))


@pytest.mark.parametrize(
    "override", ["data.length_grouping=sorted", "data.length_window=0", "data.property_sampling_mode=twice"]
)
def test_bad_settings_name_the_field(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(overrides=[override])


def test_arrange_leaves_the_rows_beyond_the_batches_in_place(varied):
    _, manifest, _ = varied
    rows = np.stack([np.zeros(45, int), np.arange(45)], axis=1)
    out = LengthGrouping(manifest, 2, lengths=[np.arange(48)[::-1].copy()]).arrange(
        rows, B, 5, lambda w: np.random.default_rng(w)
    )
    assert np.array_equal(out[40:], rows[40:]) and sorted(out[:40, 1]) == list(range(40))


# ------------------------------------------------------------------ property sampling drawn once


def _props(i):
    return {"existence": 1 if i % 3 else 3, "coverage": 3 + i % 2, "reviewed": False}


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    manifest, _ = _write(root / "train", n=160, per_shard=40, props=_props)
    return root, manifest


def _drawn(plan, epoch):
    return {r for b in _refs(plan, epoch) for r in b} | set(plan.leftovers(epoch))


def test_once_keeps_one_draw_for_every_epoch_and_world_size(sampled):
    _, m = sampled
    once = [EpochPlan(m, 1, 0, 2, 5, True, "once"), EpochPlan(m, 2, 1, 2, 5, True, "once")]
    drawn = _drawn(once[0], 0)
    assert 0 < len(drawn) < 160
    for epoch in range(1, 4):
        assert _drawn(once[0], epoch) == drawn
    assert _drawn(once[1], 2) | _drawn(EpochPlan(m, 2, 0, 2, 5, True, "once"), 2) == drawn
    assert _refs(once[0], 0) != _refs(once[0], 1)  # the order is still reshuffled every epoch
    per_epoch = EpochPlan(m, 1, 0, 2, 5, True)
    assert _drawn(per_epoch, 0) != _drawn(per_epoch, 1)  # the default redraws
    assert _drawn(EpochPlan(m, 1, 0, 2, 6, True, "once"), 0) != drawn  # the draw follows the seed


def test_once_draw_is_recorded_and_a_different_draw_refused(sampled):
    root, m = sampled
    cfg = load_config(
        overrides=[
            f"data.train_shards={root / 'train'}",
            "data.batch_size=2",
            "data.property_sampling=true",
            "data.property_sampling_mode=once",
        ]
    )
    saved = plan_record(cfg, plan_for(cfg, m, 2, 0))
    assert saved[KEPT_SET_KEY] == plan_for(cfg, m, 1, 0).digests()[KEPT_SET_KEY]
    check_resumable_plan(saved, cfg, "ckpt", m)
    with pytest.raises(ConfigError, match="kept set"):  # e.g. the keep rule changed since the run was started
        check_resumable_plan({**saved, KEPT_SET_KEY: "0" * 16}, cfg, "ckpt", m)
    per_epoch = load_config(
        overrides=[f"data.train_shards={root / 'train'}", "data.batch_size=2", "data.property_sampling=true"]
    )
    with pytest.raises(ConfigError, match="property_sampling_mode 'once' -> 'per_epoch'"):
        check_resumable_plan(saved, per_epoch, "ckpt", m)
    assert KEPT_SET_KEY not in plan_record(per_epoch, plan_for(per_epoch, m, 1, 0))
