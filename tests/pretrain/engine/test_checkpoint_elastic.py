"""pretrain.engine.checkpoint elastic load: a checkpoint of N ranks resumes on M ranks through DeepSpeed's
universal checkpoint conversion (real ZeRO engines on spawned gloo ranks, tiny model)."""

from __future__ import annotations

import json
import os
import pickle
import traceback
from pathlib import Path

import pytest
import torch

from pretrain.engine import checkpoint, checkpoint_universal
from pretrain.run import close_process_group
from tests.conftest import free_port
from tests.pretrain.engine.test_checkpoint import _params  # full fp32 weights, ZeRO-3 gathered
from tests.spawn_ranks import run_ranks

TIMEOUT_S = 240.0


def _engine(stage: int, world: int, ckpt_dir: Path):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    groups = [
        {"params": list(model[0].parameters()), "name": "encoder_first"},
        {"params": list(model[2].parameters()), "name": "head"},
    ]
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 2 * world,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
    }
    cfg = checkpoint_universal.engine_config(cfg, ckpt_dir, world)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    return engine


def _train_step(engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loss = engine(torch.randn(2, 16, generator=g)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _worker(rank: int, world: int, port: int, out: str, ckpt: str, stage: int, step: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from pretrain.run import init_process_group

        init_process_group()
        ckpt_dir = Path(ckpt)
        engine = _engine(stage, world, ckpt_dir)
        resumed = checkpoint.load(engine, ckpt_dir)
        result = {"names": [g["name"] for g in engine.optimizer.param_groups]}
        if resumed is not None:
            client, rank_state = resumed
            result.update(client_step=client["step"], client_world=client["world_size"], rank_state=rank_state)
            result["loaded"] = _params(engine, stage)
        for s in range(step + 1, step + 3):
            _train_step(engine, seed=1000 * s + rank)
        cursor = {"epoch": 0, "batch": step + 2}  # ranks step together: one cursor for all
        checkpoint.save(
            engine, ckpt_dir, step + 2, {"step": step + 2, "world_size": world}, {"cursor": cursor, "rng": {}}, keep=5
        )
        result["saved"] = _params(engine, stage)
        torch.save(result, Path(out) / f"{stage}_{step}_{world}_rank{rank}.pt")
    except Exception:  # noqa: BLE001 - reported to the parent
        (Path(out) / f"{stage}_{step}_{world}_rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        close_process_group()  # else gloo threads can abort the exit (-6)


def _run(tmp_path: Path, ckpt: Path, stage: int, world: int, step: int) -> list[dict]:
    port = free_port()
    return run_ranks(
        _worker,
        lambda r: (r, world, port, str(tmp_path), str(ckpt), stage, step),
        world,
        tmp_path,
        TIMEOUT_S,
        f"{stage}_{step}_{world}_rank",
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_resume_on_one_then_two_through_universal_checkpoints(tmp_path, stage):
    ckpt = tmp_path / "ckpt"
    first = _run(tmp_path, ckpt, stage, world=2, step=0)  # 2 ranks: steps 1-2, checkpoint step2
    assert "loaded" not in first[0]
    one = _run(tmp_path, ckpt, stage, world=1, step=2)  # 1 rank resumes it: steps 3-4, checkpoint step4
    assert one[0]["client_step"] == 2 and one[0]["client_world"] == 2
    for name, want in first[0]["saved"].items():
        assert torch.equal(one[0]["loaded"][name], want), name  # fp32 weights survive the conversion exactly
    assert one[0]["names"] == ["encoder_first", "head"]  # group names kept (ZeRO-3 copies group 0's)
    assert one[0]["rank_state"]["cursors"] == [{"epoch": 0, "batch": 2}] * 2
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
    assert tags == ["step00000002", "step00000002_universal", "step00000004"]
    marker = json.loads((ckpt / "step00000002_universal" / checkpoint_universal.UNIVERSAL_COMPLETE).read_text())
    assert marker["source"] == "step00000002" and marker["world_size"] == 2
    assert (ckpt / "latest").read_text() == "step00000004"
    assert not list(ckpt.glob(".*tmp*"))  # the conversion's work directory is gone

    two = _run(tmp_path, ckpt, stage, world=2, step=4)  # and back: 1 -> 2 ranks
    for r in range(2):
        assert two[r]["client_world"] == 1 and two[r]["names"] == ["encoder_first", "head"]
        for name, want in one[0]["saved"].items():
            assert torch.equal(two[r]["loaded"][name], want), (r, name)
        assert two[r]["rank_state"]["cursors"] == [{"epoch": 0, "batch": 4}]


@pytest.mark.slow
def test_a_zero0_checkpoint_resumes_on_another_number_of_ranks_directly(tmp_path):
    """ZeRO-0 keeps whole copies: no universal conversion (an engine built for one would fail)."""
    ckpt = tmp_path / "ckpt"
    first = _run(tmp_path, ckpt, 0, world=2, step=0)
    one = _run(tmp_path, ckpt, 0, world=1, step=2)
    assert one[0]["client_step"] == 2 and one[0]["client_world"] == 2
    for name, want in first[0]["saved"].items():
        assert torch.equal(one[0]["loaded"][name], want), name
    assert one[0]["rank_state"]["cursors"] == [{"epoch": 0, "batch": 2}] * 2
    assert not (ckpt / "step00000002_universal").exists()


@pytest.mark.slow
def test_offline_conversion_is_reused_by_the_elastic_resume(tmp_path, capsys):
    from pretrain.convert_checkpoint import main as convert

    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    first = _run(tmp_path, ckpt, 2, world=2, step=0)
    assert convert([str(run)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["source"] == "step00000002" and report["written_by_ranks"] == 2
    universal = ckpt / "step00000002_universal"
    assert report["universal"] == str(universal)
    before = (universal / checkpoint_universal.UNIVERSAL_COMPLETE).stat()
    one = _run(tmp_path, ckpt, 2, world=1, step=2)
    assert one[0]["client_step"] == 2
    for name, want in first[0]["saved"].items():
        assert torch.equal(one[0]["loaded"][name], want), name
    after = (universal / checkpoint_universal.UNIVERSAL_COMPLETE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused, not redone
    # Errors are one JSON line and exit 2: no checkpoint, a tag that is not complete.
    (tmp_path / "empty").mkdir()
    assert convert([str(tmp_path / "empty")]) == 2
    assert "no complete checkpoint" in json.loads(capsys.readouterr().out)["error"]
    assert convert([str(tmp_path / "absent")]) == 2
    assert "does not exist" in json.loads(capsys.readouterr().out)["error"]
    assert convert([str(run), "--tag", "step00000003"]) == 2
    assert "not a complete checkpoint" in json.loads(capsys.readouterr().out)["error"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.slow
def test_a_tampered_universal_conversion_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    _run(tmp_path, ckpt, 2, world=2, step=0)
    _run(tmp_path, ckpt, 2, world=1, step=2)  # converts step00000002
    # Pretend step4 never happened, and plant a pickle payload inside the conversion.
    (ckpt / "latest").write_text("step00000002")
    import shutil

    shutil.rmtree(ckpt / "step00000004")
    victim = next((ckpt / "step00000002_universal" / "zero").glob("*/fp32.pt"))
    victim.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(AssertionError, match="refusing checkpoint file"):
        _run(tmp_path, ckpt, 2, world=1, step=2)
