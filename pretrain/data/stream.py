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
* with ``data.property_sampling`` the kept samples are drawn (seed (seed, e); with
  ``data.property_sampling_mode: once`` one draw in manifest order, seed (seed), serves every epoch)
  before the shares are cut, so the shares stay equal;
* the rank's share is permuted with seed (seed, e, r), and batch i of the epoch is the slice
  [i*B, (i+1)*B) of that permutation (with ``data.length_grouping`` or ``data.hard_negatives`` the
  rows a segment's batches take are first rearranged by :mod:`pretrain.data.batching` or
  :mod:`pretrain.data.hard_negatives`, a pure function of the same inputs and, with
  ``data.hard_negatives: previous_epoch``, of the embeddings file the run wrote at the end of the
  previous epoch: a stream then does not prefetch across an epoch boundary);
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
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_shards.manifest import Manifest, load_manifest
from data_shards.reader import BadSampleError, BadShardError, ShardReader
from pretrain.config import Config, ConfigError
from pretrain.data.batching import LengthGrouping
from pretrain.data.collate import BatchBuilder
from pretrain.data.hard_negatives import PREVIOUS_EPOCH, HardNegatives, PreviousEpochHardNegatives
from pretrain.data.sampling_plan import draw_once, keep_probabilities, kept_digest

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

    shuffled: list[np.ndarray]  # rank r's rows in shuffled order, each (N_r, 2)
    batches: int  # batches every rank runs in this segment
    tail: np.ndarray  # (T, 2) rows of the segment that no rank's row list holds (remainder leftovers)
    arrange: Callable[[np.ndarray], np.ndarray] | None = None  # rows -> the order batches take them
    _arranged: dict[int, np.ndarray] = field(default_factory=dict)

    def rows(self, rank: int) -> np.ndarray:
        """Rank ``rank``'s rows in the order its batches take them (arranged on first use), (N_r, 2)."""
        if self.arrange is None:
            return self.shuffled[rank]
        if rank not in self._arranged:
            self._arranged[rank] = self.arrange(self.shuffled[rank])
        return self._arranged[rank]

    def unconsumed(self, consumed: int, batch_size: int) -> np.ndarray:
        """Rows no batch delivered after ``consumed`` batches on every rank, (R, 2)."""
        b = min(consumed, self.batches) * batch_size
        # an arranger keeps the rows beyond the batches in place: the leftovers need no arranging
        rows = self.shuffled if consumed >= self.batches else [self.rows(r) for r in range(len(self.shuffled))]
        return np.concatenate([p[b:] for p in rows] + [self.tail])


# Each random stream's seed is [seed, purpose, ...] with one fixed length per purpose. numpy's
# SeedSequence pads its entropy with zeros, so keys that differ only by trailing zeros ([s, e] and
# [s, e, 0]) would give one and the same stream: the purpose word keeps the streams apart.
_SHARD_ORDER, _KEEP, _SHARE, _REMAP, _BATCH, _KEEP_ONCE, _ARRANGE = 1, 2, 3, 4, 5, 6, 7
KEPT_SET_KEY = "data.property_sampling kept set"  # digest of the once-drawn set in a checkpoint's data plan


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
        property_sampling_mode: str = "per_epoch",
        arranger: LengthGrouping | HardNegatives | PreviousEpochHardNegatives | None = None,
    ):
        """``arranger`` rearranges each rank's rows of a segment into batches (length grouping or
        hard negatives, from an export or from the run's previous epoch); None keeps the shuffled order."""
        self.manifest, self.world_size, self.rank = manifest, world_size, rank
        self.batch_size, self.seed, self.arranger = batch_size, seed, arranger
        self._keep_prob = [keep_probabilities(s) for s in manifest.shards] if property_sampling else None
        self._kept_once: list[np.ndarray] | None = None  # per shard (num_samples,) bool: the one draw
        if property_sampling and property_sampling_mode == "once":
            self._kept_once = draw_once(self._keep_prob, self._rng(_KEEP_ONCE))
        elif property_sampling_mode not in ("per_epoch", "once"):
            raise ConfigError(f"data.property_sampling_mode={property_sampling_mode!r}: expected 'per_epoch' or 'once'")
        self._cache: dict[tuple, _Segment] = {}

    def digests(self, epoch: int | None = None) -> dict:
        """Identities of what the plan drew or read beyond the recipe: the once-drawn kept set, the
        hard-negative embeddings; with ``epoch`` and ``data.hard_negatives=previous_epoch`` also the
        file that epoch's batches come from (:meth:`PreviousEpochHardNegatives.record`). A checkpoint
        records them (:func:`plan_record`)."""
        out = {}
        if self._kept_once is not None:
            out[KEPT_SET_KEY] = kept_digest(self._kept_once)
        if isinstance(self.arranger, HardNegatives):
            out[HardNegatives.DIGEST_KEY] = self.arranger.digest()
        if isinstance(self.arranger, PreviousEpochHardNegatives) and epoch is not None:
            out[PreviousEpochHardNegatives.RECORD_KEY] = self.arranger.record(epoch)
        return out

    @property
    def waits_at_epoch_end(self) -> bool:
        """Whether an epoch's batches need what the run writes at the end of the epoch before
        (``data.hard_negatives=previous_epoch``): a stream then does not prefetch across the boundary."""
        return isinstance(self.arranger, PreviousEpochHardNegatives)

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
        if self._kept_once is not None:  # ProtCLIP property-driven sampling, drawn once (ProtAnno-D)
            refs = refs[np.concatenate([self._kept_once[i] for i in dealt])]
        elif self._keep_prob is not None:  # ProtCLIP property-driven sampling, redrawn per epoch
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
        if self.arranger is not None:
            # The key names no rank: a rank rebuilds the other ranks' rows of earlier segments (elastic
            # resume) with its own plan, and ranks' batch i must come from one length quantile.
            k, nb = len(resized), seg.batches
            arranger = self.arranger
            rng = lambda w: self._rng(_ARRANGE, epoch, k, w)  # noqa: E731
            if isinstance(arranger, PreviousEpochHardNegatives):  # the epoch's file is looked up on first use
                seg.arrange = lambda rows: arranger.arrange_epoch(epoch, rows, B, nb, rng)
            else:
                seg.arrange = lambda rows: arranger.arrange(rows, B, nb, rng)
        if len(self._cache) > 16 or any(e != epoch for e, _, _ in self._cache):
            self._cache = {}  # keep one epoch: plans are cheap to rebuild
        self._cache[key] = seg
        return seg

    def batches_per_epoch(self, epoch: int, resized: tuple[tuple[int, int], ...] = ()) -> int:
        """Batches of the current segment of ``epoch`` (the whole epoch unless ``resized``)."""
        return self._segment(epoch, tuple(resized), self.world_size).batches

    def batch_refs(self, epoch: int, index: int, resized: tuple[tuple[int, int], ...] = ()) -> list[SampleRef]:
        seg = self._segment(epoch, tuple(resized), self.world_size)
        rows = seg.rows(self.rank)[index * self.batch_size : (index + 1) * self.batch_size]
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


def plan_for(
    cfg: Config, manifest: Manifest, world_size: int, rank: int, run_dir: str | Path | None = None
) -> EpochPlan:
    """The :class:`EpochPlan` a recipe asks for; ``run_dir`` holds the embeddings files of
    ``data.hard_negatives=previous_epoch`` (``RUN/hard_negatives``; without it the plan serves epoch 0 only)."""
    d = cfg.data
    arranger = None
    if d.length_grouping == "window":
        arranger = LengthGrouping(manifest, d.length_window, d.length_cache)
    elif d.hard_negatives == PREVIOUS_EPOCH:
        directory = None if run_dir is None else Path(run_dir) / "hard_negatives"
        arranger = PreviousEpochHardNegatives(
            manifest, directory, d.hard_negative_ratio, d.hard_negative_k, d.hard_negative_modality
        )
    elif d.hard_negatives is not None:
        arranger = HardNegatives(manifest, d.hard_negatives, d.hard_negative_ratio, d.hard_negative_k)
    return EpochPlan(
        manifest,
        world_size,
        rank,
        d.batch_size,
        cfg.train.seed,
        property_sampling=d.property_sampling,
        property_sampling_mode=d.property_sampling_mode,
        arranger=arranger,
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

    def close(self) -> None:
        """Close the shard readers opened so far."""
        for reader in self._readers.values():
            if reader is not None:
                reader.close()
        self._readers = {}


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
            if self._inflight and c.batch == 0 and not c.resized and self.plan.waits_at_epoch_end:
                return  # the next epoch's batches need the file the run writes when this epoch's are consumed
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
