"""Hard-negative batches: neighbour groups mixed with random proteins (pretrain/data/hard_negatives.py)."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest

from pretrain.config import ConfigError, load_config
from pretrain.data.hard_negatives import (
    HardNegatives,
    PreviousEpochHardNegatives,
    _compose,
    epoch_file,
    nearest_neighbours,
)
from pretrain.data.plan_checks import check_plan, check_resumable_plan, plan_record
from pretrain.data.stream import BatchStream, Cursor, EpochPlan, local_stream, plan_for
from tests.pretrain.data.test_batching import _index, _refs, _stream, _write

B, CLUSTERS = 8, 8


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """192 proteins in 8 well-separated embedding clusters (protein i in cluster i % 8), one zero row."""
    root = tmp_path_factory.mktemp("hard")
    manifest, _ = _write(root / "train", n=192, per_shard=48)
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(CLUSTERS, 16))
    emb = centres[np.arange(192) % CLUSTERS] + 0.1 * rng.normal(size=(192, 16))
    emb[5] = 0.0  # a protein without the modality: exported as zeros
    np.save(root / "sequence.npy", emb.astype(np.float32), allow_pickle=False)
    return root, manifest


def _cfg(root, *extra):
    return load_config(
        overrides=[
            f"data.train_shards={root / 'train'}",
            f"data.batch_size={B}",
            f"data.hard_negatives={root / 'sequence.npy'}",
            "data.hard_negative_ratio=0.5",
            *extra,
        ]
    )


def test_exact_neighbours_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 12))
    emb[[3, 70]] = 0.0
    got = nearest_neighbours(emb, 7, backend="torch")
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-300)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    sims[:, [3, 70]] = -np.inf
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :7]
    keep = np.setdiff1d(np.arange(300), [3, 70])
    assert np.array_equal(got[keep], ref[keep]) and (got[[3, 70]] == -1).all()
    tied = np.ones((5, 3))  # identical embeddings: the lower row wins a tie
    assert nearest_neighbours(tied, 2, backend="torch").tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1]]


def test_faiss_proposes_the_same_neighbours():
    pytest.importorskip("faiss")
    emb = np.random.default_rng(0).normal(size=(200, 12))
    assert np.array_equal(nearest_neighbours(emb, 5, "faiss"), nearest_neighbours(emb, 5, "torch"))


def test_compose_takes_the_seed_its_free_neighbours_then_stream_order():
    knn = np.array([[3, 1, 2], [0, 2, 3], [1, 0, 3], [0, 1, 2], [5, 0, 1], [4, 0, 1]])
    # batch 0: seed 0, neighbour 3 (h=2), then 1; batch 1: seed 2, neighbour 1 taken -> 0 taken -> 3 taken -> fill 4
    assert _compose(knn, B=3, h=2, batches=2).tolist() == [0, 3, 1, 2, 4, 5]


def test_batches_cluster_at_the_ratio_and_keep_the_epochs_samples(clustered):
    root, manifest = clustered
    idx = _index(manifest)
    plan = plan_for(_cfg(root), manifest, 2, 0)
    plain = EpochPlan(manifest, 2, 0, B, 0)
    for epoch in range(2):
        batches = _refs(plan, epoch)
        assert sorted(itertools.chain(*batches)) == sorted(itertools.chain(*_refs(plain, epoch)))
        assert plan.leftovers(epoch) == plain.leftovers(epoch)
        clusters = [[idx[r] % CLUSTERS for r in b] for b in batches]
        h = plan.arranger.group_size(B)
        assert h == 4
        # the first h rows of a batch are the seed and its nearest untaken neighbours: one cluster
        # (until the rank's share runs short of free rows of a cluster late in the epoch)
        grouped = [len(set(c[:h])) == 1 for c, bt in zip(clusters, batches) if 5 not in (idx[r] for r in bt[:h])]
        assert all(grouped[:6]) and np.mean(grouped) > 0.75, grouped
        # same-cluster pairs per batch: far above random batches (1/8 of pairs)
        same = np.mean([np.mean([a == b for a, b in itertools.combinations(c, 2)]) for c in clusters])
        rand = np.mean(
            [
                np.mean([idx[a] % 8 == idx[b] % 8 for a, b in itertools.combinations(bt, 2)])
                for bt in _refs(plain, epoch)
            ]
        )
        assert same > 0.2 and same > 2 * rand, (same, rand)


def test_ratio_sets_the_group_size(clustered):
    root, manifest = clustered
    idx = _index(manifest)
    for ratio, h in ((0.25, 2), (1.0, 8)):
        plan = plan_for(_cfg(root, f"data.hard_negative_ratio={ratio}"), manifest, 1, 0)
        assert plan.arranger.group_size(B) == h
        first = [[idx[r] % CLUSTERS for r in b] for b in _refs(plan, 0)[:6]]  # early batches: clusters still full
        assert all(len(set(c[:h])) == 1 for c in first)
    off = plan_for(_cfg(root, "data.hard_negative_ratio=0.0"), manifest, 1, 0)
    assert _refs(off, 0) == _refs(EpochPlan(manifest, 1, 0, B, 0), 0)  # no group: the plain order


def test_deterministic_and_resumable_on_one_and_two_ranks(clustered):
    root, manifest = clustered
    cfg = _cfg(root)
    for world in (1, 2):
        plan = plan_for(cfg, manifest, world, world - 1)
        full = _stream(plan, Cursor(), 30)  # crosses an epoch boundary
        again = _stream(plan_for(cfg, manifest, world, world - 1), Cursor(), 30)
        assert full == again
        assert _stream(plan_for(cfg, manifest, world, world - 1), full[6][2], 20) == full[7:27]


def test_elastic_resume_delivers_each_sample_at_most_once(clustered):
    root, manifest = clustered
    cfg = _cfg(root)
    old = [plan_for(cfg, manifest, 2, r) for r in range(2)]
    consumed = [ref for p in old for refs, _, _ in _stream(p, Cursor(), 4) for ref in refs]
    new = plan_for(cfg, manifest, 1, 0)
    start = new.resume_cursor([Cursor(0, 4)] * 2, 2)
    rest = [ref for i in range(new.batches_per_epoch(0, start.resized)) for ref in new.batch_refs(0, i, start.resized)]
    left = new.leftovers(0, start.resized)
    assert len(consumed + rest) == len(set(consumed + rest)) and not set(consumed + rest) & set(left)
    assert set(consumed) | set(rest) | set(left) == set(_index(manifest))


def test_a_collated_batch_and_the_checkpoint_record(clustered, tmp_path):
    root, manifest = clustered
    cfg = _cfg(root)
    batch, bad, cursor = next(iter(local_stream(cfg, plan_for(cfg, manifest, 1, 0), Cursor(), {})))
    assert bad == [] and len(batch["ids"]) == B and cursor == Cursor(0, 1)
    saved = plan_record(cfg, plan_for(cfg, manifest, 1, 0))
    assert len(saved[HardNegatives.DIGEST_KEY]) == 16
    check_resumable_plan(saved, cfg, "ckpt", manifest)
    other = tmp_path / "other.npy"
    emb = np.load(root / "sequence.npy")
    np.save(other, emb[::-1].copy(), allow_pickle=False)
    with pytest.raises(ConfigError, match="hard_negatives content"):
        check_resumable_plan(saved, _cfg(root, f"data.hard_negatives={other}"), "ckpt", manifest)
    with pytest.raises(ConfigError, match="hard_negative_ratio 0.5 -> 0.25"):
        check_resumable_plan(saved, _cfg(root, "data.hard_negative_ratio=0.25"), "ckpt", manifest)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((10, 4), np.float32), "10 rows"),
        (np.zeros(192, np.float32), "float \\(N, E\\)"),
        (np.full((192, 4), np.nan, np.float32), "non-finite"),
    ],
)
def test_a_bad_embeddings_file_is_an_error_naming_it(clustered, tmp_path, array, message):
    root, manifest = clustered
    path = tmp_path / "emb.npy"
    np.save(path, array, allow_pickle=False)
    with pytest.raises(ConfigError, match=f"emb.npy.*{message}"):
        HardNegatives(manifest, path, 0.5, 8).embeddings()
    with pytest.raises(ConfigError, match="file not found"):
        HardNegatives(manifest, tmp_path / "missing.npy", 0.5, 8).embeddings()
    with pytest.raises(ConfigError, match=f"emb.npy.*{message}"):  # the launcher checks before any rank starts
        check_plan(_cfg(root, f"data.hard_negatives={path}"), 2)


def test_hard_negatives_and_length_grouping_exclude_each_other(clustered):
    root, _ = clustered
    with pytest.raises(ConfigError, match="choose one"):
        _cfg(root, "data.length_grouping=window")
    with pytest.raises(ConfigError, match="data.hard_negative_ratio"):
        _cfg(root, "data.hard_negative_ratio=1.5")


# ---------------------------------------------------------------- data.hard_negatives: previous_epoch


def _previous(root, *extra):
    return _cfg(root, "data.hard_negatives=previous_epoch", *extra)


def test_previous_epoch_plan_is_plain_in_epoch_0_then_the_export_plan_of_the_runs_file(clustered, tmp_path):
    root, manifest = clustered
    cfg, export = _previous(root), _cfg(root)
    for world, rank in ((1, 0), (2, 1)):
        plan = plan_for(cfg, manifest, world, rank, run_dir=tmp_path)
        assert _refs(plan, 0) == _refs(EpochPlan(manifest, world, rank, B, 0), 0)  # no previous pass: random
        assert plan_record(cfg, plan, epoch=0)[PreviousEpochHardNegatives.RECORD_KEY] is None
        with pytest.raises(ConfigError, match="hard_negatives/epoch0.npy not found"):
            plan.batch_refs(1, 0)
        (tmp_path / "hard_negatives").mkdir(exist_ok=True)
        shutil.copy(root / "sequence.npy", epoch_file(tmp_path / "hard_negatives", 0))
        exported = plan_for(export, manifest, world, rank)
        assert _refs(plan, 1) == _refs(exported, 1) != _refs(EpochPlan(manifest, world, rank, B, 0), 1)
        assert plan_record(cfg, plan, epoch=1)[PreviousEpochHardNegatives.RECORD_KEY] == {
            "file": "epoch0.npy",
            "digest": exported.digests()[HardNegatives.DIGEST_KEY],
        }
        epoch_file(tmp_path / "hard_negatives", 0).unlink()
    with pytest.raises(ConfigError, match="no run directory"):
        plan_for(cfg, manifest, 1, 0).batch_refs(1, 0)
    check_plan(cfg, 2)  # nothing to read before the run


def test_previous_epoch_settings_are_part_of_the_plan(clustered):
    root, manifest = clustered
    saved = plan_record(_cfg(root), plan_for(_cfg(root), manifest, 1, 0))
    with pytest.raises(ConfigError, match="data.hard_negatives True -> 'previous_epoch'"):
        check_resumable_plan(saved, _previous(root), "ckpt", manifest)
    saved = plan_record(_previous(root), plan_for(_previous(root), manifest, 1, 0))
    with pytest.raises(ConfigError, match="data.hard_negative_modality 'sequence' -> 'text'"):
        check_resumable_plan(saved, _previous(root, "data.hard_negative_modality=text"), "ckpt", manifest)
    with pytest.raises(ConfigError, match="data.hard_negative_modality='msa'"):
        _previous(root, "data.hard_negative_modality=msa")


def test_stream_waits_at_the_epoch_end_for_the_runs_file(clustered, tmp_path):
    """A prefetching stream (the Ray loader keeps data.prefetch_batches in flight) submits no batch of
    epoch 1 before epoch 0's last batch is handed out: the file does not exist before."""
    root, manifest = clustered
    plan = plan_for(_previous(root), manifest, 1, 0, run_dir=tmp_path)
    submitted = []

    def submit(slot, refs, key):
        submitted.append(refs)
        return lambda: ({"refs": refs}, [])

    stream = iter(BatchStream(plan, Cursor(), submit, prefetch=4))
    n = plan.batches_per_epoch(0)
    first = [next(stream)[0]["refs"] for _ in range(n)]
    assert first == _refs(plan, 0) and len(submitted) == n  # nothing of epoch 1 in flight
    (tmp_path / "hard_negatives").mkdir()
    shutil.copy(root / "sequence.npy", epoch_file(tmp_path / "hard_negatives", 0))  # what the trainer writes here
    second = [next(stream)[0]["refs"] for _ in range(plan.batches_per_epoch(1))]
    assert second == _refs(plan_for(_cfg(root), manifest, 1, 0), 1)
