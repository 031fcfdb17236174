"""End-to-end: the real DeepSpeed launcher, 2 gloo ranks on CPU, Ray readers, ZeRO stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_OVERRIDES, cpu_env, launcher_cmd, run_launcher

pytestmark = pytest.mark.slow

TERMS = [
    "loss_seq_struct",
    "loss_seq_text",
    "loss_struct_text",
    "loss_intra_seq",
    "loss_intra_struct",
    "loss_intra_text",
]


def _metrics(run_dir, kind="loss"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if kind in r]


def test_two_rank_zero3_ray_smoke_resume_and_eval(tmp_path, small_demo, monkeypatch, capsys):
    run = tmp_path / "run"
    over = [
        "train.max_steps=4",
        "train.stage1_steps=2",
        "train.checkpoint_every=2",
        "data.loader=ray",
        "train.validate_every=2",
        "eval.validation_samples=48",
    ]
    p = run_launcher(run, small_demo, over)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in ["loss", "lr", "samples_per_s", "stage", *TERMS]:
            assert key in r and r[key] == r[key], key  # present and not NaN
    assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    val = _metrics(run, "val/mean_R@10")
    assert [r["step"] for r in val] == [2, 4]
    best = json.loads((run / "best_checkpoint.json").read_text())  # validation's default selection
    assert best["step"] in (2, 4) and (best["metric"], best["mode"]) == ("val/mean_R@10", "max")
    assert not (run / "best.json").exists() and (run / "export" / "best" / "config.yaml").is_file()
    assert (run / "tensorboard").is_dir()
    assert (run / "checkpoints" / "latest").read_text() == "step00000004"
    assert (run / "export" / "model.safetensors").is_file()
    ev = json.loads((run / "eval.json").read_text())
    assert len(ev["retrieval"]["directions"]) == 6
    assert "step 4/4" in p.stdout

    # The same command again reports the finished run instead of retraining. That answer comes before
    # any process group or Ray, so the launcher script's main() gives it here, in this process, with
    # the command's arguments: no DeepSpeed launcher, no two ranks, no interpreter start (a launch
    # costs tens of seconds on 2 cores). Should main() go on to start a process group (a finished run
    # retrained), the test fails there instead of training inside pytest. The 2-rank form of the
    # check: test_resume.py's test_a_run_killed_after_its_final_checkpoint_exports_on_relaunch.
    from launch import pretrain as launcher

    def no_process_group():
        raise AssertionError("a finished run went on to start a process group")

    monkeypatch.setattr(launcher, "init_process_group", no_process_group)
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "token"))  # as the import sets it
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    sigint = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    try:
        code = launcher.main(launcher_cmd([], run, small_demo, over)[2:])  # the arguments after the script
    finally:
        signal.signal(signal.SIGINT, sigint)  # main() makes the first Ctrl-C a graceful stop
    again = capsys.readouterr()
    assert code == 0 and "already finished at step 4" in again.out, again.err[-3000:]

    # A longer run in the same directory resumes from step 4 (one step more is enough to show it; the
    # evaluation at the end was checked above).
    longer = run_launcher(run, small_demo, ["train.max_steps=5", *over[1:], "train.eval_at_end=false"])
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert "resumed from step 4" in longer.stdout
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("zero", ["zero1.json", "zero2.json", "zero3.json"])
def test_stage1_keeps_encoders_bit_identical(tmp_path, small_demo, zero):
    from pretrain.config import load_config
    from pretrain.engine.schedule import seed_everything
    from pretrain.models.trimodal import TriModalModel

    run = tmp_path / "run"
    over = ["train.max_steps=2", "train.stage1_steps=2", "train.eval_at_end=false", "data.loader=local"]
    p = run_launcher(run, small_demo, over, config=zero)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cfg = load_config(overrides=TINY_OVERRIDES + over)
    seed_everything(cfg.train.seed)
    init = TriModalModel(cfg.model).state_dict()
    trained = load_file(str(run / "export" / "model.safetensors"))
    encoders = [k for k in init if k.split(".")[0].endswith("_encoder")]
    heads = [k for k in init if k.startswith("heads.")]
    assert encoders and heads
    for k in encoders:
        assert torch.equal(init[k], trained[k]), f"{k} changed during stage 1"
    assert any(not torch.equal(init[k], trained[k]) for k in heads), "heads did not train"
    # `python -m pretrain.export --run-dir` consolidates the sharded checkpoint offline (DeepSpeed's
    # zero_to_fp32 under weights-only loads) into the same weights the engine exported.
    from pretrain.engine.export import export_checkpoint

    offline = load_file(str(export_checkpoint(run, out_dir=tmp_path / "offline") / "model.safetensors"))
    assert offline.keys() == trained.keys()
    for k in trained:
        assert torch.equal(offline[k], trained[k]), k


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bogus=1", "unknown config key 'train.bogus'"),
        ("data.train_shards=/nonexistent/shards", "/nonexistent/shards"),
        ("data.batch_size=100000", "data.batch_size=100000 is impossible"),
    ],
)
def test_bad_configuration_fails_before_any_process_group(tmp_path, small_demo, override, message):
    cmd = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"data.train_shards={small_demo / 'train'}",
        "--set",
        f"data.eval_shards={small_demo / 'heldout'}",
        "--set",
        override,
    ]
    p = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert message in p.stderr
    assert p.stderr.count("align-pro: error") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "rank, local_rank, printed",
    [(0, 0, "align-pro: error: "), (8, 0, "align-pro: error (rank 8): "), (9, 1, None)],
)
def test_config_errors_are_printed_once_per_node(monkeypatch, capsys, tmp_path, rank, local_rank, printed):
    """Rank 0 prints the error, and so does the first rank of every other node (its files and environment
    may differ: a missing mount is only that node's error); the other ranks of a node stay quiet."""
    from launch import pretrain as launcher

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "16")
    argv = ["--run-dir", str(tmp_path / "run"), "--set", "data.train_shards=/missing/on/this/node"]
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err
    if printed is None:
        assert err == ""
    else:
        assert err.count("align-pro: error") == 1 and printed in err and "/missing/on/this/node" in err
