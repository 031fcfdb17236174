"""``python -m pretrain.report --run-dir DIR``: plots and a Markdown summary of a run.

Reads ``RUN/metrics.jsonl`` and ``RUN/eval.json`` (whatever of them exists) and writes into
``RUN/report/`` (or ``--out``):

* ``loss.png``: the total loss and each loss term over steps (learning rate beside);
* ``validation.png``: validation recall@k over steps (``val/...`` keys), when logged;
* ``recall_at_k.png``: recall@k for k = 1..50 per retrieval direction, exact-pair and
  multi-positive, with chance levels;
* ``function_pr.png`` / ``function_fmax.png``: precision-recall curves over the Fmax thresholds
  and Fmax / AUPR per method, for GO-MF/BP/CC and EC, baseline included;
* ``fold.png``: fold / family accuracy per method beside the baseline and the majority class;
* ``README.md``: the tables and the images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import matplotlib

from pretrain.summary import RUN_FILE_ERRORS, read_run_eval, read_run_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DIRECTIONS = ("seq->struct", "struct->seq", "seq->text", "text->seq", "struct->text", "text->struct")
_DPI = 110


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss(rows: list[dict], out: Path) -> Path | None:
    train = [r for r in rows if "loss" in r]
    if not train:
        return None
    terms = sorted({k for r in train for k in r if k.startswith("loss_")})
    fig, axes = plt.subplots(1, 3 if any("lr" in r for r in train) else 2, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(*_series(train, "loss"), marker=".", color="black")
    ax.set(title="total loss", xlabel="step", ylabel="loss")
    ax = axes[1]
    for t in terms:
        ax.plot(*_series(train, t), marker=".", label=t.removeprefix("loss_"))
    ax.set(title="loss terms", xlabel="step", ylabel="InfoNCE loss")
    if terms:
        ax.legend(fontsize=8)
    if len(axes) > 2:
        axes[2].plot(*_series(train, "lr"), color="tab:gray")
        axes[2].set(title="learning rate (heads)", xlabel="step", ylabel="lr")
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, out / "loss.png")


def plot_validation(rows: list[dict], out: Path) -> Path | None:
    keys = sorted({k for r in rows for k in r if k.startswith("val/") and "R@" in k})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    means = [k for k in keys if k.startswith("val/mean_")]
    for k in means:
        ax.plot(*_series(rows, k), marker="o", lw=2, label=k.removeprefix("val/"))
    for k in keys:
        if k not in means and k.endswith("R@10"):
            ax.plot(*_series(rows, k), lw=0.8, alpha=0.5, label=k.removeprefix("val/"))
    n = next((r["val/num_proteins"] for r in rows if "val/num_proteins" in r), None)
    if n:
        ax.axhline(min(1.0, 10 / n), color="gray", ls=":", label=f"chance R@10 ({n} proteins)")
    ax.set(title="validation retrieval", xlabel="step", ylabel="recall")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "validation.png")


def plot_recall(ev: dict, out: Path) -> Path | None:
    dirs = (ev.get("retrieval") or {}).get("directions") or {}
    names = [d for d in DIRECTIONS if dirs.get(d, {}).get("n")]
    if not names:
        return None
    top = 0.0
    for name in names:
        c = dirs[name].get("curve") or {}
        top = max([top, *c.get("exact", []), *c.get("multi", []), *c.get("chance_multi", [])])
    top = min(1.02, max(0.1, 1.15 * top)) if top else 1.02
    fig, axes = plt.subplots(2, 3, figsize=(14, 8), sharey=True)
    for ax, name in zip(axes.ravel(), names):
        d = dirs[name]
        c = d.get("curve")
        if c:
            ax.plot(c["k"], c["exact"], color="tab:blue", lw=2, label="exact pair")
            ax.plot(c["k"], c["chance"], color="tab:blue", ls=":", label="chance (exact)")
            if "multi" in c:
                ax.plot(c["k"], c["multi"], color="tab:orange", ls="--", label="multi-positive")
                ax.plot(c["k"], c["chance_multi"], color="tab:orange", ls=":", label="chance (multi)")
        else:  # an eval.json without curves: the R@k points only
            ks = sorted(int(k[2:]) for k in d if k.startswith("R@") and k[2:].isdigit())
            ax.plot(ks, [d[f"R@{k}"] for k in ks], marker="o", label="exact pair")
            ax.plot(ks, [d[f"chance_R@{k}"] for k in ks], ls=":", label="chance")
            top = 1.02
        ax.set(title=f"{name} (n={d['n']}, median rank {d['median_rank']:.0f})", xlabel="k", ylabel="recall@k")
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"cross-modal retrieval on {ev.get('shards', '?')} ({ev.get('num_proteins', '?')} proteins)")
    return _save(fig, out / "recall_at_k.png")


def _function_tasks(ev: dict) -> dict:
    return {t: r for t, r in (ev.get("function") or {}).items() if r.get("methods")}


def plot_function_pr(ev: dict, out: Path) -> Path | None:
    tasks = _function_tasks(ev)
    if not tasks:
        return None
    cols = min(2, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 5.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(tasks) :]:
        ax.axis("off")
    for ax, (task, r) in zip(axes.ravel(), tasks.items()):
        for method, m in r["methods"].items():
            c = m.get("curve") or {}
            if not c.get("recall"):
                continue
            style = "--" if method.startswith("baseline") else (":" if method.startswith("zeroshot") else "-")
            (line,) = ax.plot(c["recall"], c["precision"], ls=style, label=f"{method} (Fmax {m['fmax']:.2f})")
            if m.get("recall") is not None:
                ax.plot(m["recall"], m["precision"], "o", color=line.get_color())
        ax.set(title=f"{task} (n={r['n_test']}, {r['n_labels']} labels)", xlabel="recall", ylabel="precision")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("protein-centric precision-recall over thresholds 0.01..1.00 (dot: Fmax)")
    return _save(fig, out / "function_pr.png")


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        hatch = "//" if label.startswith("baseline") else None
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label, hatch=hatch)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel=ylabel, title=title)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)


def plot_function_fmax(ev: dict, out: Path) -> Path | None:
    tasks = _function_tasks(ev)
    if not tasks:
        return None
    methods = sorted({m for r in tasks.values() for m in r["methods"]}, key=_method_order)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for ax, key, label in ((axes[0], "fmax", "Fmax"), (axes[1], "aupr", "micro AUPR")):
        series = {m: [tasks[t]["methods"].get(m, {}).get(key) for t in tasks] for m in methods}
        _bars(ax, list(tasks), series, label, f"{label} per task and method")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out / "function_fmax.png")


def plot_fold(ev: dict, out: Path) -> Path | None:
    r = ev.get("fold") or {}
    if not r.get("methods"):
        return None
    methods = sorted(r["methods"], key=_method_order)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    vals = [r["methods"][m]["accuracy"] or 0.0 for m in methods]
    colors = ["tab:gray" if m.startswith("baseline") else "tab:blue" for m in methods]
    ax.bar(methods, vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    if r.get("majority_accuracy") is not None:
        ax.axhline(r["majority_accuracy"], color="red", ls=":", label=f"majority class ({r['majority_accuracy']:.3f})")
        ax.legend(fontsize=8)
    ax.set(
        title=f"{r['key']} classification ({r['n_test']} proteins, {r['n_classes']} classes)",
        xlabel="method",
        ylabel="accuracy",
    )
    ax.set_ylim(0, 1.08)
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "fold.png")


def _method_order(m: str) -> tuple:
    return ({"probe": 0, "zeroshot": 1, "baseline": 2}.get(m.split("/")[0], 3), m)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _fmt(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _markdown(run_dir: Path, training: list[str], evaluation: list[str], empty: bool) -> str:
    lines = [f"# Report: `{run_dir}`", "", *training, *evaluation]
    if empty:
        lines.append("Nothing to report yet: no metrics.jsonl and no eval.json.")
    return "\n".join(lines) + "\n"


def _markdown_training(rows: list[dict], images: dict[str, Path]) -> list[str]:
    lines = []
    train = [r for r in rows if "loss" in r]
    if train:
        last = train[-1]
        first = next((r for r in train if r["loss"] is not None), last)  # a non-finite loss is logged as null
        lines += [
            f"Training: {last['step']} steps, loss {_fmt(first['loss'])} (step {first['step']}) → "
            f"{_fmt(last['loss']) if last['loss'] is not None else 'non-finite'}"
            + (f", {last['samples_per_s']:.1f} samples/s at the end." if "samples_per_s" in last else "."),
            "",
        ]
    for key, title in (("loss", "Loss"), ("validation", "Validation retrieval")):
        if key in images:
            lines += [f"## {title}", "", f"![{key}]({images[key].name})", ""]
    return lines


def _markdown_eval(ev: dict, images: dict[str, Path]) -> list[str]:
    lines = []
    dirs = (ev.get("retrieval") or {}).get("directions") or {}
    if dirs:
        lines += [
            f"## Retrieval on `{ev.get('shards')}` ({ev.get('num_proteins')} proteins)",
            "",
            "R@k (chance). *multi*: every protein with an identical canonical text counts as a hit.",
            "",
            "| direction | n | R@1 | R@5 | R@10 | R@10 multi | median rank |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in DIRECTIONS:
            d = dirs.get(name) or {}
            if not d.get("n"):
                continue
            cells = [f"{_fmt(d.get(f'R@{k}'))} ({_fmt(d.get(f'chance_R@{k}'))})" for k in (1, 5, 10)]
            multi = f"{_fmt(d.get('R@10_multi'))} ({_fmt(d.get('chance_R@10_multi'))})" if "R@10_multi" in d else "–"
            lines.append(f"| {name} | {d['n']} | " + " | ".join(cells) + f" | {multi} | {d['median_rank']:.0f} |")
        lines.append("")
        if "recall" in images:
            lines += [f"![recall@k]({images['recall'].name})", ""]
    tasks = ev.get("function") or {}
    if tasks:
        lines += ["## Function prediction (CAFA protein-centric Fmax, micro AUPR)", ""]
        lines += ["| task | method | Fmax | threshold | coverage | AUPR |", "| --- | --- | --- | --- | --- | --- |"]
        for task, r in tasks.items():
            if not r.get("methods"):
                lines.append(f"| {task} | {r.get('skipped', 'no methods')} | | | | |")
                continue
            for m in sorted(r["methods"], key=_method_order):
                x = r["methods"][m]
                lines.append(
                    f"| {task} (n={r['n_test']}) | {m} | {_fmt(x.get('fmax'))} | {_fmt(x.get('threshold'), 2)} "
                    f"| {_fmt(x.get('coverage'), 2)} | {_fmt(x.get('aupr'))} |"
                )
        lines.append("")
        for key in ("function_fmax", "function_pr"):
            if key in images:
                lines += [f"![{key}]({images[key].name})", ""]
    fold = ev.get("fold") or {}
    if fold.get("methods"):
        lines += [
            f"## {fold['key']} classification ({fold['n_test']} held-out proteins, {fold['n_classes']} classes)",
            "",
            "| method | accuracy |",
            "| --- | --- |",
        ]
        for m in sorted(fold["methods"], key=_method_order):
            lines.append(f"| {m} | {_fmt(fold['methods'][m]['accuracy'])} |")
        lines += [f"| majority class | {_fmt(fold.get('majority_accuracy'))} |", ""]
        if "fold" in images:
            lines += [f"![fold]({images['fold'].name})", ""]
    elif fold.get("skipped"):
        lines += [f"Fold classification skipped: {fold['skipped']}", ""]
    return lines


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write the plots and ``README.md``; returns the report directory.

    Raises:
        ValueError: ``metrics.jsonl`` or ``eval.json`` is damaged or of another shape (names the file).
        OSError: the report directory cannot be written.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    metrics_path, ev_path = run_dir / "metrics.jsonl", run_dir / "eval.json"
    rows = read_run_metrics(metrics_path)  # both read and checked before anything is written
    ev = read_run_eval(ev_path)
    out.mkdir(parents=True, exist_ok=True)
    with _blame(metrics_path):
        plots = {"loss": plot_loss(rows, out), "validation": plot_validation(rows, out)}
    with _blame(ev_path):
        plots |= {
            "recall": plot_recall(ev, out),
            "function_fmax": plot_function_fmax(ev, out),
            "function_pr": plot_function_pr(ev, out),
            "fold": plot_fold(ev, out),
        }
    images = {k: v for k, v in plots.items() if v is not None}
    with _blame(metrics_path):
        training = _markdown_training(rows, images)
    with _blame(ev_path):
        evaluation = _markdown_eval(ev, images)
    empty = not (any("loss" in r for r in rows) or ev)
    (out / "README.md").write_text(_markdown(run_dir, training, evaluation, empty))
    return out


@contextlib.contextmanager
def _blame(path: Path):
    """Content of an unexpected shape in ``path`` (a key missing, a string where a number belongs, lists
    of unequal length) becomes one ValueError naming the file, not a traceback from deep in the plots."""
    try:
        yield
    except RUN_FILE_ERRORS as e:
        plt.close("all")
        raise ValueError(f"{path}: unexpected content ({type(e).__name__}: {e})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", help="report directory (default: RUN/report)")
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"align-pro report: error: no run directory {args.run_dir}", file=sys.stderr)
        return 2
    try:
        out = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except (OSError, ValueError) as e:  # a damaged metrics.jsonl / eval.json, an --out that is a file
        print(f"align-pro report: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps({"report": str(out), "files": sorted(p.name for p in out.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
