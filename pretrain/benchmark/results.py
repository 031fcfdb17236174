"""Write a benchmark's results: ``results.json``, ``results.md`` (tables with intervals) and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pretrain.benchmark.bootstrap import Interval


def _interval(row: dict) -> Interval:
    return Interval(row["value"], row["low"], row["high"], row["level"], row["resamples"])


def markdown(result: dict) -> str:
    """One table per task: rows = (aspect) method x subset, columns = metrics, cells = value [low, high]."""
    lines = [f"# Benchmark: {result['suite']}", ""]
    lines.append(
        f"Export: `{result['export']}`. Intervals: {result['bootstrap']['level']:.0%} percentile bootstrap "
        f"over test items ({result['bootstrap']['resamples']} resamples, paired across methods)."
    )
    lines.append("")
    for model_row, tasks in result["models"].items():
        label = "aligned model (export)" if model_row == "trained" else "encoders before alignment (base row)"
        for task, out in tasks.items():
            lines.append(f"## {task} ({out['type']}) — {label}")
            lines.append("")
            if not out["rows"]:
                why = {k: v for k, v in out["info"].items() if isinstance(v, str)} or out["info"]
                lines.append(f"No figures: {json.dumps(why)[:300]}")
                lines.append("")
                continue
            metrics = list(dict.fromkeys(r["metric"] for r in out["rows"]))
            keys = list(dict.fromkeys((r.get("aspect", ""), r["method"], r["subset"]) for r in out["rows"]))
            cells = {(r.get("aspect", ""), r["method"], r["subset"], r["metric"]): r for r in out["rows"]}
            has_aspect = any(k[0] for k in keys)
            head = (["aspect"] if has_aspect else []) + ["method", "subset", "n", *metrics]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for key in keys:
                n = next(cells[(*key, m)]["n"] for m in metrics if (*key, m) in cells)
                vals = [_interval(cells[(*key, m)]).text() if (*key, m) in cells else "" for m in metrics]
                lines.append(
                    "| " + " | ".join(([key[0]] if has_aspect else []) + [key[1], key[2], str(n), *vals]) + " |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    """Horizontal bars with interval whiskers (base row in orange), one panel per (task, metric) of the
    "all" subset (per level for classification, per subset for PPI); median ranks are left out (not on a
    0-1 scale); the axis extends below 0 for negative correlations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for model_row, tasks in result["models"].items():
        for task, out in tasks.items():
            for r in out["rows"]:
                if r["subset"] not in ("all",) and out["type"] not in ("classification", "ppi"):
                    continue
                if r["value"] is None or r["metric"] == "median_rank":
                    continue
                aspect = r.get("aspect", "")
                title = f"{task} {aspect if aspect and aspect not in task else ''} {r['metric']}".replace("  ", " ")
                if out["type"] in ("classification", "ppi"):
                    title += f" ({r['subset']})"
                panels.setdefault((title, r["metric"]), []).append((f"{r['method']} [{model_row}]", r))
    if not panels:
        return None
    n = len(panels)
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(
        nrows,
        cols,
        figsize=(5.5 * cols, 0.5 + 0.45 * max(len(v) for v in panels.values()) * nrows + 1.2 * nrows),
        squeeze=False,
    )
    for ax, ((title, _), bars) in zip(axes.ravel(), panels.items()):
        labels = [b[0] for b in bars]
        vals = np.array([b[1]["value"] for b in bars])
        low = np.array([b[1]["low"] if b[1]["low"] is not None else b[1]["value"] for b in bars])
        high = np.array([b[1]["high"] if b[1]["high"] is not None else b[1]["value"] for b in bars])
        y = np.arange(len(bars))
        colors = ["#DD8452" if label.endswith("[base]") else "#4C72B0" for label in labels]  # base row: orange
        ax.barh(y, vals, xerr=[vals - low, high - vals], color=colors, ecolor="black", capsize=3)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(min(0.0, float(np.min(low)) - 0.05), 1)  # correlations (Spearman) may be negative
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(result: dict, out_dir: Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``results.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    paths["markdown"].write_text(markdown(result))
    png = plot(result, out_dir / "results.png")
    if png is not None:
        paths["plot"] = png
    return paths
