"""Model selection: the checkpoint that scored best on validation is pinned against retention.

With ``eval.select_metric`` set (a key of the validation metrics, e.g. ``val/mean_R@10`` or
``val/zeroshot_fmax_ec``; ``eval.select_mode`` max or min), every validation notes its score on
the engine it scored (:func:`note_validation`, called by :func:`pretrain.eval.validation.validator_for`
on every rank). When :func:`pretrain.engine.checkpoint.save` then completes a checkpoint of *those
very weights* (no optimizer step in between: DeepSpeed's step and sample counters unchanged), rank 0
compares the score with the pinned one (:func:`promote`) and, when it is better, pins the new
checkpoint in ``RUN/best_checkpoint.json`` (written atomically)::

    {"metric": "val/zeroshot_fmax_ec", "mode": "max", "step": 300, "tag": "step00000300", "score": 0.41}

Retention (``train.keep_checkpoints``) never deletes the pinned tag (:func:`pinned_tag`), locally
or under ``train.remote_dir``; the export writes it as ``RUN/export/best/`` beside the last
(:func:`pretrain.engine.export.export_best`). A resumed run reads the file back, so its later
validations must beat the same best. A validation whose step gets no checkpoint (``validate_every``
not a multiple of ``checkpoint_every``, a failed write) is never pinned. Needs no DeepSpeed import.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from data_shards.storage import write_text

log = logging.getLogger(__name__)

FILE = "best_checkpoint.json"
EXPORT_SUBDIR = "best"  # RUN/export/best
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


def better(score: float, best: float | None, mode: str) -> bool:
    """Whether ``score`` beats ``best`` under ``mode``; a non-finite score never does."""
    if not math.isfinite(score):
        return False
    if best is None or not math.isfinite(best):
        return True
    return score > best if mode == "max" else score < best


def read(run_dir: Path) -> dict | None:
    """The pinned best of ``run_dir`` (``metric``, ``mode``, ``step``, ``tag``, ``score``), or None.

    A file that does not parse, or lacks a field, counts as absent (logged): the next validation
    pins afresh.
    """
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        ok = isinstance(record, dict) and type(record.get("step")) is int and isinstance(record.get("tag"), str)
        ok = ok and isinstance(record.get("score"), (int, float)) and record.get("mode") in MODES
        tag = record.get("tag", "") if isinstance(record, dict) else ""
        ok = ok and isinstance(record.get("metric"), str) and tag == Path(tag).name and not tag.startswith(".")
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        log.warning("%s is damaged; no best checkpoint is pinned until the next validation", path)
        return None
    return record


def write_json(path: Path, record: dict) -> None:
    """``record`` as JSON at ``path``, atomically (temporary file, fsync, rename)."""
    write_text(path, json.dumps(record, indent=1) + "\n")


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
