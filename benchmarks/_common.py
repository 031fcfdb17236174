"""What the benchmark scripts share: the machine's name, timing a step, the bytes autograd saves for the
backward, and writing a BENCHMARKS.md section (printed, appended to a file, raw results as JSON).

The scripts import it as ``from _common import ...`` with this folder on ``sys.path`` (a script run as
``python benchmarks/x.py`` has it there already).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo and the number of cores this process may use."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def machine_name(device, given: str | None = None) -> str:
    """``given``, else the GPU's name on a CUDA ``device``, else :func:`cpu_name`."""
    if given:
        return given
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return cpu_name()


def command_line(script: str, argv: list[str] | None) -> str:
    """``python SCRIPT ARGS`` as run: ``argv`` when main was called with it, else the process's arguments."""
    import sys

    return f"python {script} " + " ".join(sys.argv[1:] if argv is None else argv)


def time_runs(step: Callable[[], object], repeats: int) -> dict:
    """Wall seconds of ``repeats`` calls of ``step()`` after one untimed warm-up call.

    Returns:
        {"median_s", "min_s", "max_s", "times_s": [seconds per call]}.
    """
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def saved_activation_bytes(run: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of distinct storages autograd saves while ``run()`` builds its graph.

    Args:
        run: builds the forward graph (its result is kept alive until the count is taken).
        exclude: storage data pointers not to count (the model's parameters).
    """
    import torch

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(storages.values())


def parameter_storages(module) -> set[int]:
    """Storage data pointers of ``module``'s parameters (the ``exclude`` of :func:`saved_activation_bytes`)."""
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def markdown_section(title: str, intro: Iterable[str], table: Iterable[str], tail: Iterable[str] = ()) -> str:
    """A BENCHMARKS.md section: ``## TITLE (today's date)``, the intro lines, a blank line, the table's
    lines (header, separator, rows) and the tail lines; it ends with a newline."""
    return "\n".join([f"## {title} ({datetime.date.today().isoformat()})", "", *intro, "", *table, *tail]) + "\n"


def publish(text: str, out: Path | None, json_path: Path | None = None, payload: dict | None = None) -> None:
    """Print the section ``text``, append it to ``out`` after a blank line, and write ``payload`` as JSON
    to ``json_path`` (each only when given)."""
    print(text)
    if out:
        with open(out, "a") as fh:
            fh.write("\n" + text)
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=2))
