"""Hard-negative batches: each batch holds one protein with its nearest neighbours, plus random proteins.

In-batch negatives drawn at random are mostly easy (Align-Pro names this as its limitation). With
``data.hard_negatives: <embeddings .npy>`` the plan (:class:`pretrain.data.stream.EpochPlan`)
rearranges each rank's shuffled rows of an epoch segment into batches like this:

* ``h = round(data.hard_negative_ratio * B)`` rows of every batch are a *hard group*: the first row
  of the shuffled stream no batch took yet (the seed), then its nearest neighbours (cosine
  similarity of the embeddings) among the rank's rows of the segment that no batch took yet, nearest
  first, from a table of ``data.hard_negative_k`` exact neighbours per row; when fewer are left the
  group is completed like the random part;
* the other ``B - h`` rows are the next untaken rows of the shuffled stream (random proteins).

Only the rows the segment's batches take (``batches * B``) are rearranged; the rows beyond wait for
the next epoch as in the plain plan. The arrangement needs no random numbers beyond the plan's
shuffle, so it is a pure function of (seed, epoch, world size, rank, cursor history): a run resumed
from a cursor, also on another number of ranks, sees the batches an uninterrupted run sees, and the
Ray and in-process loaders (which share the plan) stay identical. Each rank searches neighbours in
its own share only (its segment's rows), which keeps the search at ``(N / world)^2`` per epoch.

Neighbours: exact search over the unit-normalised embeddings. Float32 inner products (torch, or an
exact ``faiss`` ``IndexFlatIP`` when faiss is installed) propose k + 16 candidates per row; these are
ranked by their float64 similarity rounded to 1e-9, ties to the lower row, so neither the backend nor
BLAS blocking or thread counts can change an order. Rows whose embedding is all zeros (the export's
rows of proteins without that modality) neither have nor are neighbours. The cost is one (n, n)
similarity pass per rank and epoch segment (blocked; n = rows of the rank's share), paid when the
segment's first batch is asked for.

The embeddings file is what ``pretrain.eval.export_embeddings`` writes for one modality over
``data.train_shards`` (``<modality>.npy``, float (N, E), rows in manifest order); it is loaded
memory-mapped without pickle, and its content digest is recorded in the checkpoint so that a resume
with other embeddings is refused. False-negative masking (``loss.false_negatives``) still applies to
the composed batches: it works on the batch, whoever composed it.

``data.hard_negatives: previous_epoch`` (:class:`PreviousEpochHardNegatives`) takes the embeddings
from the run itself: at the end of epoch e the trainer embeds the train shards' proteins in
``data.hard_negative_modality`` with the current weights and writes ``RUN/hard_negatives/epoch<e>.npy``
(:mod:`pretrain.engine.epoch_embeddings`); epoch e + 1's batches are composed from that file exactly
as from an export. Epoch 0 has no previous pass: its batches are the plain shuffled plan. A stream
does not prefetch across an epoch boundary in this mode (the next epoch's batches wait for the file).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data_shards.manifest import Manifest
from pretrain.errors import ConfigError

log = logging.getLogger(__name__)

PREVIOUS_EPOCH = "previous_epoch"  # data.hard_negatives value: the run's own embeddings of the previous epoch
EPOCH_DIR = "hard_negatives"  # RUN/<EPOCH_DIR>/epoch<e>.npy: those embeddings (also under train.remote_dir)
_BLOCK = 256  # query rows at once: a (block, n) float32 similarity block, (block, k + 16, E) float64 candidates


def _normalised(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, E) float64 unit rows (zero rows stay zero) and the (n,) mask of non-zero rows."""
    x = np.asarray(emb, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1)  # (n,)
    present = norm > 0
    x[present] /= norm[present, None]
    return x, present


def _rank(sims: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best candidates of each row: highest rounded similarity first, then lowest index.

    sims, candidates: (m, c) -> (m, k) candidate indices (-1 where fewer than k are valid).
    """
    sims = np.round(sims, 9)
    order = np.lexsort((candidates, -sims), axis=1)[:, :k]  # last key primary: -sims, then index
    best = np.take_along_axis(candidates, order, axis=1)
    valid = np.isfinite(np.take_along_axis(sims, order, axis=1))
    return np.where(valid, best, -1)


def nearest_neighbours(emb: np.ndarray, k: int, backend: str = "auto") -> np.ndarray:
    """Exact k nearest neighbours by cosine similarity, self and all-zero rows excluded.

    Candidates (k + 16 per row) come from float32 inner products (torch, or faiss ``IndexFlatIP``);
    they are then ranked by their float64 similarity rounded to 1e-9, ties to the lower row, so the
    result does not depend on the backend, BLAS blocking or thread counts.

    Args:
        emb: (n, E) embeddings.
        k: neighbours per row.
        backend: "torch", "faiss", or "auto" (faiss when importable, else torch).

    Returns:
        (n, k) int64 row indices, nearest first; -1 pads rows with fewer than k valid neighbours
        (and every row of an all-zero embedding).
    """
    x, present = _normalised(emb)
    n = len(x)
    k = min(k, max(n - 1, 0))
    out = np.full((n, k), -1, dtype=np.int64)
    if k == 0 or not present.any():
        return out
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"nearest_neighbours backend {backend!r}: expected 'auto', 'torch' or 'faiss'")
    faiss = None
    if backend in ("auto", "faiss"):
        try:
            import faiss
        except ImportError:
            if backend == "faiss":
                raise
    idx = np.flatnonzero(present)  # neighbours are searched among these rows only
    base = x[idx]  # (m, E) float64
    base32 = np.ascontiguousarray(base, dtype=np.float32)
    wide = min(len(idx), k + 16)  # a margin for float32 near-ties, ranked exactly below
    if faiss is not None:
        index = faiss.IndexFlatIP(base32.shape[1])
        index.add(base32)

        def propose(q: np.ndarray) -> np.ndarray:
            return index.search(q, wide)[1]  # (b, wide) positions in idx, -1 when fewer

    else:
        keys = torch.from_numpy(base32)

        def propose(q: np.ndarray) -> np.ndarray:
            return torch.topk(torch.from_numpy(q) @ keys.T, wide, dim=1).indices.numpy()  # (b, wide)

    for start in range(0, len(idx), _BLOCK):
        stop = min(start + _BLOCK, len(idx))
        found = propose(base32[start:stop]).astype(np.int64)  # (b, wide)
        safe = np.maximum(found, 0)
        sims = np.einsum("be,bwe->bw", base[start:stop], base[safe])  # (b, wide) float64
        sims[(found < 0) | (found == np.arange(start, stop)[:, None])] = -np.inf  # not its own neighbour
        out[idx[start:stop]] = _rank(sims, np.where(found >= 0, idx[safe], -1), k)
    return out


def file_digest(path: str | Path) -> str:
    """Content identity of a file: sha256 of its bytes, 16 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class HardNegatives:
    """Composes a rank's batches from neighbour groups and random rows (module docstring)."""

    DIGEST_KEY = "data.hard_negatives content"  # key of :meth:`digest` in a checkpoint's data plan

    def __init__(self, manifest: Manifest, path: str | Path, ratio: float, k: int, backend: str = "auto"):
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"data.hard_negative_ratio={ratio}: expected a value in [0, 1]")
        if k < 1:
            raise ConfigError(f"data.hard_negative_k={k}: must be >= 1")
        self.manifest, self.path, self.ratio, self.k, self.backend = manifest, Path(path), ratio, k, backend
        self._emb: np.ndarray | None = None
        self._digest: str | None = None
        self._offsets = np.cumsum([0] + [s.num_samples for s in manifest.shards])

    def embeddings(self) -> np.ndarray:
        """The (N, E) embeddings, memory-mapped, checked against the manifest on first use.

        Raises:
            ConfigError: the file is missing, not a 2-D float array, has another number of rows than
                the shard set has samples, or holds non-finite values.
        """
        if self._emb is None:
            where = f"data.hard_negatives={self.path}"
            if not self.path.is_file():
                raise ConfigError(f"{where}: file not found (an export's <modality>.npy over data.train_shards)")
            try:
                emb = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{where}: not a readable .npy array ({e})") from None
            if emb.ndim != 2 or emb.dtype.kind != "f":
                raise ConfigError(f"{where}: expected a float (N, E) array, got {emb.dtype} {emb.shape}")
            if emb.shape[0] != self.manifest.num_samples:
                raise ConfigError(
                    f"{where}: {emb.shape[0]} rows, but {self.manifest.root} holds {self.manifest.num_samples} "
                    "samples (export the embeddings of data.train_shards without --max-samples)"
                )
            for start in range(0, len(emb), 65536):
                if not np.isfinite(emb[start : start + 65536]).all():
                    raise ConfigError(f"{where}: non-finite values in rows {start}..{start + 65535}")
            self._emb = emb
        return self._emb

    def check(self) -> None:
        """Load and check the embeddings file now (:meth:`embeddings`)."""
        self.embeddings()

    def digest(self) -> str:
        """Content identity of the embeddings file (sha256 of its bytes, 16 hex digits)."""
        if self._digest is None:
            self.embeddings()  # a bad file fails here with its message
            self._digest = file_digest(self.path)
        return self._digest

    def group_size(self, batch_size: int) -> int:
        """Rows of each batch that form the hard group (the seed included)."""
        return min(batch_size, int(round(self.ratio * batch_size)))

    def arrange(
        self, rows: np.ndarray, batch_size: int, batches: int, rng: Callable[[int], np.random.Generator] | None = None
    ) -> np.ndarray:
        """Rows in the order the rank's batches take them: per batch a hard group, then random rows.

        Args:
            rows: (n, 2) the rank's rows (shard index, sample index) in shuffled stream order.
            batches: batches the rank runs; rows beyond ``batches * batch_size`` keep their place.
            rng: unused (the shuffle already made the random part); the signature of every arranger.

        Returns:
            (n, 2) the same rows, rearranged.
        """
        B, h = batch_size, self.group_size(batch_size)
        n = batches * B
        if h < 2 or n == 0:
            return rows  # a group of one is a random row
        head = rows[:n]
        emb = self.embeddings()[self._offsets[head[:, 0]] + head[:, 1]]  # (n, E), memory-mapped gather
        knn = nearest_neighbours(emb, self.k, self.backend)  # (n, k) positions in head
        order = _compose(knn, B, h, batches)
        return np.concatenate([head[order], rows[n:]])


def _compose(knn: np.ndarray, B: int, h: int, batches: int) -> np.ndarray:
    """The order of ``batches * B`` rows: per batch the first untaken row, up to h - 1 of its untaken
    neighbours, then untaken rows in stream order up to B. knn: (n, k) -> (batches * B,) positions."""
    n = batches * B
    taken = np.zeros(len(knn), dtype=bool)
    order = np.empty(n, dtype=np.int64)
    nxt, pos = 0, 0  # next stream position that may be untaken; write position in order

    def next_untaken() -> int:
        nonlocal nxt
        while taken[nxt]:
            nxt += 1
        return nxt

    for _ in range(batches):
        seed = next_untaken()
        taken[seed] = True
        group = [seed]
        for j in knn[seed]:
            if len(group) == h or j < 0:
                break
            if not taken[j]:
                taken[j] = True
                group.append(int(j))
        while len(group) < B:
            j = next_untaken()
            taken[j] = True
            group.append(j)
        order[pos : pos + B] = group
        pos += B
    return order


def epoch_file(directory: str | Path, epoch: int) -> Path:
    """The embeddings the run wrote at the end of ``epoch``: ``<directory>/epoch<epoch>.npy``."""
    return Path(directory) / f"epoch{epoch}.npy"


class PreviousEpochHardNegatives:
    """``data.hard_negatives: previous_epoch``: epoch e >= 1 composes its batches like
    :class:`HardNegatives` from ``epoch_file(directory, e - 1)``; epoch 0 keeps the shuffled order.

    ``directory`` is ``RUN/hard_negatives`` (None in a plan built before any run directory exists,
    e.g. the launcher's early checks: such a plan can only serve epoch 0).
    """

    RECORD_KEY = "data.hard_negatives previous epoch"  # key of :meth:`record` in a checkpoint's data plan

    def __init__(
        self,
        manifest: Manifest,
        directory: str | Path | None,
        ratio: float,
        k: int,
        modality: str,
        backend: str = "auto",
    ):
        HardNegatives(manifest, "", ratio, k)  # the same checks of ratio and k
        self.manifest, self.ratio, self.k, self.modality, self.backend = manifest, ratio, k, modality, backend
        self.directory = None if directory is None else Path(directory)
        self._current: tuple[tuple, HardNegatives] | None = None  # (epoch, file stat) -> its arranger
        self._said_epoch0 = False

    def source(self, epoch: int) -> Path | None:
        """The file epoch ``epoch``'s batches are composed from; None for epoch 0."""
        if epoch == 0:
            return None
        if self.directory is None:
            raise ConfigError(
                f"data.hard_negatives={PREVIOUS_EPOCH}: epoch {epoch} needs the run's embeddings of epoch "
                f"{epoch - 1}, but this plan has no run directory"
            )
        return epoch_file(self.directory, epoch - 1)

    def for_epoch(self, epoch: int) -> HardNegatives | None:
        """The :class:`HardNegatives` of epoch ``epoch`` (None for epoch 0); a rewritten file gets a new one.

        Raises:
            ConfigError: the file is missing (named in the message) or bad (:meth:`HardNegatives.embeddings`).
        """
        path = self.source(epoch)
        if path is None:
            return None
        if not path.is_file():
            raise ConfigError(
                f"data.hard_negatives={PREVIOUS_EPOCH}: {path} not found: epoch {epoch}'s batches are composed "
                f"from the {self.modality} embeddings the trainer writes there at the end of epoch {epoch - 1}"
            )
        st = path.stat()
        key = (epoch, st.st_mtime_ns, st.st_size, st.st_ino)
        if self._current is None or self._current[0] != key:
            self._current = (key, HardNegatives(self.manifest, path, self.ratio, self.k, self.backend))
        return self._current[1]

    def arrange_epoch(
        self,
        epoch: int,
        rows: np.ndarray,
        batch_size: int,
        batches: int,
        rng: Callable[[int], np.random.Generator] | None = None,
    ) -> np.ndarray:
        """:meth:`HardNegatives.arrange` with the embeddings of epoch ``epoch - 1``; epoch 0: ``rows`` as they are.

        rows: (n, 2) the rank's rows in shuffled order -> (n, 2) rearranged.
        """
        arranger = self.for_epoch(epoch)
        if arranger is None:
            if not self._said_epoch0:
                log.info("data.hard_negatives=%s: epoch 0 has no previous pass; its batches are random", PREVIOUS_EPOCH)
                self._said_epoch0 = True
            return rows
        return arranger.arrange(rows, batch_size, batches, rng)

    def record(self, epoch: int) -> dict | None:
        """What a checkpoint taken in epoch ``epoch`` records: ``{"file": name, "digest": 16 hex or None}``
        of the file the epoch's batches come from (digest None: not written yet, the run stopped at
        the end of the previous epoch); None for epoch 0."""
        path = self.source(epoch) if epoch > 0 else None
        if path is None:
            return None
        digest = self.for_epoch(epoch).digest() if path.is_file() else None
        return {"file": path.name, "digest": digest}

    def check(self) -> None:
        """Nothing to read before the run: the files are written by the run itself."""
