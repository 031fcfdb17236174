"""Metrics logging: ``RUN/metrics.jsonl`` (the contract), mirrored to TensorBoard and W&B.

:class:`MetricsLogger` appends one JSON object per :meth:`~MetricsLogger.log` call to
``RUN/metrics.jsonl`` and sends the numeric values to

* TensorBoard (``RUN/tensorboard``) through ``torch.utils.tensorboard`` or ``tensorboardX``,
  whichever imports; keys without a ``/`` are grouped as ``train/<key>``;
* Weights & Biases when ``wandb`` is importable and the logger is built with ``wandb=True``;
  the W&B run id is kept in ``RUN/wandb_id.txt`` so a resumed run continues the same W&B run.

Only rank 0 writes (``rank`` argument); other ranks get a no-op logger. Non-finite floats are
written as ``null`` so every line stays strict JSON.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(line, row) of every complete line of a JSONL file (nothing when absent).

    A line cut by a crash or still being written (a live run) does not parse and is skipped.
    """
    path = Path(path)
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                continue


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` ([] when absent); a half-written last line (a live run) is skipped.

    A non-finite value was written as null, so a row's ``loss`` may be None.
    """
    return [row for _, row in iter_jsonl(path)]


def _tensorboard_writer(logdir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.warning("neither tensorboard nor tensorboardX is installed: TensorBoard logging is off")
            return None
    return SummaryWriter(log_dir=str(logdir), purge_step=purge_step)


def _quiet_writer_thread_errors() -> None:
    """Report an OSError that kills a TensorBoard writer thread (a full disk) as one log line, not a
    thread traceback on stderr; :meth:`MetricsLogger.log` then stops the mirror. Other threads'
    errors go to the hook that was installed before."""
    previous = threading.excepthook
    if getattr(previous, "_align_pro_quiet", False):
        return

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_EventLoggerThread":
            log.error("TensorBoard writer thread stopped: %s", args.exc_value)
            return
        previous(args)

    hook._align_pro_quiet = True
    threading.excepthook = hook


def _writer_alive(writer) -> bool:
    """False when a TensorBoard writer's background thread is known dead (tensorboardX keeps it at
    ``file_writer.event_writer._worker``); True when alive or when the layout is unknown."""
    worker = writer
    for attr in ("file_writer", "event_writer", "_worker"):
        worker = getattr(worker, attr, None)
        if worker is None:
            return True
    return not hasattr(worker, "is_alive") or worker.is_alive()


def _scalar(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


class MetricsLogger:
    """Append metrics to ``RUN/metrics.jsonl`` and mirror scalars to TensorBoard / W&B.

    Args:
        run_dir: the run directory.
        rank: the process rank; only rank 0 logs.
        tensorboard: mirror to TensorBoard (when a writer library is installed).
        wandb: mirror to Weights & Biases (when ``wandb`` is installed).
        wandb_project: W&B project name.
        wandb_run_name: W&B display name (default: the run directory's name).
        config: the resolved recipe, recorded by W&B.
        resume_step: the step a resumed run restarts from: TensorBoard events after it are purged
            (metrics.jsonl is truncated by the trainer).

    Example::

        logger = MetricsLogger(run_dir, rank=rank, wandb=True, config=cfg.to_dict())
        logger.log({"step": 10, "loss": 1.2, "lr": 1e-3})
        logger.close()
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        rank: int = 0,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "align-pro",
        wandb_run_name: str | None = None,
        config: dict | None = None,
        resume_step: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self.dropped = 0  # metrics lines that could not be written (disk full, I/O error)
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._tb = _tensorboard_writer(self.run_dir / "tensorboard", resume_step)
            _quiet_writer_thread_errors()
        if wandb:
            self._wandb = self._init_wandb(wandb_project, wandb_run_name or self.run_dir.name, config)

    def _init_wandb(self, project: str, name: str, config: dict | None):
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: W&B logging is off")
            return None
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=project, name=name, id=run_id, resume="allow", dir=str(self.run_dir), config=config or {}
        )

    def log(self, record: dict) -> None:
        """Append ``record`` (must hold ``step``) as one JSON line; mirror its numeric values."""
        if not self.enabled:
            return
        if "step" not in record:
            raise ValueError(f"metrics record without 'step': {sorted(record)}")
        line = json.dumps(_jsonable(record), allow_nan=False)
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            # A full disk must not end rank 0 with a traceback while its peers wait in a collective:
            # the line is counted and reported, and the checkpoint that cannot be written either
            # stops the run in order (train.max_failed_checkpoints).
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.error("cannot write %s (%s): %d metrics line(s) lost so far", self.path, e, self.dropped)
            self._drop_tensorboard("its run directory cannot be written")
        step = int(record["step"])
        scalars = {}
        for key, value in record.items():
            v = _scalar(value)
            if key == "step" or v is None or not math.isfinite(v):
                continue
            scalars[key if "/" in key else f"train/{key}"] = v
        if self._tb is not None and not _writer_alive(self._tb):
            self._drop_tensorboard("its writer thread died (disk full?)")
        if self._tb is not None:
            try:
                for tag, v in scalars.items():
                    self._tb.add_scalar(tag, v, step)
            except OSError as e:  # a mirror: metrics.jsonl stays the record
                self._drop_tensorboard(str(e))
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def _drop_tensorboard(self, why: str) -> None:
        """Stop mirroring to TensorBoard without closing its writer: a writer whose thread died on a
        full disk blocks forever in ``add_scalar`` (its queue fills) and in ``close`` (it joins)."""
        if self._tb is not None:
            log.error("TensorBoard mirror stopped: %s; metrics.jsonl stays the record", why)
            self._tb = None

    def flush(self) -> None:
        if self._tb is not None:
            try:
                self._tb.flush()
            except OSError as e:
                self._drop_tensorboard(str(e))

    def close(self) -> None:
        """Flush and close the backends (idempotent)."""
        if self._tb is not None:
            try:
                self._tb.close()
            except OSError as e:
                log.error("TensorBoard mirror could not be closed: %s", e)
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
