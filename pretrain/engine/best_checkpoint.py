"""Model selection: the checkpoint that scored best on validation is pinned against retention.

Every validation notes its selection score on the engine it scored (:func:`note_metrics`, called by
the trainer on every rank; :func:`pretrain.eval.validation.validator_for` notes the same). The
metric is ``eval.select_metric`` (a key of the validation metrics, e.g. ``val/mean_R@10`` or
``val/zeroshot_fmax_ec``; ``eval.select_mode`` max or min), by default ``val/mean_R@10`` (the last
``eval.ks`` when 10 is not one of them), higher is better (:func:`selection`). When
:func:`pretrain.engine.checkpoint.save` then completes a checkpoint of *those very weights* (no
optimizer step in between: DeepSpeed's step and sample counters unchanged), rank 0 compares the
score with the pinned one (:func:`promote`) and, when it is better, pins the new checkpoint in
``RUN/best_checkpoint.json`` (written atomically), the run's one record of its best::

    {"metric": "val/zeroshot_fmax_ec", "mode": "max", "step": 300, "tag": "step00000300", "score": 0.41}

Retention (``train.keep_checkpoints``) never deletes the pinned tag (:func:`pinned_tag`), locally
or under ``train.remote_dir``; the export writes it as ``RUN/export/best/`` beside the last
(:func:`pretrain.engine.export.export_best`). A resumed run reads the file back, so its later
validations must beat the same best. A validation whose step gets no checkpoint (``validate_every``
not a multiple of ``checkpoint_every``, a failed write) is never pinned.

Runs written before this file existed kept ``RUN/best.json`` (``step``, ``score``, ``metric``: the
best mean R@10 of any validated step, checkpointed or not). :func:`read` still reads it when there is
no ``best_checkpoint.json`` (as a max-mode record of the tag ``step<N>``), so such a run resumes
against its old best and exports it when that checkpoint still exists. Needs no DeepSpeed import.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from data_shards import storage

log = logging.getLogger(__name__)

FILE = "best_checkpoint.json"
LEGACY_FILE = "best.json"  # RUN/best.json of runs before best_checkpoint.json (read, never written)
EXPORT_SUBDIR = "best"  # RUN/export/best
RECORD_IN_EXPORT = "best.json"  # RUN/export/best/best.json: the record the best export was written from
DEFAULT_METRIC = "val/mean_R@10"
MODES = ("max", "min")
_NOTE = "_align_pro_validation"  # attribute on the engine: the last validation's score and counters


def _counters(engine) -> tuple | None:
    """What changes whenever the optimizer steps (None for a module without DeepSpeed's counters)."""
    steps, samples = getattr(engine, "global_steps", None), getattr(engine, "global_samples", None)
    return None if steps is None or samples is None else (int(steps), int(samples))


def note_validation(engine, metric: str, mode: str, score: float) -> None:
    """Remember on ``engine`` that its current weights scored ``score`` on ``metric`` (every rank)."""
    if mode not in MODES:
        raise ValueError(f"eval.select_mode={mode!r}: expected one of {MODES}")
    setattr(engine, _NOTE, {"counters": _counters(engine), "metric": metric, "mode": mode, "score": float(score)})


def selection(eval_cfg) -> tuple[str, str]:
    """(metric, mode) that selects the best checkpoint of a run with this ``eval`` section.

    ``eval.select_metric`` / ``eval.select_mode`` when a metric is set; otherwise ``val/mean_R@10``
    (``val/mean_R@<k>`` of the last ``eval.ks`` when 10 is not a cut-off), max.
    """
    if eval_cfg.select_metric is not None:
        return eval_cfg.select_metric, eval_cfg.select_mode
    k = 10 if 10 in eval_cfg.ks else eval_cfg.ks[-1]
    return f"val/mean_R@{k}", "max"


def note_metrics(engine, eval_cfg, metrics: dict[str, float]) -> tuple[str, float]:
    """Note on ``engine`` the selection score (:func:`selection`) among a validation's ``metrics``.

    Every rank (only rank 0's note is read, by :func:`promote`). Returns (metric, score).

    Raises:
        KeyError: the validation did not report the selection metric (names what it reported).
    """
    metric, mode = selection(eval_cfg)
    if metric not in metrics:
        raise KeyError(f"model selection by {metric!r}: validation reported only {sorted(metrics)}")
    score = float(metrics[metric])
    note_validation(engine, metric, mode, score)
    return metric, score


def better(score: float, best: float | None, mode: str) -> bool:
    """Whether ``score`` beats ``best`` under ``mode``; a non-finite score never does."""
    if not math.isfinite(score):
        return False
    if best is None or not math.isfinite(best):
        return True
    return score > best if mode == "max" else score < best


def _valid(record) -> bool:
    """Whether ``record`` has every field, of its type, and a tag naming a directory of RUN/checkpoints."""
    if not isinstance(record, dict):
        return False
    tag = record.get("tag")
    return (
        type(record.get("step")) is int
        and isinstance(tag, str)
        and bool(tag)
        and tag == Path(tag).name
        and not tag.startswith(".")
        and isinstance(record.get("score"), (int, float))
        and not isinstance(record.get("score"), bool)
        and record.get("mode") in MODES
        and isinstance(record.get("metric"), str)
    )


def read_record(path: Path | str) -> dict | None:
    """The best-checkpoint record in the JSON file ``path`` (a path or URL: ``metric``, ``mode``,
    ``step``, ``tag``, ``score``); None when the file is absent, or does not parse or lacks a field
    (logged)."""
    if not storage.exists(path):
        return None
    try:
        record = json.loads(storage.read_text(path))
    except (OSError, ValueError, UnicodeDecodeError):
        record = None
    if not _valid(record):
        log.warning("%s is damaged (expected metric, mode, step, tag and score); ignored", path)
        return None
    return record


def _read_legacy(path: Path) -> dict | None:
    """``RUN/best.json`` of an older run (``step``, ``score``, ``metric``) as a record, or None."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        old = None
    step, score = (old.get("step"), old.get("score")) if isinstance(old, dict) else (None, None)
    if type(step) is not int or step < 0 or not isinstance(score, (int, float)) or isinstance(score, bool):
        log.warning("%s (the best record of older runs) is damaged; no best checkpoint is pinned", path)
        return None
    metric = old.get("metric") if isinstance(old.get("metric"), str) else DEFAULT_METRIC
    log.info("%s: no %s, reading the older %s (step %d)", path.parent, FILE, path.name, step)
    return {"metric": metric, "mode": "max", "step": step, "tag": f"step{step:08d}", "score": float(score)}


def read(run_dir: Path) -> dict | None:
    """The pinned best of ``run_dir`` (``metric``, ``mode``, ``step``, ``tag``, ``score``), or None.

    A ``best_checkpoint.json`` that does not parse, or lacks a field, counts as absent (logged): the
    next validation pins afresh. Without one, an older run's ``RUN/best.json`` is read (see the
    module docstring).
    """
    run_dir = Path(run_dir)
    if (run_dir / FILE).is_file():
        return read_record(run_dir / FILE)
    if (run_dir / LEGACY_FILE).is_file():
        return _read_legacy(run_dir / LEGACY_FILE)
    return None


def published_record(run_dir: Path) -> bytes | None:
    """What ``train.remote_dir`` keeps as its ``best_checkpoint.json`` for ``run_dir`` (the remote
    holds no ``best.json``), or None when the run has no best record.

    ``RUN/best_checkpoint.json`` as it is; else an older run's ``RUN/best.json`` as :func:`read`
    understands it (the max-mode record of tag ``step<N>``), converted for the upload only: the
    local file is left alone, so a fresh machine that fetches the run record resumes against the
    same best as this one.
    """
    run_dir = Path(run_dir)
    if (run_dir / FILE).is_file():
        return (run_dir / FILE).read_bytes()
    if (run_dir / LEGACY_FILE).is_file():
        record = _read_legacy(run_dir / LEGACY_FILE)
        return None if record is None else (json.dumps(record, indent=1) + "\n").encode()
    return None


def write_json(path: Path, record: dict) -> None:
    """``record`` as JSON at ``path``, atomically (temporary file, fsync, rename)."""
    storage.write_text(path, json.dumps(record, indent=1) + "\n")


def promote(run_dir: Path, engine, step: int, tag: str) -> dict | None:
    """Rank 0, after checkpoint ``tag`` (at ``step``) is complete: pin it when the validation noted on
    ``engine`` scored these weights and beats the pinned best. Returns the pinned record (None: none).

    A pinned best of a later step belongs to a timeline a resume abandoned (its checkpoint is
    retired with the others): it is dropped. A best of another metric or mode (the recipe changed
    on resume) is replaced.
    """
    run_dir = Path(run_dir)
    best = read(run_dir)
    if best is not None and best["step"] > step:
        log.warning(
            "%s pins step %d, after the resumed step %d (an abandoned timeline): dropped", FILE, best["step"], step
        )
        (run_dir / FILE).unlink(missing_ok=True)
        (run_dir / LEGACY_FILE).unlink(missing_ok=True)  # else read() would fall back to it
        best = None
    note = getattr(engine, _NOTE, None)
    if note is None or note["counters"] is None or note["counters"] != _counters(engine):
        return best  # no validation of exactly these weights
    setattr(engine, _NOTE, None)
    if best is not None and (best["metric"], best["mode"]) != (note["metric"], note["mode"]):
        was, now = f"{best['metric']} ({best['mode']})", f"{note['metric']} ({note['mode']})"
        log.warning("%s selected by %s, the run now by %s: starting over", FILE, was, now)
        best = None
    if best is not None and not better(note["score"], float(best["score"]), note["mode"]):
        return best
    record = {"metric": note["metric"], "mode": note["mode"], "step": int(step), "tag": tag, "score": note["score"]}
    write_json(run_dir / FILE, record)
    log.info("best checkpoint by %s: %s (%.4g)", record["metric"], tag, record["score"])
    return record


def pinned_tag(run_dir: Path, step: int) -> str | None:
    """The tag retention must keep at ``step`` (None when nothing, or a later abandoned step, is pinned)."""
    best = read(run_dir)
    return best["tag"] if best is not None and best["step"] <= step else None
