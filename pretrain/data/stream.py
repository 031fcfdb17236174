"""Deterministic, resumable batch streams over a shard set: in-process or through Ray actors.

Order rule (the same on every launch, whatever the actors do):

* epoch e permutes the shard list with seed (seed, e) and deals it like cards: rank r's
  shards are every world-th shard starting at r. The samples of those shards, rank 0's shards
  first, then rank 1's, ..., are cut into ``world`` equal contiguous shares of
  ``N // world`` samples (N: the epoch's samples); rank r gets share r. With shards of equal
  size whose number divides by ``world`` a rank reads exactly its own shards; otherwise a
  rank's share spills over into its neighbour's shards, so that shards of unequal size (the
  last shard of a set is usually smaller) or fewer shards than ranks never leave samples out
  of an epoch. The fewer than ``world`` samples beyond the last share wait for the next epoch;
* with ``data.property_sampling`` the kept samples are drawn (seed (seed, e))
  before the shares are cut, so the shares stay equal;
* the rank's share is permuted with seed (seed, e, r), and batch i of the epoch is the slice
  [i*B, (i+1)*B) of that permutation;
* every rank runs ``(N // world) // B`` batches per epoch, so all ranks step together (the
  fewer than B samples left in each share wait for the next epoch's shuffle);
* the randomness of batch i (crops, augmentations, second views) comes from seed
  (seed, e, i, r), so a batch is a pure function of its cursor.

The cursor ``(epoch, batch)`` is therefore all a checkpoint needs to resume with exactly the
samples an uninterrupted run would have seen. (Every seed written (seed, ...) here also carries a
word naming its purpose, so that no two random streams coincide.)

Elastic resume (the rule when a run resumes on a different number of ranks mid-epoch):

* an epoch is a chain of *segments*; segment 0 is the plan above for the world size the epoch
  started with. When a run resumes on W' ranks from a checkpoint written by W ranks after b
  batches of the current segment, the cursor records ``(W, b)`` in ``Cursor.resized`` and the
  epoch continues with a new segment on W' ranks;
* the new segment holds exactly the samples of the epoch that no batch delivered yet: every
  old rank's rows from position b*B on (batches are pure functions of (seed, epoch, world,
  rank), so the consumed ones are known), *including* the rows the old plan would have left
  over at the epoch's end. They are permuted with seed (seed, e, k) (k = segment number) and
  dealt in batch-major order: batch i of new rank r is rows [(i*W' + r)*B, (i*W' + r + 1)*B);
* the segment runs ``remaining // (W'*B)`` batches; the fewer than W'*B samples beyond are
  this epoch's leftovers (like the normal plan's leftovers, they come back in the next
  epoch's shuffle). Within the epoch no sample is repeated, and every sample of the epoch
  is delivered except the final segment's leftovers;
* the randomness of batch i of segment k>0 comes from seed (seed, e, i, r, k);
* from the next epoch on, the normal plan for the new world size applies.

Another change inside the remainder segment chains on (segment k+1 takes what segment k left).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Cursor:
    """Where a rank is in its stream: ``batch`` batches of the current segment of ``epoch`` are
    consumed. ``resized`` lists the earlier segments of this epoch, oldest first, as
    (world size, batches consumed) pairs: empty unless the run changed its number of ranks
    during the epoch (see the module docstring)."""

    epoch: int = 0
    batch: int = 0
    resized: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict:
        # Plain ints and lists only: rank files are read back with torch.load(weights_only=True).
        return {"epoch": self.epoch, "batch": self.batch, "resized": [list(s) for s in self.resized]}

    @classmethod
    def from_dict(cls, d: dict) -> Cursor:
        resized = tuple((int(w), int(b)) for w, b in d.get("resized", ()))
        return cls(epoch=int(d["epoch"]), batch=int(d["batch"]), resized=resized)


@dataclass
class _Segment:
    """One segment of an epoch at one world size (see the module docstring)."""

    per_rank: list[np.ndarray]  # rank r's rows in the order its batches take them, each (N_r, 2)
    batches: int  # batches every rank runs in this segment
    tail: np.ndarray  # (T, 2) rows of the segment that no rank's row list holds (remainder leftovers)

    def unconsumed(self, consumed: int, batch_size: int) -> np.ndarray:
        """Rows no batch delivered after ``consumed`` batches on every rank, (R, 2)."""
        b = min(consumed, self.batches) * batch_size
        return np.concatenate([p[b:] for p in self.per_rank] + [self.tail])


# Each random stream's seed is [seed, purpose, ...] with one fixed length per purpose. numpy's
# SeedSequence pads its entropy with zeros, so keys that differ only by trailing zeros ([s, e] and
# [s, e, 0]) would give one and the same stream: the purpose word keeps the streams apart.
_SHARD_ORDER, _KEEP, _SHARE, _REMAP, _BATCH = 1, 2, 3, 4, 5


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
        self.manifest, self.world_size, self.rank = manifest, world_size, rank
        self.batch_size, self.seed = batch_size, seed
        self._keep_prob = [_keep_probabilities(s) for s in manifest.shards] if property_sampling else None
        self._cache: dict[tuple, _Segment] = {}

    def _key(self, purpose: int, *parts: int) -> list[int]:
        return [self.seed, purpose, *parts]

    def _rng(self, purpose: int, *parts: int) -> np.random.Generator:
        return np.random.default_rng(self._key(purpose, *parts))

    def shard_order(self, epoch: int) -> np.ndarray:
        """The permutation of the shard list that ``epoch`` deals to the ranks."""
        return self._rng(_SHARD_ORDER, epoch).permutation(len(self.manifest.shards))

    def _layout(self, epoch: int, world: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The normal plan of ``epoch`` at ``world`` ranks (see the module docstring).

        Returns:
            (per_rank, tail): rank r's rows (shard index, sample index) in the order its batches
            take them, each (N // world, 2), and the (N % world, 2) rows beyond the last share.
        """
        shards = self.manifest.shards
        if not shards:
            raise ConfigError(f"shard set {self.manifest.root} has no shards")
        order = self.shard_order(epoch)
        dealt = [int(i) for r in range(world) for i in order[r::world]]  # rank 0's shards, then rank 1's, ...
        refs = np.concatenate(
            [np.stack([np.full(shards[i].num_samples, i), np.arange(shards[i].num_samples)], axis=1) for i in dealt]
        )  # (N, 2)
        if self._keep_prob is not None:  # ProtCLIP property-driven sampling, redrawn per epoch
            p = np.concatenate([self._keep_prob[i] for i in dealt])
            refs = refs[self._rng(_KEEP, epoch).random(len(refs)) < p]
        n = len(refs) // world
        per_rank = [refs[r * n : (r + 1) * n][self._rng(_SHARE, epoch, r).permutation(n)] for r in range(world)]
        return per_rank, refs[world * n :]

    def _segment(self, epoch: int, resized: tuple[tuple[int, int], ...], world: int) -> _Segment:
        """Segment ``len(resized)`` of ``epoch`` run at ``world`` ranks after the segments ``resized``."""
        key = (epoch, resized, world)
        if key in self._cache:
            return self._cache[key]
        B = self.batch_size
        if not resized:
            per_rank, tail = self._layout(epoch, world)
            nb = len(per_rank[0]) // B
            if nb == 0:
                raise ConfigError(
                    f"data.batch_size={B} is impossible: a rank's share of {self.manifest.root} at "
                    f"{world} ranks holds {len(per_rank[0])} samples in epoch {epoch}"
                )
            seg = _Segment(per_rank, nb, tail)
        else:
            (prev_world, consumed), k = resized[-1], len(resized)
            prev = self._segment(epoch, resized[:-1], prev_world)
            if not 0 <= consumed <= prev.batches:
                raise ValueError(
                    f"cursor history {resized}: segment {k - 1} of epoch {epoch} has {prev.batches} batches, "
                    f"not {consumed}"
                )
            rest = prev.unconsumed(consumed, B)
            pool = rest[self._rng(_REMAP, epoch, k).permutation(len(rest))]
            nb = len(pool) // (world * B)
            dealt = pool[: nb * world * B].reshape(nb, world, B, 2)  # (batch, rank, row, 2)
            per_rank = [dealt[:, r].reshape(-1, 2) for r in range(world)]
            seg = _Segment(per_rank, nb, pool[nb * world * B :])
        if len(self._cache) > 16 or any(e != epoch for e, _, _ in self._cache):
            self._cache = {}  # keep one epoch: plans are cheap to rebuild
        self._cache[key] = seg
        return seg

    def batches_per_epoch(self, epoch: int, resized: tuple[tuple[int, int], ...] = ()) -> int:
        """Batches of the current segment of ``epoch`` (the whole epoch unless ``resized``)."""
        return self._segment(epoch, tuple(resized), self.world_size).batches

    def batch_refs(self, epoch: int, index: int, resized: tuple[tuple[int, int], ...] = ()) -> list[SampleRef]:
        seg = self._segment(epoch, tuple(resized), self.world_size)
        rows = seg.per_rank[self.rank][index * self.batch_size : (index + 1) * self.batch_size]
        return [(str(self.manifest.shards[int(s)].path), int(i)) for s, i in rows]

    def rng_key(self, epoch: int, index: int, resized: tuple[tuple[int, int], ...] = ()) -> list[int]:
        """Seed of the randomness (crops, augmentations, views) of batch ``index`` of ``epoch``."""
        key = self._key(_BATCH, epoch, index, self.rank)
        return key + [len(resized)] if resized else key  # segment k >= 1: never a trailing zero

    def leftovers(self, epoch: int, resized: tuple[tuple[int, int], ...] = ()) -> list[SampleRef]:
        """Samples of the current segment that no rank's batch delivers in ``epoch`` (all ranks)."""
        seg = self._segment(epoch, tuple(resized), self.world_size)
        rows = seg.unconsumed(seg.batches, self.batch_size)
        return [(str(self.manifest.shards[int(s)].path), int(i)) for s, i in rows]

    def resume_cursor(self, saved: list[Cursor], saved_world: int) -> Cursor:
        """This plan's cursor for a run resumed from the cursors ``saved`` of ``saved_world`` ranks.

        Same world size: the saved cursor. Another world size: the epoch goes on with a remainder
        segment over the samples no old rank consumed (the rule in the module docstring).

        Raises:
            ValueError: the saved cursors differ (ranks always step together) or are inconsistent.
        """
        if len(saved) != saved_world or len(set(saved)) != 1:
            raise ValueError(f"expected one identical cursor from each of {saved_world} ranks, got {saved}")
        old = saved[0]
        if saved_world == self.world_size:
            return old
        if old.batch >= self._segment(old.epoch, old.resized, saved_world).batches:
            return Cursor(old.epoch + 1, 0)  # saved at the epoch's very end: nothing left of it
        if old.batch == 0:
            return Cursor(old.epoch, 0, old.resized)  # the old segment consumed nothing
        return Cursor(old.epoch, 0, (*old.resized, (saved_world, old.batch)))


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
    # One plan is enough: every rank gets an equal share of the epoch.
    plan_for(cfg, manifest, world_size, 0).batches_per_epoch(0)


def plan_settings(cfg: Config) -> dict:
    """The recipe values a saved cursor (epoch, batch number) is counted in; a resume needs the same."""
    return {
        "data.batch_size": cfg.data.batch_size,
        "data.property_sampling": cfg.data.property_sampling,
        "train.seed": cfg.train.seed,
    }


SHARD_SET_KEY = "data.train_shards content"  # key of :func:`shard_set_digest` in a checkpoint's data plan


def shard_set_digest(manifest: Manifest) -> str:
    """Content identity of a shard set: its shards' names, sample counts and checksums, in manifest order.

    The same shards copied elsewhere (another directory, a bucket) give the same digest; a set with
    any other shard, sample count or byte gives another. The path is not part of it.
    """
    listing = [[s.name, s.num_samples, s.sha256] for s in manifest.shards]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def check_resumable_plan(saved: dict | None, cfg: Config, source: str, manifest: Manifest | None = None) -> None:
    """Refuse to resume a cursor under other plan settings (it would skip or repeat samples).

    Args:
        saved: :func:`plan_settings` of the run being resumed, with :data:`SHARD_SET_KEY` when the
            checkpoint recorded it; None for checkpoints written before they were recorded (accepted).
        source: where ``saved`` comes from, for the message.
        manifest: the train shard set this launch reads; with it, a checkpoint's cursor that
            counts batches of another shard set (other content, wherever it lives) is refused.

    Raises:
        ConfigError: a setting differs, or the shard set is another one.
    """
    if saved is None:
        return
    if manifest is not None and saved.get(SHARD_SET_KEY) not in (None, shard_set_digest(manifest)):
        raise ConfigError(
            f"{source}: the run trained on another shard set than data.train_shards={cfg.data.train_shards} "
            f"(content digest {saved[SHARD_SET_KEY]}, this one {shard_set_digest(manifest)}); its data cursor "
            "would index unrelated samples. Point data.train_shards at the run's shards (a copy elsewhere is "
            "fine), or use a new --run-dir"
        )
    now = plan_settings(cfg)
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in now.items() if saved.get(key) != value]
    if changed:
        raise ConfigError(
            f"{source}: the run's data cursor counts batches of another sampling plan ({', '.join(changed)}); "
            "resuming would skip or repeat samples. Relaunch with the run's values, or use a new --run-dir"
        )


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
        self.plan, self.cursor, self.submit, self.prefetch = plan, cursor, submit, prefetch
        self._next = cursor  # next batch to submit
        self._inflight: collections.deque = collections.deque()
        self._slot = 0
        # Debugging / testing aid: a JSONL file receiving {epoch, batch, resized, ids} per batch handed out.
        self.record: Path | None = None

    def _advance(self, c: Cursor) -> Cursor:
        if c.batch + 1 >= self.plan.batches_per_epoch(c.epoch, c.resized):
            return Cursor(c.epoch + 1, 0)
        return Cursor(c.epoch, c.batch + 1, c.resized)

    def _fill(self) -> None:
        while len(self._inflight) < self.prefetch:
            c = self._next
            if c.batch >= self.plan.batches_per_epoch(c.epoch, c.resized):
                c = Cursor(c.epoch + 1, 0)  # cursor saved at an epoch's end, or an empty remainder segment
            refs = self.plan.batch_refs(c.epoch, c.batch, c.resized)
            wait = self.submit(self._slot, refs, self.plan.rng_key(c.epoch, c.batch, c.resized))
            self._inflight.append((c, wait))
            self._slot += 1
            self._next = self._advance(c)

    def __iter__(self) -> Iterator[tuple[dict, list[dict], Cursor]]:
        while True:
            self._fill()
            c, wait = self._inflight.popleft()
            batch, bad = wait()
            if self.record is not None:
                self._record(c, batch)
            self.cursor = self._advance(c)
            yield batch, bad, self.cursor

    def _record(self, c: Cursor, batch: dict) -> None:
        line = {"epoch": c.epoch, "batch": c.batch, "resized": [list(x) for x in c.resized], "ids": batch["ids"]}
        self.record.parent.mkdir(parents=True, exist_ok=True)
        with open(self.record, "a") as f:
            f.write(json.dumps(line) + "\n")


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
