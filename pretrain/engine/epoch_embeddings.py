"""The run's own embeddings of its train shards at each epoch end, for ``data.hard_negatives: previous_epoch``.

At the end of epoch e (after its last batch's step, before epoch e + 1's first batch and before the
checkpoint of that step) every rank takes part in one pass over the train manifest with the current
weights (eval mode, no gradients; under ZeRO-3 each forward gathers the partitions, so no rank may
skip one): the manifest's rows are cut into chunks of ``eval.batch_size`` rows in manifest order,
built exactly as :func:`pretrain.data.stream.iter_eval_batches` builds them, and chunk c is embedded
by rank ``c % world`` (round j: chunks ``j * world .. j * world + world - 1``; a rank without a chunk in
the last round repeats chunk 0 and drops it). Each round's embeddings are all-gathered, so every rank
holds the same (N, E) float32 array in manifest row order (zero rows where a protein lacks
``data.hard_negative_modality``). The chunks do not depend on the number of ranks, so the file is a
function of the weights alone. One process per node (``LOCAL_RANK`` 0, as for checkpoint uploads)
writes it atomically to ``RUN/hard_negatives/epoch<e>.npy`` (``allow_pickle=False``); the others wait
on a barrier. Epoch e + 1's plan then reads it (:class:`pretrain.data.hard_negatives.PreviousEpochHardNegatives`).

Files kept: the current epoch's and the one before it (the checkpoints of the previous epoch, still
retained, need it to resume); older ones are deleted at each epoch end, and on resume the files of
the epochs from the cursor's on (written by a run that got further than its last checkpoint) are
deleted before anything reads them.

Resume (:meth:`EpochEmbeddings.resume`): the checkpoint records which file its epoch's batches come
from and its digest (:func:`pretrain.data.plan_checks.plan_record`). Inside an epoch the file must be there
with that digest, else the resume is refused naming it (its weights are not those of the epoch end,
so it cannot be recomputed). At an epoch's first batch (the checkpoint's weights are those of the
previous epoch's end) a missing or different file is recomputed. The pass costs about one forward
of all three encoders over the train set (the training forward, the one ZeRO-3 gathers for).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from pretrain.config import Config, ConfigError
from pretrain.data.collate import batch_to_device
from pretrain.data.hard_negatives import (
    EPOCH_DIR,
    PREVIOUS_EPOCH,
    PreviousEpochHardNegatives,
    epoch_file,
    file_digest,
)
from pretrain.data.stream import BatchSource, Cursor, EpochPlan
from pretrain.engine.collectives import all_gather_rows, all_reduce_numbers, barrier, node_leader, rank_and_world
from pretrain.engine.precision import forward_autocast, resolve_precision

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_manifest(
    model: torch.nn.Module, cfg: Config, plan: EpochPlan, modality: str, device: torch.device, batch_size: int
) -> np.ndarray:
    """Embed every protein of the plan's manifest in ``modality`` (collective: call on every rank).

    Args:
        model: the DeepSpeed engine (or the module), called like in training: ``model(batch)``; its
            train / eval mode is restored on return.
        plan: the run's plan (its manifest, in row order).
        modality: "sequence", "structure" or "text".
        batch_size: rows per chunk (``eval.batch_size``).

    Returns:
        (N, E) float32, the same on every rank; rows of proteins without the modality (or unreadable)
        are zeros.
    """
    rank, world = rank_and_world()
    shards = plan.manifest.shards
    refs = [(str(s.path), i) for s in shards for i in range(s.num_samples)]
    n = len(refs)
    chunks = math.ceil(n / batch_size)
    source = BatchSource(cfg, views=None, train=False)
    dtype = resolve_precision(cfg.train.precision, device)
    out: np.ndarray | None = None
    was_training = model.training
    model.eval()
    try:
        for j in range(math.ceil(chunks / world)):
            mine = j * world + rank
            c = mine if mine < chunks else 0  # the last round: a rank without a chunk repeats chunk 0 (dropped)
            start = c * batch_size
            batch, _bad = source.build(refs[start : start + batch_size], [cfg.train.seed, start])  # iter_eval_batches
            with forward_autocast(dtype, device):
                emb = model(batch_to_device(batch, device))[modality]  # (b, E)
            mask = batch["present"][modality].to(emb.device)  # (b,)
            e = emb.float() * mask[:, None]
            padded = torch.zeros(batch_size, e.shape[1], dtype=torch.float32, device=e.device)
            padded[: len(e)] = e
            gathered = all_gather_rows(padded)  # (world, batch_size, E)
            if out is None:
                out = np.zeros((n, e.shape[1]), dtype=np.float32)
            for r in range(world):
                cr = j * world + r
                if cr < chunks:
                    rows = min(batch_size, n - cr * batch_size)
                    out[cr * batch_size : cr * batch_size + rows] = gathered[r, :rows].numpy()
    finally:
        model.train(was_training)
        source.close()
    return out if out is not None else np.zeros((0, 0), np.float32)


class EpochEmbeddings:
    """The trainer's side of ``data.hard_negatives: previous_epoch`` (module docstring); inert otherwise."""

    def __init__(self, cfg: Config, run_dir: Path, plan: EpochPlan, device: torch.device):
        self.cfg, self.plan, self.device = cfg, plan, device
        self.enabled = cfg.data.hard_negatives == PREVIOUS_EPOCH
        self.directory = Path(run_dir) / EPOCH_DIR
        self.modality = cfg.data.hard_negative_modality

    def after_step(self, model: torch.nn.Module, cursor: Cursor, skip: bool = False) -> Path | None:
        """After a step whose cursor ``cursor`` starts an epoch (its batch 0: the step consumed the last
        batch of the epoch before), write that epoch's embeddings (collective). ``skip``: the run stops
        after this step (last step, preemption); a resume from its checkpoint recomputes them."""
        if not self.enabled or cursor.batch != 0 or cursor.resized or cursor.epoch == 0:
            return None
        if skip:
            log.info("epoch %d ended with the run: its embeddings are computed on resume", cursor.epoch - 1)
            return None
        return self.write(model, cursor.epoch - 1)

    def write(self, model: torch.nn.Module, epoch: int) -> Path:
        """Embed the train manifest with ``model``'s weights and write ``epoch_file(RUN/hard_negatives, epoch)``
        (collective); delete the files older than ``epoch - 1``. Returns the file."""
        bs = self.cfg.eval.batch_size
        emb = embed_manifest(model, self.cfg, self.plan, self.modality, self.device, bs)  # (N, E)
        path = epoch_file(self.directory, epoch)
        rank, _ = rank_and_world()
        if node_leader():
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{rank}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, emb, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._delete(lambda k: k < epoch - 1)
        barrier()
        log.info("epoch %d: %s embeddings of %d proteins written to %s", epoch, self.modality, len(emb), path)
        return path

    def _delete(self, which) -> None:
        for f in self.directory.glob("epoch*.npy"):
            k = f.stem.removeprefix("epoch")
            if k.isdigit() and which(int(k)):
                f.unlink(missing_ok=True)

    def resume(self, model: torch.nn.Module, saved_plan: dict | None, cursor: Cursor, where: str) -> None:
        """Check (or recompute) the file the resumed epoch's batches come from (collective).

        Args:
            saved_plan: the checkpoint's data plan record (:func:`pretrain.data.plan_checks.plan_record`).
            cursor: this rank's resumed cursor (the same epoch on every rank).
            where: the checkpoint, for messages.

        Raises:
            ConfigError: inside an epoch, the file is missing or is not the one the checkpoint's batches
                came from (the message names it).
        """
        if not self.enabled:
            return
        e = cursor.epoch
        if node_leader() and self.directory.is_dir():
            self._delete(lambda k: k >= e)  # written past this checkpoint: rewritten before use
        barrier()
        if e == 0:
            return
        path = epoch_file(self.directory, e - 1)
        record = (saved_plan or {}).get(PreviousEpochHardNegatives.RECORD_KEY) or {}
        recorded = record.get("digest")
        found = file_digest(path) if path.is_file() else None
        at_epoch_start = cursor.batch == 0 and not cursor.resized  # the weights of epoch e - 1's end
        if at_epoch_start:
            stale = found is None or recorded is None or found != recorded
            if all_reduce_numbers([int(stale)], op="max", dtype=torch.long)[0]:
                new = file_digest(self.write(model, e - 1))
                if recorded is not None and new != recorded:
                    log.warning(
                        "%s: recomputed %s has digest %s, the checkpoint recorded %s (other hardware or kernels): "
                        "epoch %d's batches may differ from the original run's",
                        where,
                        path,
                        new,
                        recorded,
                        e,
                    )
            return
        problem = None
        if found is None:
            problem = "is missing"
        elif recorded is not None and found != recorded:
            problem = f"has digest {found}, not {recorded}"
        if all_reduce_numbers([int(problem is not None)], op="max", dtype=torch.long)[0]:
            raise ConfigError(
                f"{where}: data.hard_negatives={PREVIOUS_EPOCH}: {path} "
                f"{problem or 'is missing or different on another rank'}; epoch {e}'s batches up to this "
                f"checkpoint (batch {cursor.batch}) were composed from the file with digest {recorded}, and the "
                f"checkpoint's weights are not those of epoch {e - 1}'s end, so it cannot be recomputed. "
                "Restore the file (copy RUN/hard_negatives from the machine that wrote it) or use a new --run-dir"
            )
