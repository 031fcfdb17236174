"""The Ray Train driver (launch.ray_job) given bad input: one line naming the file, field or option, exit 2.

It validates the same recipe, overrides, DeepSpeed JSON and run directory as
launch/pretrain.py (the same cases as tests/launch/test_launcher_bad_input.py) before it starts
Ray, plus its own options. ``_run`` (which starts Ray) is replaced by a guard that fails the test,
so a case that slipped through validation cannot start a cluster on the CI machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES
from tests.launch.test_launcher_bad_input import CASES, COMMON, case_arguments

OPTION_CASES = [
    # (id, driver args, text argparse's message must contain)
    ("no workers", ["--num-workers", "0"], "--num-workers"),
    ("workers not a number", ["--num-workers", "two"], "--num-workers"),
    ("negative restarts", ["--max-failures", "-1"], "--max-failures"),
    ("no CPUs", ["--num-cpus", "0"], "--num-cpus"),
    ("unknown placement", ["--placement-strategy", "ANYWHERE"], "--placement-strategy"),
]


def _argv(args: list[str], shards: Path, overrides: list[str]) -> list[str]:
    argv = [*args, "--num-workers", "1"] if "--num-workers" not in args else list(args)
    argv += ["--set", f"data.train_shards={shards / 'train'}", "--set", f"data.eval_shards={shards / 'heldout'}"]
    for o in [*TINY_OVERRIDES, *COMMON, *overrides]:
        argv += ["--set", o]
    return argv


@pytest.fixture
def driver(monkeypatch):
    from launch import ray_job

    def must_not_start(args, plan):
        raise AssertionError(f"bad input reached Ray (run dir {plan.run_dir})")

    monkeypatch.setattr(ray_job, "_run", must_not_start)
    return ray_job


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, small_demo, case, driver, monkeypatch, capsys):
    fill, overrides, needle = case_arguments(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    code = driver.main(_argv(fill, small_demo, overrides))
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("align-pro: error")]
    assert len(lines) == 1 and needle in lines[0], err[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_driver_options_exit_2_naming_the_option(tmp_path, small_demo, case, driver, capsys):
    _, args, needle = case
    with pytest.raises(SystemExit) as stop:
        driver.main(_argv([*args, "--run-dir", str(tmp_path / "run")], small_demo, []))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and needle in err, err[-3000:]
    assert not (tmp_path / "run").exists()
