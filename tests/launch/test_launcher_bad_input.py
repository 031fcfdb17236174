"""launch/pretrain.py given bad input of every kind it reads: one line naming the file or field, exit 2.

The entry point runs as one process (``python launch/pretrain.py``, as DeepSpeed starts each rank);
every case here is refused before a process group starts, so nothing trains and nothing is written
into the run directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_OVERRIDES, cpu_env

COMMON = ["train.eval_at_end=false", "data.loader=local"]


def _launch(tmp_path: Path, shards: Path, args: list[str], overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        *args,
        "--set",
        f"data.train_shards={shards / 'train'}",
        "--set",
        f"data.eval_shards={shards / 'heldout'}",
    ]
    for o in [*TINY_OVERRIDES, *COMMON, *overrides]:
        cmd += ["--set", o]
    env = {**cpu_env(), "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _files(tmp_path: Path) -> dict[str, Path]:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  max_stepz: 3\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    odd_json = tmp_path / "odd.json"
    odd_json.write_text(  # contradicts data.batch_size=8
        json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3}})
    )
    bad_stage = tmp_path / "stage.json"
    bad_stage.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {
        "bad_yaml": bad_yaml,
        "list": not_mapping,
        "unknown": unknown,
        "bad_json": bad_json,
        "odd": odd_json,
        "bad_stage": bad_stage,
        "file": a_file,
    }


CASES = [
    # (id, launcher args, overrides, text the one line must contain)
    ("recipe missing", ["--recipe", "{tmp}/absent.yaml"], [], "absent.yaml"),
    ("recipe not YAML", ["--recipe", "{bad_yaml}"], [], "bad.yaml"),
    ("recipe not a mapping", ["--recipe", "{list}"], [], "list.yaml"),
    ("recipe unknown key", ["--recipe", "{unknown}"], [], "train.max_stepz"),
    ("override without =", [], ["train.max_steps"], "train.max_steps"),
    ("override unknown key", [], ["train.max_stepz=3"], "train.max_stepz"),
    ("override wrong type", [], ["train.max_steps=many"], "train.max_steps"),
    ("override not YAML", [], ["train.ks=[1,"], "train.ks"),
    ("override out of range", [], ["data.batch_size=1"], "data.batch_size"),
    ("override not finite", [], ["optim.lr=.nan"], "optim.lr"),
    ("override infinite", [], ["optim.grad_clip=.inf"], "optim.grad_clip"),
    ("DeepSpeed JSON missing", ["--config", "{tmp}/absent.json"], [], "absent.json"),
    ("DeepSpeed JSON not JSON", ["--config", "{bad_json}"], [], "bad.json"),
    ("DeepSpeed JSON contradicts the recipe", ["--config", "{odd}"], [], "train_micro_batch_size_per_gpu"),
    ("DeepSpeed JSON without a ZeRO stage", ["--config", "{bad_stage}"], [], "zero_optimization.stage"),
    ("train shards missing", [], ["data.train_shards={tmp}/nowhere"], "nowhere"),
    ("eval shards missing", [], ["train.eval_at_end=true", "data.eval_shards={tmp}/nowhere"], "data.eval_shards"),
    ("run dir is a file", ["--run-dir", "{file}"], [], "a_file"),
]


def _launch_in_process(monkeypatch, capsys, args: list[str], shards: Path, overrides: list[str]) -> tuple[int, str]:
    """``launch/pretrain.py``'s ``main`` in this process (one import of torch for all cases)."""
    from launch import pretrain as launcher

    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    argv = [*args, "--set", f"data.train_shards={shards / 'train'}", "--set", f"data.eval_shards={shards / 'heldout'}"]
    for o in [*TINY_OVERRIDES, *COMMON, *overrides]:
        argv += ["--set", o]
    code = launcher.main(argv)
    return code, capsys.readouterr().err


def case_arguments(tmp_path: Path, case: tuple) -> tuple[list[str], list[str], str]:
    """(launcher args with a --run-dir, overrides, the text the error line must contain) of a CASES entry,
    its file placeholders filled with files written under ``tmp_path`` (also used for the Ray driver's sweep)."""
    _, args, overrides, needle = case
    names = {"tmp": tmp_path, **_files(tmp_path)}
    fill = [a.format(**names) for a in args]
    if "--run-dir" not in fill:
        fill += ["--run-dir", str(tmp_path / "run")]
    return fill, [o.format(**names) for o in overrides], needle


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, small_demo, case, monkeypatch, capsys):
    fill, overrides, needle = case_arguments(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    code, err = _launch_in_process(monkeypatch, capsys, fill, small_demo, overrides)
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("align-pro: error")]
    assert len(lines) == 1 and needle in lines[0], err[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_entry_point_prints_one_line_and_no_traceback(tmp_path, small_demo):
    """The same through the real script in its own process (what DeepSpeed runs per rank)."""
    p = _launch(tmp_path, small_demo, ["--run-dir", str(tmp_path / "run")], ["optim.lr=.nan"])
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("align-pro: error") and "optim.lr" in lines[-1], p.stderr[-3000:]


def test_a_run_dir_of_another_model_is_refused(tmp_path, small_demo):
    run = tmp_path / "run"
    run.mkdir()
    from pretrain.config import load_config, save_config

    save_config(load_config(overrides=[*TINY_OVERRIDES, "model.embed_dim=32"]), run / "config.yaml")
    p = _launch(tmp_path, small_demo, ["--run-dir", str(run)], [])
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "different model" in p.stderr
