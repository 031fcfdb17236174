"""Deterministic, resumable batch streams over a shard set: in-process or through Ray actors.

Order rule (the same on every launch, whatever the actors do):

* epoch e permutes the shard list with seed (seed, e); rank r takes every world-th shard
  starting at r (shard-level split: ranks never read the same shard in one epoch);
* the rank's samples (all samples of its shards) are permuted with seed (seed, e, r), and
  batch i of the epoch is the slice [i*B, (i+1)*B) of that permutation;
* every rank runs ``min over ranks of (samples // B)`` batches per epoch, so all ranks step
  together (the few leftover samples of the largest ranks wait for the next epoch's shuffle);
* the randomness of batch i (crops, augmentations, second views) comes from seed
  (seed, e, i, r), so a batch is a pure function of its cursor.

The cursor ``(epoch, batch)`` is therefore all a checkpoint needs to resume with exactly the
samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_shards.manifest import Manifest, load_manifest
from data_shards.reader import BadSampleError, BadShardError, ShardReader
from data_shards.sampling import keep_probability
from pretrain.config import Config, ConfigError
from pretrain.data.collate import BatchBuilder

log = logging.getLogger(__name__)

UNREADABLE_SHARD = "unreadable shard"  # the reason given for every sample of a shard that cannot be opened
SampleRef = tuple[str, int]  # (absolute shard path, sample index inside the shard)


@dataclass
class Cursor:
    """Where a rank is in its stream: ``batch`` batches of ``epoch`` are consumed."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Cursor:
        return cls(epoch=int(d["epoch"]), batch=int(d["batch"]))


class EpochPlan:
    """Which samples form batch i of epoch e on rank r (see the module docstring)."""

    def __init__(
        self,
        manifest: Manifest,
        world_size: int,
        rank: int,
        batch_size: int,
        seed: int,
        property_sampling: bool = False,
    ):
        if len(manifest.shards) < world_size:
            raise ConfigError(
                f"shard set {manifest.root} has {len(manifest.shards)} shards, fewer than the "
                f"{world_size} ranks: each rank needs at least one shard"
            )
        self.manifest, self.world_size, self.rank = manifest, world_size, rank
        self.batch_size, self.seed = batch_size, seed
        self._keep_prob = [_keep_probabilities(s) for s in manifest.shards] if property_sampling else None
        self._cache: dict[int, tuple[list[np.ndarray], int]] = {}

    def _epoch(self, epoch: int) -> tuple[list[np.ndarray], int]:
        if epoch not in self._cache:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.manifest.shards))
            per_rank = []
            for r in range(self.world_size):
                shards = order[r :: self.world_size]
                refs = np.concatenate(
                    [
                        np.stack([np.full(s.num_samples, i), np.arange(s.num_samples)], axis=1)
                        for i in shards
                        for s in [self.manifest.shards[i]]
                    ]
                )
                perm = np.random.default_rng([self.seed, epoch, r]).permutation(len(refs))
                refs = refs[perm]
                if self._keep_prob is not None:  # ProtCLIP property-driven sampling, redrawn per epoch
                    p = np.array([self._keep_prob[s][i] for s, i in refs])
                    refs = refs[np.random.default_rng([self.seed, epoch, r, 1]).random(len(refs)) < p]
                per_rank.append(refs)
            nb = min(len(p) for p in per_rank) // self.batch_size
            if nb == 0:
                smallest = min(len(p) for p in per_rank)
                raise ConfigError(
                    f"data.batch_size={self.batch_size} is impossible: the smallest rank share of "
                    f"{self.manifest.root} holds {smallest} samples in epoch {epoch}"
                )
            self._cache = {epoch: (per_rank, nb)}  # keep one epoch: plans are cheap to rebuild
        return self._cache[epoch]

    def batches_per_epoch(self, epoch: int) -> int:
        return self._epoch(epoch)[1]

    def batch_refs(self, epoch: int, index: int) -> list[SampleRef]:
        per_rank, _ = self._epoch(epoch)
        rows = per_rank[self.rank][index * self.batch_size : (index + 1) * self.batch_size]
        return [(str(self.manifest.shards[int(s)].path), int(i)) for s, i in rows]

    def rng_key(self, epoch: int, index: int) -> list[int]:
        return [self.seed, epoch, index, self.rank]


def _keep_probabilities(shard) -> np.ndarray:
    """Per-sample keep probability of one shard (ProtCLIP: p = sqrt(o/4)/e^3 with drop rules).

    Samples without recorded properties (e.g. the demo corpus) are always kept.
    """
    props = shard.sample_props or {}
    n = shard.num_samples
    existence = props.get("existence") or [None] * n
    coverage = props.get("coverage") or [None] * n
    reviewed = props.get("reviewed") or [False] * n
    return np.array(
        [
            1.0 if o is None else keep_probability(e, o, reviewed=bool(rv))
            for e, o, rv in zip(existence, coverage, reviewed)
        ]
    )


def check_plan(cfg: Config, world_size: int) -> None:
    """Fail early (before any process group starts) on a missing shard set or impossible batch."""
    manifest = load_manifest(cfg.data.train_shards)  # a path or a URL (data_shards.storage)
    # One plan is enough: every rank's plan lays out all ranks' shares and checks the smallest.
    plan_for(cfg, manifest, world_size, 0).batches_per_epoch(0)


def plan_for(cfg: Config, manifest: Manifest, world_size: int, rank: int) -> EpochPlan:
    """The :class:`EpochPlan` a recipe asks for."""
    return EpochPlan(
        manifest, world_size, rank, cfg.data.batch_size, cfg.train.seed, property_sampling=cfg.data.property_sampling
    )


class BatchSource:
    """Reads sample refs and collates them; lives in a reader actor or in-process."""

    def __init__(self, cfg: Config, views: dict[str, bool] | None, train: bool):
        self.builder = BatchBuilder(cfg, views)
        self.train = train
        self._readers: dict[str, ShardReader | None] = {}
        self._bad_shards_reported: set[str] = set()

    def _reader(self, path: str) -> ShardReader | None:
        if path not in self._readers:
            try:
                self._readers[path] = ShardReader(path)
            except BadShardError as e:
                log.error("unreadable shard skipped: %s", e)
                self._readers[path] = None
        return self._readers[path]

    def build(self, refs: list[SampleRef], rng_key: list[int]) -> tuple[dict, list[dict]]:
        """Collate the samples ``refs``; unreadable ones become all-absent rows.

        Returns:
            (batch, bad) where ``bad`` lists {"shard", "key", "reason"} for each skipped sample.
        """
        records, bad = [], []
        for path, idx in refs:
            reader = self._reader(path)
            if reader is None:
                records.append(None)
                bad.append({"shard": path, "key": f"#{idx}", "reason": UNREADABLE_SHARD})
                continue
            try:
                records.append(reader.read(idx))
            except BadSampleError as e:
                records.append(None)
                bad.append({"shard": e.shard, "key": e.key, "reason": e.reason})
        batch = self.builder.build(records, np.random.default_rng(rng_key), self.train)
        return batch, bad


Submit = Callable[[int, list[SampleRef], list[int]], Callable[[], tuple[dict, list[dict]]]]


class BatchStream:
    """Iterates (batch, bad_samples, cursor_after) from a cursor, with batches in flight.

    ``submit(slot, refs, rng_key)`` starts building one batch and returns a function that waits
    for it; the in-process and Ray streams differ only there.
    """

    def __init__(self, plan: EpochPlan, cursor: Cursor, submit: Submit, prefetch: int):
        self.plan, self.cursor, self.submit, self.prefetch = plan, Cursor(**cursor.to_dict()), submit, prefetch
        self._next = Cursor(**cursor.to_dict())  # next batch to submit
        self._inflight: collections.deque = collections.deque()
        self._slot = 0

    def _advance(self, c: Cursor) -> Cursor:
        if c.batch + 1 >= self.plan.batches_per_epoch(c.epoch):
            return Cursor(c.epoch + 1, 0)
        return Cursor(c.epoch, c.batch + 1)

    def _fill(self) -> None:
        while len(self._inflight) < self.prefetch:
            c = self._next
            if c.batch >= self.plan.batches_per_epoch(c.epoch):  # cursor saved at an epoch's end
                c = Cursor(c.epoch + 1, 0)
            refs = self.plan.batch_refs(c.epoch, c.batch)
            wait = self.submit(self._slot, refs, self.plan.rng_key(c.epoch, c.batch))
            self._inflight.append((c, wait))
            self._slot += 1
            self._next = self._advance(c)

    def __iter__(self) -> Iterator[tuple[dict, list[dict], Cursor]]:
        while True:
            self._fill()
            c, wait = self._inflight.popleft()
            batch, bad = wait()
            self.cursor = self._advance(c)
            yield batch, bad, self.cursor


def local_stream(cfg: Config, plan: EpochPlan, cursor: Cursor, views: dict[str, bool]) -> BatchStream:
    """The stream built in this process (tests, debugging, ``data.loader=local``)."""
    source = BatchSource(cfg, views, train=True)

    def submit(slot, refs, key):
        result = source.build(refs, key)
        return lambda: result

    return BatchStream(plan, cursor, submit, prefetch=1)


def iter_eval_batches(cfg: Config, shard_dir: str | Path, batch_size: int, max_samples: int | None = None):
    """Deterministic evaluation batches over every sample of ``shard_dir`` in manifest order."""
    manifest = load_manifest(shard_dir)
    refs = [(str(s.path), i) for s in manifest.shards for i in range(s.num_samples)]
    if max_samples is not None:
        refs = refs[:max_samples]
    source = BatchSource(cfg, views=None, train=False)
    for start in range(0, len(refs), batch_size):
        batch, bad = source.build(refs[start : start + batch_size], [cfg.train.seed, start])
        yield batch, bad
