"""The ablation table: Markdown rows, its caption, the machine it ran on, and the README section."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from pretrain.ablate.outcomes import COLUMNS
from pretrain.readme_section import replace_section

README_BEGIN = "<!-- ablation-table:begin (python -m pretrain.ablate writes this; do not edit by hand) -->"
README_END = "<!-- ablation-table:end -->"
TEST_NAME = (
    "two-sided seed × protein paired test: the variance of the mean seed-matched difference is its "
    "seed-to-seed spread (as in a paired t-test) plus a paired bootstrap over the held-out proteins "
    "({n_boot} draws, one draw for both rows and all seeds), Student's t with Satterthwaite d.f."
)


def machine_description() -> str:
    """CPU model and core count (or the GPU name), for the table's caption."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model}), no GPU"


def _cell(r, key: str) -> str:
    mean, sd = r.mean.get(key), r.sd.get(key)
    if mean is None:
        return "n/a"
    text = f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
    return text + ("*" if r.tests.get(key, {}).get("significant") else "")


def markdown_table(results: list) -> str:
    """One row per :class:`pretrain.ablate.runs.Result`: weights, steps, seeds, mean ± s.d. of every
    metric (``*``: significant), chance, wall s."""
    keys = [k for k in COLUMNS if any(r.mean.get(k) is not None for r in results)]
    lines = [
        "| variant | weights α/β/γ; intra seq/struct/text; text augment | steps | seeds | "
        + " | ".join(COLUMNS[k] for k in keys)
        + " | chance R@10 | wall s |",
        "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " | ---: | ---: |",
    ]
    for r in results:
        chance = "n/a" if r.chance_r10 is None else f"{r.chance_r10:.4f}"
        cells = " | ".join([_cell(r, k) for k in keys] + [chance, "n/a" if r.wall_s is None else f"{r.wall_s:.0f}"])
        lines.append(f"| `{r.variant}` | {r.weights} | {r.steps} | {len(r.seeds)} | {cells} |")
    return "\n".join(lines)


def differences_table(results: list, reference: str, alpha: float) -> str:
    """Per variant and column: the mean difference from ``reference``, its 1 - alpha interval and p."""
    keys = [k for k in COLUMNS if any(r.tests.get(k, {}).get("p") is not None for r in results)]
    level = f"{100 * (1 - alpha):g} %"
    lines = [
        f"| Δ vs `{reference}` (p, {level} interval) | " + " | ".join(COLUMNS[k] for k in keys) + " |",
        "| --- | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for r in results:
        if not r.tests:
            continue
        cells = []
        for k in keys:
            t = r.tests.get(k) or {}
            if t.get("p") is None:
                cells.append("n/a")
                continue
            ci = t.get("ci")
            interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
            cells.append(f"{t['mean_diff']:+.3f} (p {t['p']:.2g}){interval}")
        lines.append(f"| `{r.variant}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caption(*, machine, ranks, seeds, overrides, reference, alpha, n_boot, method, base_recipe) -> str:
    """The table's caption: where and how it was measured and exactly which test marks ``*``."""
    test = (
        f"Cells are mean ± s.d. over the seeds; `*` marks a difference from `{reference}` significant at "
        f"p < {alpha:g} by a {TEST_NAME.format(n_boot=n_boot)} (the second table gives each difference, p and "
        f"{100 * (1 - alpha):g} % interval); unmarked differences are not significant. "
        if len(seeds) > 1
        else "One seed: no spread and no significance test (a paired test needs two seeds or more). "
    )
    return (
        f"Measured by `python -m pretrain.ablate` on a {machine}, {ranks} rank(s) per "
        f"run, seeds {seeds[0]}..{seeds[-1]} per variant, overrides: "
        f"{', '.join(f'`{o}`' for o in overrides) or 'none'}. "
        + test
        + "R@10 is exact-pair retrieval on the held-out proteins (mean of both directions per pair); Fmax and "
        f"fold accuracy are `{method}` probes trained on the training shards"
        + (f"; `base` is `{base_recipe}` before training (its encoders, random heads)" if base_recipe else "")
        + "; wall s is training + evaluation by the launcher."
    )


def write_readme(section: str, readme: Path) -> None:
    """Replace the text between the ablation markers (append a section when there are none)."""
    replace_section(readme, section, README_BEGIN, README_END, "### Ablations (measured)")
