"""Length-aware batching: batches of similar sequence lengths, so less of every batch is padding.

A collated batch is padded to its longest sequence (``pretrain.data.collate``): with real length
distributions a random batch is mostly padding. With ``data.length_grouping: window`` the plan
(:class:`pretrain.data.stream.EpochPlan`) rearranges each rank's shuffled rows of an epoch segment:

* the rows the segment's batches take (``batches * B``; the rows beyond wait for the next epoch as
  before) are cut into windows of ``data.length_window`` batches, in stream order;
* inside a window the rows are sorted by sequence length (stable: equal lengths keep their shuffled
  order) and cut into batches of B, so a batch holds neighbouring lengths;
* the window's batches are permuted with seed (seed, epoch, segment, window). The seed names no
  rank: every rank's window holds an independent random sample of the same length distribution, so
  batch i of every rank comes from the same length quantile and no rank waits long for the others.

The samples of an epoch, its leftovers and the random keys of its batches are those of the plain
plan; only which batch a sample lands in (and its step) changes. The arrangement is a pure function
of the plan's inputs, so a run resumed from a cursor (also on another number of ranks: the remainder
segments are arranged the same way) sees exactly the batches an uninterrupted run sees, and the Ray
and in-process loaders (which share the plan) stay identical.

Where the lengths come from (no sample is decoded):

* a shard's ``sample_props["length"]`` in the manifest when the build recorded it;
* otherwise the size of each sample's sequence member in the shard's tar index (the member is the
  plain ASCII sequence, see ``data_shards.schema.encode_record``; 0 for a sample without one). The
  index is built once per shard and cached as ``<data.length_cache>/<shard sha256>.npy`` (the
  shard's content checksum names it, so moved copies of a shard set reuse it). A shard that cannot
  be indexed is an error naming the shard.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_shards.manifest import Manifest, ShardInfo
from data_shards.reader import BadShardError, ShardReader
from data_shards.schema import SEQ_EXT
from pretrain.errors import ConfigError

log = logging.getLogger(__name__)

LENGTH_PROP = "length"  # manifest sample_props key read before any shard is indexed
SEQ_PAD_INDEX = 1  # ESM alphabet padding_idx (esm.Alphabet.from_architecture("ESM-1b").padding_idx)


def padding_fraction(batch: dict, pad_index: int = SEQ_PAD_INDEX) -> float:
    """Share of the sequence-token positions of a collated batch that are padding.

    Args:
        batch: a batch of :class:`pretrain.data.collate.BatchBuilder` (``seq_tokens`` (B, Ls)).
        pad_index: the alphabet's padding id (ESM: 1).

    Returns:
        padded positions / (B * Ls), in [0, 1); BOS and EOS count as tokens, not padding.
    """
    tokens = batch["seq_tokens"]  # (B, Ls)
    if tokens.numel() == 0:
        return 0.0
    return float((tokens == pad_index).sum().item() / tokens.numel())


def _index_lengths(shard: ShardInfo) -> np.ndarray:
    """Sequence length of each sample of ``shard`` from its tar index (sizes of the sequence members)."""
    try:
        reader = ShardReader(shard.path)
    except BadShardError as e:
        raise ConfigError(f"data.length_grouping: cannot index {shard.path} for sample lengths: {e.reason}") from None
    try:
        # The reader's index holds (offset, size) of every member without reading any data; the sequence
        # member is the bare ASCII sequence, so its size is the length.
        samples = reader._samples
        if len(samples) != shard.num_samples:
            raise ConfigError(
                f"data.length_grouping: {shard.path} holds {len(samples)} samples, "
                f"its manifest says {shard.num_samples}"
            )
        return np.array([s.members.get(SEQ_EXT, (0, 0))[1] for s in samples], dtype=np.int64)
    finally:
        reader.close()


def _cached_lengths(shard: ShardInfo, cache: Path) -> np.ndarray:
    path = cache / f"{shard.sha256}.npy"
    if path.is_file():
        try:
            lengths = np.load(path, allow_pickle=False)
            if lengths.shape == (shard.num_samples,) and lengths.dtype.kind in "iu" and (lengths >= 0).all():
                return lengths.astype(np.int64)
            log.warning("length index %s does not fit %s (shape %s): rebuilding it", path, shard.name, lengths.shape)
        except (OSError, ValueError) as e:
            log.warning("length index %s unreadable (%s): rebuilding it", path, e)
    lengths = _index_lengths(shard)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{shard.sha256}.{os.getpid()}.tmp.npy"
        np.save(tmp, lengths.astype(np.int32), allow_pickle=False)
        os.replace(tmp, path)  # atomic: ranks indexing the same shard at once each write a whole file
    except OSError as e:  # a read-only cache costs a re-index next launch, nothing else
        log.warning("cannot write the length index %s (%s); it will be rebuilt next time", path, e)
    return lengths


def sample_lengths(manifest: Manifest, cache_dir: str | Path) -> list[np.ndarray]:
    """Sequence length of every sample, one (num_samples,) int64 array per shard in manifest order.

    Reads ``sample_props["length"]`` when the manifest has it, else the cached or freshly built
    index (module docstring).

    Raises:
        ConfigError: a shard cannot be indexed, or its lengths do not match the manifest.
    """
    cache = Path(cache_dir).expanduser()
    out = []
    for shard in manifest.shards:
        props = (shard.sample_props or {}).get(LENGTH_PROP)
        if props is not None and all(isinstance(v, int) and v >= 0 for v in props):
            out.append(np.asarray(props, dtype=np.int64))
        else:
            out.append(_cached_lengths(shard, cache))
    return out


class LengthGrouping:
    """Sorts windows of a rank's rows by length (module docstring); lengths are loaded on first use."""

    def __init__(self, manifest: Manifest, window: int, cache_dir: str | Path = "", lengths: list[np.ndarray] = None):
        if window < 1:
            raise ConfigError(f"data.length_window={window}: must be >= 1")
        self.manifest, self.window, self.cache_dir = manifest, window, cache_dir
        self._lengths = lengths

    def check(self) -> None:
        """Load (build and cache when needed) the lengths now; ConfigError on an unreadable shard."""
        self.lengths_of(np.zeros((0, 2), dtype=np.int64))

    def lengths_of(self, rows: np.ndarray) -> np.ndarray:
        """Sequence lengths of rows (shard index, sample index), (n, 2) -> (n,)."""
        if self._lengths is None:
            self._lengths = sample_lengths(self.manifest, self.cache_dir)
        flat = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.cumsum([0] + [len(x) for x in self._lengths])
        return flat[offsets[rows[:, 0]] + rows[:, 1]]

    def arrange(
        self, rows: np.ndarray, batch_size: int, batches: int, rng: Callable[[int], np.random.Generator]
    ) -> np.ndarray:
        """Rows in the order the rank's batches take them after grouping.

        Args:
            rows: (n, 2) the rank's rows in shuffled stream order; n >= batches * batch_size.
            batches: batches the rank runs; rows beyond ``batches * batch_size`` keep their place.
            rng: window index -> generator permuting that window's batches (the same on every rank).

        Returns:
            (n, 2) the same rows: each window sorted by length, cut into batches, batches permuted.
        """
        B, W = batch_size, self.window
        head = rows[: batches * B]
        lengths = self.lengths_of(head)  # (batches * B,)
        parts = []
        for w, first in enumerate(range(0, batches, W)):
            nb = min(W, batches - first)
            span = slice(first * B, (first + nb) * B)
            order = np.argsort(lengths[span], kind="stable")
            window = head[span][order].reshape(nb, B, 2)  # (batch, row, 2), lengths ascending
            parts.append(window[rng(w).permutation(nb)].reshape(-1, 2))
        return np.concatenate([*parts, rows[batches * B :]]) if parts else rows
