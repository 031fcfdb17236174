"""``python -m pretrain.summary --run-dir DIR``: a short human summary of a run.

Steps, first and final loss, retrieval R@1/5/10 per direction next to chance level, and
where the checkpoint and the export are.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from pretrain.engine.checkpoint_tags import latest_tag

# Values of a metrics row that the after-run tools format as numbers (null: a non-finite value).
NUMERIC_KEYS = ("loss", "samples_per_s", "lr", "val/num_proteins")
RUN_FILE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)  # content of another shape


def read_run_metrics(path: Path) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl`` ([] when absent), checked for what the tools read.

    A line that does not parse is skipped, as :func:`pretrain.engine.logging_backends.read_metrics`
    does (a line cut by a crash, or still being written by a live run). Raises ValueError naming the
    file (and line) when the file is not a metrics log: not UTF-8, no line parses (beyond a single
    unfinished one), a line that is not a JSON object, a ``step`` that is not an integer, or a
    value in :data:`NUMERIC_KEYS` that is not a number or null.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a metrics log (not UTF-8 text at byte {e.start})") from None
    rows, unreadable = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        step = row.get("step")
        if ("step" in row or "loss" in row) and (type(step) is not int or step < 0):
            raise ValueError(f"{path} line {number}: 'step' must be a non-negative integer, got {step!r}")
        for key in NUMERIC_KEYS:
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path} line {number}: '{key}' must be a number or null, got {value!r}")
        rows.append(row)
    being_written = unreadable == 1 and not text.endswith("\n")
    if unreadable and not rows and not being_written:
        raise ValueError(f"{path}: none of its {unreadable} line(s) is a JSON object: not a metrics log")
    return rows


def read_run_eval(path: Path) -> dict:
    """``RUN/eval.json`` ({} when absent); ValueError naming the file when it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        ev = json.loads(path.read_text())
    except ValueError as e:  # not JSON, not UTF-8
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(ev, dict):
        raise ValueError(f"{path}: expected a JSON object (python -m pretrain.eval writes it)")
    return ev


def summarize(run_dir: Path) -> str:
    """The summary text; ValueError naming the file when ``metrics.jsonl`` or ``eval.json`` is damaged."""
    run_dir = Path(run_dir)
    lines = [f"run: {run_dir}"]
    train_rows = [r for r in read_run_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    if train_rows:
        last = train_rows[-1]
        first = next((r for r in train_rows if r["loss"] is not None), last)  # a non-finite loss is logged as null
        loss = "non-finite" if last["loss"] is None else f"{last['loss']:.3f}"
        start = f"{first['loss']:.3f} (step {first['step']}) -> " if first["loss"] is not None else ""
        rate = last.get("samples_per_s")
        lines.append(
            f"steps: {last['step']}  loss: {start}{loss} (step {last['step']})"
            + (f"  throughput: {rate:.1f} samples/s" if rate is not None else "")
        )
    eval_path = run_dir / "eval.json"
    ev = read_run_eval(eval_path)
    try:
        lines += _retrieval_lines(ev)
    except RUN_FILE_ERRORS as e:
        raise ValueError(f"{eval_path}: not an evaluation written by pretrain.eval ({type(e).__name__}: {e})") from None
    tag = latest_tag(run_dir / "checkpoints")
    lines.append(f"checkpoint: {run_dir / 'checkpoints' / tag if tag else 'none'}")
    if (run_dir / "export").is_dir():
        # The interpreter that runs this summary (the project's .venv under make demo), not a bare python.
        python = shlex.quote(sys.executable)
        lines.append(f"export: {run_dir / 'export'} ({python} -m pretrain.eval --model {run_dir / 'export'})")
    return "\n".join(lines)


def _retrieval_lines(ev: dict) -> list[str]:
    """Retrieval R@k per direction from an eval result; none when it has no retrieval (``--tasks go``)."""
    directions = (ev.get("retrieval") or {}).get("directions") or {}
    if not directions:
        return []
    lines = [f"retrieval on {ev.get('shards', '?')} ({ev.get('num_proteins', '?')} proteins): R@k (chance)"]
    for name, d in directions.items():
        if not d.get("n"):
            continue
        cells = [f"R@{k}={d[f'R@{k}']:.3f} ({d[f'chance_R@{k}']:.3f})" for k in (1, 5, 10) if f"R@{k}" in d]
        lines.append(f"  {name:<14} " + "  ".join(cells) + f"  median rank {d['median_rank']:.0f}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.summary", description=__doc__)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"align-pro summary: error: no run directory {args.run_dir}", file=sys.stderr)
        return 2
    try:
        text = summarize(Path(args.run_dir))
    except (OSError, ValueError) as e:
        print(f"align-pro summary: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
