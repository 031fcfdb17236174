"""The training loop on a DeepSpeed engine: steps, logging, checkpoints, stopping on faults.

The two-stage schedule (encoder freezing, per-group learning rates) is :mod:`pretrain.engine.schedule`;
the loss is the run's objective (:mod:`pretrain.losses.objective`), called the same way for every
objective, in the one-pass step here and in the two-pass step (:mod:`pretrain.engine.two_pass`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from data_shards.manifest import load_manifest
from pretrain.config import Config
from pretrain.data.batching import padding_fraction
from pretrain.data.collate import batch_to_device
from pretrain.data.plan_checks import check_resumable_plan, plan_record
from pretrain.data.stream import Cursor, local_stream, plan_for
from pretrain.engine import best_checkpoint, checkpoint, checkpoint_store, checkpoint_universal
from pretrain.engine.builder import build_model
from pretrain.engine.collectives import all_reduce_numbers
from pretrain.engine.epoch_embeddings import EpochEmbeddings
from pretrain.engine.export import export_engine
from pretrain.engine.logging_backends import MetricsLogger
from pretrain.engine.precision import embeddings_to_fp32, forward_autocast, resolve_precision
from pretrain.engine.run_files import RECORD_ENV, append_bad_samples, maybe_inject_fault, truncate_jsonl
from pretrain.engine.schedule import (
    apply_freezing,
    frozen_encoders,
    reset_encoder_optimizer_state,
    seed_everything,
    set_group_lrs,
)
from pretrain.engine.step_guards import bad_ratio_stop_reason, nonfinite_stop_reason
from pretrain.engine.step_timing import StepTimer, TimedObjective
from pretrain.engine.two_pass import two_pass_step, weights_give_finite_loss
from pretrain.errors import RunStopped
from pretrain.losses.objective import detach_terms
from pretrain.losses.registry import build_objective
from pretrain.models.trimodal import NO_DECAY

log = logging.getLogger(__name__)


class Trainer:
    """One rank's view of a run: ``setup``, then ``train`` until ``train.max_steps``, ``close``."""

    def __init__(
        self,
        cfg: Config,
        ds_config: dict,
        run_dir: Path,
        validator: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    ):
        """Args:
        cfg: the run's full recipe.
        ds_config: the resolved DeepSpeed config.
        run_dir: the run directory (checkpoints, metrics, export).
        validator: ``model -> metrics`` run every ``train.validate_every`` steps on every rank (the
            forward gathers ZeRO-3 partitions), e.g. :func:`pretrain.eval.validation.validator_for`;
            it must report ``val/mean_R@10`` (or ``val/mean_R@<last eval.ks>``), the default selection
            metric (:func:`pretrain.engine.best_checkpoint.selection`) pinned in RUN/best_checkpoint.json.
            Given by the run layer: the engine does not import evaluation.
        """
        if cfg.train.validate_every and validator is None:
            raise ValueError("train.validate_every > 0 needs a validator (pretrain.eval.validation.validator_for)")
        self.cfg, self.ds_config, self.run_dir = cfg, ds_config, Path(run_dir)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if torch.cuda.is_available()
            else (torch.device("cpu"))
        )
        self.step = 0
        self.stage = 1 if cfg.train.stage1_steps > 0 else 2
        self.cursor = Cursor()
        self.bad_samples = 0
        self.samples_seen = 0
        self.nonfinite_steps = 0  # steps whose update was skipped (non-finite loss or gradients)
        self._nonfinite_run = 0  # consecutive such steps up to now
        self._failed_saves = 0  # consecutive checkpoint saves that failed
        self._saved_step = -1  # step of the last checkpoint this process wrote
        self._unreadable_shards: set[str] = set()  # logged once each
        self._zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.stream = None
        self._ray_role = "none"  # "started" / "joined" / "external" (see connect_ray)
        self._stop_requested = False
        self.preempted = False
        self.objective = build_objective(cfg.loss)  # pretrain.losses.objective: one call for every objective
        self.validator = validator
        self.timer = StepTimer(self.device)  # time split per step (pretrain.engine.step_timing); FLOPs in setup

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed

        seed_everything(self.cfg.train.seed)
        model = build_model(self.cfg, objective=self.objective)
        groups = model.parameter_groups()
        param_groups = [
            {"params": ps, "name": name, **({"weight_decay": 0.0} if name.endswith(NO_DECAY) else {})}
            for name, ps in groups.items()
        ]
        # Resuming on another number of ranks goes through a DeepSpeed universal checkpoint, which
        # the engine must be configured for when it is built (see checkpoint.load).
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the collectives below run over NCCL before DeepSpeed's
        # Several nodes must share RUN, or publish checkpoints to remote_dir: else none could resume.
        checkpoint.require_shared_run_dir(self.run_dir, self.cfg.train.remote_dir)
        if self.cfg.train.remote_dir:
            # Fetched first (collective): a fresh machine has nothing local to read the world size from.
            checkpoint_store.fetch(self.ckpt_dir, self.cfg.train.remote_dir, self.run_dir)
        ds_config = checkpoint_universal.engine_config(self.ds_config, self.ckpt_dir, self.world_size)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config)
        self.timer = StepTimer.for_model(model, self.device, self.cfg.train.precision)
        self.model = model
        self.epoch_embeddings = EpochEmbeddings(self.cfg, self.run_dir, self._plan, self.device)
        resumed = checkpoint.load(self.engine, self.ckpt_dir)
        if resumed is not None:
            client, rank_state = resumed
            self.step, self.stage = int(client["step"]), int(client["stage"])
            self.samples_seen, self.bad_samples = int(client["samples_seen"]), int(client["bad_samples"])
            self.nonfinite_steps = int(client.get("nonfinite_steps", 0))
            where = f"{self.ckpt_dir} (step {self.step})"
            check_resumable_plan(client.get("data_plan"), self.cfg, where, manifest=self._plan.manifest)
            self.cursor = self._resume_cursor(client, rank_state)
            self.epoch_embeddings.resume(self.engine, client.get("data_plan"), self.cursor, where)
            checkpoint.set_rng_state(rank_state["rng"])
            self._truncate_metrics(self.step)
            old = int(client.get("world_size", self.world_size))
            resized = f", {old} -> {self.world_size} ranks" if old != self.world_size else ""
            self._print(f"resumed from step {self.step} (stage {self.stage}, epoch {self.cursor.epoch}{resized})")
        else:  # starting over (e.g. an attempt killed before its first checkpoint): its lines are not this run's
            self._truncate_metrics(0)
        self._apply_stage()
        self._open_stream()
        t = self.cfg.train
        self.logger = MetricsLogger(
            self.run_dir,
            rank=self.rank,
            tensorboard=t.tensorboard,
            wandb=t.wandb,
            wandb_project=t.wandb_project,
            config=self.cfg.to_dict(),
            resume_step=self.step if resumed is not None else None,
        )
        if threading.current_thread() is threading.main_thread():
            # (Ray Train runs the loop in a worker thread; Ray handles preemption there.)
            signal.signal(signal.SIGTERM, self._on_sigterm)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def _resume_cursor(self, client: dict, rank_state: dict) -> Cursor:
        """This rank's data cursor after a resume; remapped when the number of ranks changed
        (rule: ``pretrain/data/stream.py``)."""
        old_world = int(client.get("world_size", self.world_size))
        if old_world == self.world_size:
            return Cursor.from_dict(rank_state["cursor"])
        return self._plan.resume_cursor([Cursor.from_dict(c) for c in rank_state["cursors"]], old_world)

    @functools.cached_property
    def _plan(self):
        """This rank's data plan over the train manifest (read once: it may live on S3)."""
        manifest = load_manifest(self.cfg.data.train_shards)  # a path or a URL (Path() would fold s3:// to s3:/)
        return plan_for(self.cfg, manifest, self.world_size, self.rank, run_dir=self.run_dir)

    def _open_stream(self) -> None:
        plan = self._plan
        views = self.objective.needs_views()
        if self.cfg.data.loader == "ray":
            from pretrain.data.ray_stream import RayBatchStream, connect_ray

            self._ray_role = connect_ray()
            self.stream = RayBatchStream(self.cfg, plan, self.cursor, views)
        else:
            self.stream = local_stream(self.cfg, plan, self.cursor, views)
        if os.environ.get(RECORD_ENV):
            self.stream.record = self.run_dir / "consumed" / f"rank_{self.rank}.jsonl"

    # ------------------------------------------------------------------ stages
    def _frozen(self) -> set[str]:
        """The encoders frozen at this step (all in stage 1; ``train.frozen_encoders`` always)."""
        return frozen_encoders(self.stage, self.cfg)

    def _apply_stage(self) -> None:
        apply_freezing(self.model, self._frozen())

    def _set_lr(self) -> float:
        return set_group_lrs(self.engine.optimizer, self.cfg, self.step, self._frozen())

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: dict) -> dict[str, float]:
        """Forward, loss, backward and optimizer step on one rank's batch; returns logged terms."""
        timer = self.timer  # each phase's time (pretrain/engine/step_timing.py)
        with timer.phase("data"):
            batch = batch_to_device(batch, self.device)
        autocast_dtype = resolve_precision(self.cfg.train.precision, self.device)
        if self.cfg.train.grad_cache_chunk > 0:  # GradCache two-pass step (pretrain/engine/two_pass.py)
            terms, logit_scale = two_pass_step(
                timer.timed("forward", self.engine),
                batch,
                TimedObjective(self.objective, timer),
                self.cfg.train.grad_cache_chunk,
                autocast_dtype=autocast_dtype,
                backward=timer.timed("backward", self.engine.backward),
                set_boundary=self.engine.set_gradient_accumulation_boundary,
            )
        else:
            with timer.phase("forward"), forward_autocast(autocast_dtype, self.device):
                emb = embeddings_to_fp32(self.engine(batch))  # the loss accumulates in fp32 whatever the forward dtype
            with timer.phase("loss"):
                terms = self.objective(emb, batch)
            with timer.phase("backward"):
                self.engine.backward(terms["loss"])
            logit_scale = emb["logit_scale"]
        if (backend := timer.note_loss_backend(self.cfg.loss, logit_scale)) is not None:  # fp32, the loss's device
            self._print(f"loss backend: {backend} (loss.backend={self.cfg.loss.backend}, {logit_scale.device})")
        with timer.phase("optimizer"):
            applied = self._optimizer_step()
        values = detach_terms(terms)
        if self.cfg.loss.temperature != "per_term":  # per_term: no term reads the shared scale (it stays at init);
            values["logit_scale"] = float(logit_scale.detach().reshape(-1)[0])  # temp_<term> are the ones used
        values["nonfinite"] = float(not applied or not math.isfinite(values["loss"]))
        return values

    def _optimizer_step(self) -> bool:
        """``engine.step()``, unless the gradients are not finite; returns whether it updated.

        ZeRO stages 1-3 check the (already reduced) gradients for inf/NaN themselves, skip the
        update, zero the gradients and count ``engine.skipped_steps``. Stage 0 (plain data
        parallel) does not, so its all-reduced gradients are checked here: the verdict is the
        same on every rank.
        """
        if self._zero_stage == 0:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            # one device sync for the whole check, not one per parameter
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                self.engine.zero_grad()
                return False
        before = self.engine.skipped_steps
        self.engine.step()
        return self.engine.skipped_steps == before

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return values
        keys = sorted(values)
        sums = all_reduce_numbers([values[k] for k in keys])
        return {k: float(v) / self.world_size for k, v in zip(keys, sums)}

    def _sum_over_ranks(self, values: list[int]) -> list[int]:
        if self.world_size == 1:
            return list(values)
        return all_reduce_numbers(values, dtype=torch.long)

    def _on_sigterm(self, signum, frame) -> None:
        # Only a flag: the loop saves a checkpoint after the current step, on every rank together.
        self._stop_requested = True

    def train(self) -> dict:
        """Run until ``train.max_steps``; returns the last logged metrics."""
        t_cfg = self.cfg.train
        if self.step >= t_cfg.max_steps:
            # The final checkpoint exists but the export may not (killed while exporting, e.g. by a
            # SIGTERM deadline), or hold an earlier step: run.prepare only skips training when the
            # export holds this very step.
            self._print(f"run already finished at step {self.step}; nothing to train, exporting")
            self.export()
            return {}
        global_batch = self.cfg.data.batch_size * self.world_size
        last: dict = {}
        t_log, steps_since_log = time.perf_counter(), 0
        t_start, start_step = time.perf_counter(), self.step
        for batch, bad, cursor in self.timer.iterate(self.stream):
            if self.stage == 1 and self.step >= t_cfg.stage1_steps:
                self.stage = 2
                self._apply_stage()
                reset_encoder_optimizer_state(self.engine.optimizer)
                self._print(f"step {self.step}: stage 2, encoders unfrozen")
            lr = self._set_lr()
            self._record_bad_samples(bad)
            values = self.train_step(batch)
            values["padding_fraction"] = padding_fraction(batch)
            self.timer.end_step(batch, self._frozen())
            self.step += 1
            steps_since_log += 1
            self.cursor = cursor
            self.samples_seen += global_batch
            # One collective per step: bad samples of every rank, whether any rank got SIGTERM,
            # and whether any rank saw a non-finite loss or a skipped update.
            bad_total, stop_votes, nonfinite = self._sum_over_ranks(
                [len(bad), int(self._stop_requested), int(values.pop("nonfinite"))]
            )
            self.bad_samples += bad_total
            # Checked on every rank alike (the counts are global); the step is logged before stopping.
            stop_reason = self._count_nonfinite(bool(nonfinite)) or bad_ratio_stop_reason(
                self.bad_samples, self.samples_seen, self.cfg.data
            )
            if stop_reason or self.step % t_cfg.log_every == 0 or self.step == t_cfg.max_steps:
                timing, unaveraged = self.timer.summary()  # numbers; None on CPU and the loss backend once
                values = self._mean_over_ranks({**values, **timing})
                elapsed = time.perf_counter() - t_log
                rate = steps_since_log * global_batch / max(elapsed, 1e-9)
                last = {
                    "step": self.step,
                    **values,
                    "lr": lr,
                    "samples_per_s": rate,
                    "stage": self.stage,
                    "epoch": cursor.epoch,
                    "samples_seen": self.samples_seen,
                    "bad_samples": self.bad_samples,
                    "nonfinite_steps": self.nonfinite_steps,
                    **unaveraged,
                }
                self._log_metrics(last)
                done = self.step - start_step
                eta = (time.perf_counter() - t_start) / done * (t_cfg.max_steps - self.step)
                self._print(
                    f"step {self.step}/{t_cfg.max_steps} | stage {self.stage} | loss {values['loss']:.4f} | "
                    f"{rate:.1f} samples/s | ETA {_fmt_seconds(eta)}"
                )
                t_log, steps_since_log = time.perf_counter(), 0
            if stop_reason:
                raise RunStopped(stop_reason)
            # data.hard_negatives=previous_epoch: the ended epoch's embeddings (collective; before the save)
            self.epoch_embeddings.after_step(self.engine, cursor, skip=bool(stop_votes) or self.step >= t_cfg.max_steps)
            if t_cfg.validate_every and (self.step % t_cfg.validate_every == 0 or self.step == t_cfg.max_steps):
                self._validate()
            final = self.step == t_cfg.max_steps
            if self.step % t_cfg.checkpoint_every == 0 or final or stop_votes:
                if self._state_is_finite(batch):
                    self.save(must_succeed=final or bool(stop_votes))
                else:
                    self._refuse_nonfinite_save(final)
            if stop_votes and self.step < t_cfg.max_steps:
                self.preempted = True
                if self._saved_step == self.step:
                    self._print(f"SIGTERM: checkpoint saved at step {self.step}; exiting (relaunch to resume)")
                else:  # the weights were not finite: nothing saved
                    self._print(f"SIGTERM: no checkpoint saved at step {self.step}; exiting; {self._last_good()}")
                return last
            maybe_inject_fault(self.step, self.rank, self.run_dir)
            if self.step >= t_cfg.max_steps:
                break
        self.export()
        return last

    def _state_is_finite(self, batch: dict) -> bool:
        """Whether the weights after this step give a finite loss on every rank (collective); a
        checkpoint is written only from such a state (:func:`weights_give_finite_loss`)."""
        ok = weights_give_finite_loss(self.engine, self.objective, batch, self.device, self.cfg.train)
        return self._sum_over_ranks([int(not ok)])[0] == 0

    def _refuse_nonfinite_save(self, final: bool) -> None:
        """A checkpoint was due but the weights give a non-finite loss: write none (retention would
        otherwise replace good checkpoints with poisoned ones); at the last step, stop."""
        where = self._last_good()
        log.warning("step %d: the weights give a non-finite loss; no checkpoint written (%s)", self.step, where)
        self._log_metrics({"step": self.step, "checkpoint_skipped_nonfinite": 1})
        if final:
            raise RunStopped(
                f"the weights after the last step ({self.step}) give a non-finite loss; no checkpoint or export "
                f"written: {where}. Lower optim.lr / optim.encoder_lr or check the data, then relaunch to resume."
            )

    def _last_good(self) -> str:
        """Names the checkpoint a relaunch resumes from (only finite states are ever saved)."""
        good = checkpoint.latest_tag(self.ckpt_dir)
        return f"the last good checkpoint is {self.ckpt_dir / good}" if good else "no checkpoint was written yet"

    def _validate(self) -> None:
        """The validator's retrieval metrics (every rank: the forward gathers ZeRO-3 partitions);
        the selection score is noted for the next checkpoint to pin in RUN/best_checkpoint.json."""
        with torch.no_grad():
            val = self.validator(self.engine)
        self.logger.log({"step": self.step, **val})
        score = val.get("val/mean_R@10", val.get(f"val/mean_R@{self.cfg.eval.ks[-1]}", 0.0))
        best_checkpoint.note_metrics(self.engine, self.cfg.eval, val)  # eval.select_metric or R@10
        self._print(f"step {self.step}: validation mean R@10 {score:.3f}")

    def _count_nonfinite(self, nonfinite: bool) -> str | None:
        """Count a skipped update; why the run must stop (:func:`nonfinite_stop_reason`), else None.

        A skipped step still consumes its batch and its step number (the data cursor moves on),
        so a resumed run replays exactly the same steps.
        """
        if not nonfinite:
            self._nonfinite_run = 0
            return None
        self.nonfinite_steps += 1
        self._nonfinite_run += 1
        limit = self.cfg.train.max_nonfinite_steps
        log.warning(
            "step %d: non-finite loss or gradients on some rank; update skipped (%d in a row, limit %d)",
            self.step,
            self._nonfinite_run,
            limit,
        )
        if self._nonfinite_run < limit:
            return None
        return nonfinite_stop_reason(self._nonfinite_run, self.step, limit, self._last_good())

    def _record_bad_samples(self, bad: list[dict]) -> None:
        """Log each skipped sample (a whole unreadable shard once) and list it in
        ``RUN/bad_samples/rank_<r>.jsonl`` (:func:`append_bad_samples`)."""
        if bad:
            path = self.run_dir / "bad_samples" / f"rank_{self.rank}.jsonl"
            append_bad_samples(path, self.step + 1, bad, self._unreadable_shards)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Client state saved beside DeepSpeed's files (identical on every rank)."""
        return {
            "step": self.step,
            "stage": self.stage,
            "samples_seen": self.samples_seen,
            "bad_samples": self.bad_samples,
            "nonfinite_steps": self.nonfinite_steps,
            "config_fingerprint": self.cfg.fingerprint(),
            "world_size": self.world_size,
            "data_plan": plan_record(self.cfg, self._plan, epoch=self.cursor.epoch),
        }

    def save(self, must_succeed: bool = False) -> None:
        """Write a checkpoint (collective). A failed write (disk full, I/O error) is reported
        and training goes on with the previous checkpoint kept; the run stops when
        ``train.max_failed_checkpoints`` saves in a row failed, or when ``must_succeed``
        (the last step, a preemption)."""
        rank_state = {"cursor": self.cursor.to_dict(), "rng": checkpoint.rng_state()}
        try:
            tag = checkpoint.save(
                self.engine,
                self.ckpt_dir,
                self.step,
                self.state_dict(),
                rank_state,
                self.cfg.train.keep_checkpoints,
                remote=self.cfg.train.remote_dir,
            )
        except checkpoint.CheckpointWriteError as e:
            self._failed_saves += 1
            self._log_metrics({"step": self.step, "checkpoint_failed": 1, "checkpoint_error": str(e)})
            limit = self.cfg.train.max_failed_checkpoints
            if must_succeed or self._failed_saves >= limit:
                raise
            self._print(f"WARNING: {e} ({self._failed_saves} failed in a row, limit {limit}); training goes on")
            return
        self._failed_saves = 0
        self._saved_step = self.step
        self._print(f"checkpoint {self.ckpt_dir / tag}")

    def export(self) -> None:
        export_engine(self.engine, self.cfg, self.run_dir / "export", step=self.step)

    def close(self) -> None:
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        if self.stream is not None and hasattr(self.stream, "close"):
            self.stream.close()
        if self._ray_role in ("started", "joined"):
            import ray

            # The ranks that joined let go of Ray first; the rank that started it stops it last.
            if self._ray_role == "joined":
                ray.shutdown()
            if dist.is_initialized():
                dist.barrier()
            if self._ray_role == "started":
                ray.shutdown()

    # ------------------------------------------------------------------ output
    def _log_metrics(self, record: dict) -> None:
        self.logger.log(record)  # rank 0 only: metrics.jsonl, TensorBoard, W&B

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics and bad-sample lines logged after the checkpoint we resume from (they
        will be redone)."""
        if self.rank == 0:
            truncate_jsonl(self.run_dir / "metrics.jsonl", step)
            for f in (self.run_dir / "bad_samples").glob("rank_*.jsonl"):  # ranks of an earlier, wider run too
                if int(f.stem.removeprefix("rank_")) >= self.world_size:
                    truncate_jsonl(f, step)
        truncate_jsonl(self.run_dir / "bad_samples" / f"rank_{self.rank}.jsonl", step)

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stdout, flush=True)


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60}m{s % 60:02d}s"
