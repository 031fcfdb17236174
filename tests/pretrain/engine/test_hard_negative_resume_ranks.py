"""Exact resume of hard-negative batches in real 2-rank Trainer runs (pretrain/data/hard_negatives.py).

Two spawned gloo ranks train a 48-protein demo corpus (each rank's share of an epoch: 3 batches of 8,
so 7 steps cross two epoch ends) under DeepSpeed ZeRO stage 1 (configs/zero1.json, torch_adam; half
precision is off on CPU). Stage 1 rather than 0: the Adam moments are partitioned between the ranks,
so a resume must restore each rank's own optimizer shard, a per-rank state stage 0 does not have; it
costs one parameter all-gather per step, nothing at this size (stage 2 and 3 add nothing for the data
path). For each hard-negative source, ``previous_epoch`` (the 2-rank epoch pass writes
RUN/hard_negatives/epoch<e>.npy) and an exported embeddings file, one run is uninterrupted and one is
stopped by a SIGTERM during step 4 (cursor (1, 1), inside epoch 1: a ``previous_epoch`` resume must
reuse the epoch0.npy the stopped run wrote) and resumed. Every run happens in one spawn.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port
from tests.spawn_ranks import launched_rank, run_ranks, trainer_overrides

pytestmark = pytest.mark.slow  # six short 2-rank Trainer runs (2 sources x uninterrupted, stopped, resumed)

WORLD, N, B = 2, 48, 8
PER_EPOCH = N // WORLD // B  # 3 batches per rank and epoch, no leftovers
STEPS = 2 * PER_EPOCH + 1  # epochs 0 and 1, then epoch 2's first batch (composed from the resumed run's epoch1.npy)
EPOCHS = STEPS // PER_EPOCH + 1  # begun: 0, 1 and 2
STOP = PER_EPOCH + 1  # the SIGTERM step: the checkpoint's cursor is (1, 1)
SOURCES = ("previous_epoch", "export")  # data.hard_negatives: the run's own epoch files, an export's .npy
OVERRIDES = [
    "data.hard_negative_ratio=0.5",  # a hard group of 4: the seed and 3 neighbours, then 4 random rows
    "data.hard_negative_k=8",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
    "train.stage1_steps=1",  # stage 2 (encoders train, their Adam state reset) before the stop
    "train.validate_every=0",
    "eval.batch_size=20",  # the epoch pass: chunks of 20, 20 and 8 rows; rank 1 repeats chunk 0 in round 2
    f"train.max_steps={STEPS}",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """48 train proteins in 6 shards of 8, 8 held out; and an embeddings file of the train shards as
    ``pretrain.eval.export_embeddings`` writes it: float32 (N, E), rows in manifest order, all-zero
    rows for proteins lacking the modality (two here)."""
    from data_shards.demo_corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("hard_negative_ranks")
    build_demo_corpus(out / "demo", num_train=N, num_heldout=8, samples_per_shard=8, seed=0)
    emb = np.random.default_rng(7).standard_normal((N, 16)).astype(np.float32)  # (N, E)
    emb[[5, 30]] = 0.0
    np.save(out / "sequence.npy", emb, allow_pickle=False)
    return out / "demo", out / "sequence.npy"


def _probe(losses: dict[int, float], stop_at: int | None = None):
    """Record this rank's own loss of every step (before the mean over ranks); with ``stop_at``, rank 1
    alone gets the SIGTERM during that step (the stop is voted over ranks): every rank saves a
    checkpoint after it and returns, as a preempted run does."""

    def probe(trainer):
        import signal

        real = trainer.train_step

        def train_step(batch):
            if stop_at is not None and trainer.rank == 1 and trainer.step == stop_at - 1:
                trainer._on_sigterm(signal.SIGTERM, None)
            values = real(batch)
            losses[trainer.step + 1] = values["loss"]
            return values

        trainer.train_step = train_step

    return probe


def _worker(rank: int, port: int, out: str, shards: str, tmp: str, emb_file: str) -> None:
    launched_rank(rank, WORLD, port, out, lambda: _runs(shards, Path(tmp), emb_file))


def _runs(shards: str, tmp: Path, emb_file: str) -> dict:
    """Per source: run ``a`` uninterrupted, run ``b`` stopped at step STOP and resumed (this rank's side)."""
    import os

    import torch.distributed as dist

    from pretrain.engine.run_files import RECORD_ENV
    from pretrain.run import init_process_group, prepare, run_trainer

    os.environ[RECORD_ENV] = "1"  # every rank appends its batches' ids to RUN/consumed/rank_<r>.jsonl
    init_process_group()

    def train(run_dir: Path, source: str, probe):
        plan = prepare(
            None,
            [*trainer_overrides(shards), *OVERRIDES, f"data.hard_negatives={source}"],
            "zero1.json",
            run_dir,
            WORLD,
        )
        trainer = run_trainer(plan, probe)
        dist.barrier()  # every rank's files are written before any rank reads the run directory again
        return trainer

    def stat(path: Path) -> tuple | None:
        return (path.stat().st_ino, path.stat().st_mtime_ns) if path.is_file() else None

    result: dict = {}
    for name, source in zip(SOURCES, ("previous_epoch", emb_file)):
        a, b = tmp / f"{name}_a", tmp / f"{name}_b"
        losses_a: dict[int, float] = {}
        result[f"{name}/a steps"] = train(a, source, _probe(losses_a)).step
        losses_b: dict[int, float] = {}
        stopped = train(b, source, _probe(losses_b, STOP))
        result[f"{name}/b stopped"] = (stopped.preempted, stopped.step)
        epoch0 = b / "hard_negatives" / "epoch0.npy"
        result[f"{name}/b epoch0 at stop"] = stat(epoch0)
        result[f"{name}/b steps"] = train(b, source, _probe(losses_b)).step
        result[f"{name}/b epoch0 after resume"] = stat(epoch0)
        result[f"{name}/losses"] = (losses_a, losses_b)
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> tuple[Path, list[dict]]:
    shards, emb_file = corpus
    tmp = tmp_path_factory.mktemp("runs")
    port = free_port()
    results = run_ranks(
        _worker, lambda r: (r, port, str(tmp), str(shards), str(tmp), str(emb_file)), WORLD, tmp, 300.0, "rank"
    )
    return tmp, results


def _consumed(run: Path, rank: int) -> list[tuple]:
    """(epoch, batch, ids) of every batch ``rank`` consumed in ``run``, in order."""
    lines = [json.loads(x) for x in (run / "consumed" / f"rank_{rank}.jsonl").read_text().splitlines()]
    return [(x["epoch"], x["batch"], tuple(x["ids"])) for x in lines]


def _mean_losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


@functools.cache
def _plan_ids(shards: Path, rank: int, epoch: int, source: str | None) -> list[tuple]:
    """The ids of ``rank``'s batches of ``epoch`` at WORLD ranks as the plan composes them from the
    embeddings file ``source`` (None: the plain shuffled plan)."""
    from data_shards.manifest import load_manifest
    from data_shards.reader import ShardReader
    from pretrain.config import load_config
    from pretrain.data.stream import plan_for

    hard = [f"data.hard_negatives={source}"] if source is not None else []
    cfg = load_config(overrides=[*trainer_overrides(shards), *OVERRIDES, *hard])
    plan = plan_for(cfg, load_manifest(cfg.data.train_shards), WORLD, rank)
    readers: dict = {}

    def ids(refs):
        return tuple(readers.setdefault(p, ShardReader(p)).read(i).id for p, i in refs)

    assert plan.batches_per_epoch(epoch) == PER_EPOCH
    return [ids(plan.batch_refs(epoch, i)) for i in range(PER_EPOCH)]


@pytest.mark.parametrize("source", SOURCES)
def test_each_resumed_rank_sees_the_uninterrupted_batches_and_losses(runs, source):
    """Rank by rank, the stopped-and-resumed run consumed the uninterrupted run's batches (ids, in order)
    and computed its own losses to rel 1e-6; so did the mean over ranks in metrics.jsonl."""
    tmp, results = runs
    for rank, res in enumerate(results):
        assert res[f"{source}/b stopped"] == (True, STOP)
        assert res[f"{source}/a steps"] == res[f"{source}/b steps"] == STEPS
        want, got = _consumed(tmp / f"{source}_a", rank), _consumed(tmp / f"{source}_b", rank)
        assert [x[:2] for x in want] == [(s // PER_EPOCH, s % PER_EPOCH) for s in range(STEPS)]
        assert got == want, f"rank {rank}"
        losses_a, losses_b = res[f"{source}/losses"]  # this rank's own loss per step; b: stopped + resumed
        assert sorted(losses_a) == sorted(losses_b) == list(range(1, STEPS + 1))
        assert losses_b == pytest.approx(losses_a, rel=1e-6, abs=1e-7), f"rank {rank}"
    assert results[0][f"{source}/losses"][0] != results[1][f"{source}/losses"][0]  # two ranks, two batches
    want, got = _mean_losses(tmp / f"{source}_a"), _mean_losses(tmp / f"{source}_b")  # metrics.jsonl
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_the_previous_epoch_resume_reuses_the_file_the_two_rank_pass_wrote(runs):
    """The resume inside epoch 1 read the stopped run's epoch0.npy as it was; both files equal run a's."""
    tmp, results = runs
    at_stop, after = results[0]["previous_epoch/b epoch0 at stop"], results[0]["previous_epoch/b epoch0 after resume"]
    assert at_stop is not None and after == at_stop  # written before the stop, neither rewritten nor recomputed
    for name in ("epoch0.npy", "epoch1.npy"):  # epoch1.npy: written by the resumed run, the same bytes
        a, b = (tmp / f"previous_epoch_{r}" / "hard_negatives" / name for r in "ab")
        assert b.read_bytes() == a.read_bytes(), name


@pytest.mark.parametrize("run", ["a", "b"])
@pytest.mark.parametrize("source", SOURCES)
def test_the_batches_are_the_plans_hard_negative_batches(runs, corpus, tmp_path, source, run):
    """Each rank's batches are the plan's hard-negative batches of its file (previous_epoch: epoch e's
    from the run's epoch<e-1>.npy, epoch 0's the plain plan), not the plain plan's."""
    tmp, _ = runs
    shards, emb_file = corpus
    run_dir = tmp / f"{source}_{run}"
    for rank in range(WORLD):
        consumed = _consumed(run_dir, rank)
        for epoch in range(EPOCHS):
            got = [ids for e, _, ids in consumed if e == epoch]
            plain = _plan_ids(shards, rank, epoch, None)[: len(got)]
            if source == "export":
                file = emb_file
            elif epoch == 0:
                assert got == plain  # no previous pass: the shuffled plan
                continue
            else:
                file = tmp_path / f"epoch{epoch - 1}.npy"  # a copy: the plan built here has no run directory
                file.write_bytes((run_dir / "hard_negatives" / file.name).read_bytes())
            assert got == _plan_ids(shards, rank, epoch, str(file))[: len(got)], (rank, epoch)
            assert got != plain, (rank, epoch)


@pytest.mark.parametrize("run", ["a", "b"])
@pytest.mark.parametrize("source", SOURCES)
def test_no_sample_comes_twice_in_an_epoch_across_ranks(runs, source, run):
    """Across the ranks a whole epoch delivers every protein once, and a begun one none twice."""
    tmp, _ = runs
    run_dir = tmp / f"{source}_{run}"
    for epoch in range(EPOCHS):
        ids = [i for rank in range(WORLD) for e, _, batch in _consumed(run_dir, rank) if e == epoch for i in batch]
        assert len(ids) == len(set(ids)), epoch
        assert len(ids) == (N if epoch < STEPS // PER_EPOCH else STEPS % PER_EPOCH * WORLD * B), epoch
