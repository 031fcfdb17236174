"""pretrain.engine.zero_consolidate: a ZeRO checkpoint consolidated without DeepSpeed, bit for bit.

The checkpoints are real: the Trainer on 2 spawned gloo ranks (ZeRO-3 and ZeRO-2, CPU, torch Adam)
trains 2 steps, saving at step 1 (encoders frozen: stage 1 of the schedule) and step 2, then exports
the engine's gathered parameters. The consolidation then runs in a subprocess where ``import
deepspeed`` fails, and must equal both DeepSpeed's own ``zero_to_fp32`` and the engine's export.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.engine.zero_consolidate import (
    UnsafeCheckpointError,
    ZeroCheckpointError,
    consolidate_zero_checkpoint,
)
from tests.conftest import free_port
from tests.pretrain.engine.trainer_ranks import train_rank
from tests.spawn_ranks import run_ranks

WORLD = 2
TIMEOUT_S = 300.0
REPO = Path(__file__).resolve().parents[3]


def _worker(rank: int, port: int, out: str, shards: str, run_dir: str, ds_json: str) -> None:
    over = ["train.max_steps=2", "train.stage1_steps=1", "train.checkpoint_every=1"]
    train_rank(rank, WORLD, port, out, shards, run_dir, ds_json, over, write_config=True)


def _trained_run(tmp_path_factory, shards: Path, stage: int) -> Path:
    out = tmp_path_factory.mktemp(f"zero{stage}")
    run_dir = out / "run"
    port = free_port()
    args = (str(out), str(shards), str(run_dir), f"zero{stage}.json")
    run_ranks(_worker, lambda r: (r, port, *args), WORLD, out, TIMEOUT_S, "rank")
    return run_dir


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, small_demo) -> Path:
    return _trained_run(tmp_path_factory, small_demo, 3)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, small_demo) -> Path:
    return _trained_run(tmp_path_factory, small_demo, 2)


def _no_deepspeed_env(tmp_path: Path) -> dict:
    """An environment whose Python cannot import deepspeed (a sitecustomize blocks it)."""
    shim = tmp_path / "no_deepspeed"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(REPO)])
    return env


_CONSOLIDATE = """
import sys, torch
try:
    import deepspeed
except ImportError:
    pass
else:
    raise SystemExit("deepspeed is importable: the shim failed")
from pretrain.engine.zero_consolidate import consolidate_zero_checkpoint
state = consolidate_zero_checkpoint(sys.argv[1])
torch.save({k: v.clone() for k, v in state.items()}, sys.argv[2])
assert not any(m == "deepspeed" or m.startswith("deepspeed.") for m in sys.modules if sys.modules[m] is not None)
"""


def _consolidate_without_deepspeed(tag_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{tag_dir.name}.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _CONSOLIDATE, str(tag_dir), str(out)],
        env=_no_deepspeed_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _deepspeeds_own(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain.engine.checkpoint_safety import weights_only_loads

    with weights_only_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _assert_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:10]
    for k, v in want.items():
        assert got[k].dtype == torch.float32 or not got[k].is_floating_point(), k
        assert torch.equal(got[k].float(), v.float()), k


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["step00000001", "step00000002"])
def test_zero3_consolidation_without_deepspeed_equals_deepspeeds_own(zero3_run, tmp_path, tag):
    """Step 1 was saved with the encoders frozen (their values in the frozen fragments), step 2 trained."""
    from pretrain.engine.zero_consolidate import load_checkpoint_file

    ckpt = zero3_run / "checkpoints"
    got = _consolidate_without_deepspeed(ckpt / tag, tmp_path)
    _assert_identical(got, _deepspeeds_own(ckpt, tag))
    frozen = load_checkpoint_file(ckpt / tag / "zero_pp_rank_1_mp_rank_00_model_states.pt")["frozen_param_shapes"]
    assert bool(frozen) == (tag == "step00000001")  # stage 1 froze the encoders: their own code path


@pytest.mark.slow
def test_zero3_consolidation_equals_the_engines_gathered_export(zero3_run, tmp_path):
    from safetensors.torch import load_file

    got = _consolidate_without_deepspeed(zero3_run / "checkpoints" / "step00000002", tmp_path)
    exported = load_file(str(zero3_run / "export" / "model.safetensors"))  # the engine's gathered params
    _assert_identical({k: got[k] for k in exported}, exported)
    first = consolidate_zero_checkpoint(zero3_run / "checkpoints" / "step00000001")
    assert any(not torch.equal(first[k], v) for k, v in exported.items()), "step 2 must have trained"


@pytest.mark.slow
def test_export_command_works_without_deepspeed(zero3_run, tmp_path):
    """``python -m pretrain.export --run-dir RUN`` (and ``--format hf``) on a machine without DeepSpeed."""
    from safetensors.torch import load_file

    from pretrain.engine.export import export_step

    out = tmp_path / "offline"
    cmd = [sys.executable, "-m", "pretrain.export", "--run-dir", str(zero3_run), "--out", str(out), "--format", "hf"]
    proc = subprocess.run(cmd, env=_no_deepspeed_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = load_file(str(zero3_run / "export" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    _assert_identical(got, want)
    assert export_step(out) == 2
    assert (tmp_path / "offline_hf" / "sequence" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["step00000001", "step00000002"])
def test_zero2_consolidation_without_deepspeed_equals_deepspeeds_own(zero2_run, tmp_path, tag):
    ckpt = zero2_run / "checkpoints"
    got = _consolidate_without_deepspeed(ckpt / tag, tmp_path)
    _assert_identical(got, _deepspeeds_own(ckpt, tag))
    if tag == "step00000002":
        from safetensors.torch import load_file

        exported = load_file(str(zero2_run / "export" / "model.safetensors"))
        _assert_identical({k: got[k] for k in exported}, exported)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_carrying_a_pickle_payload_is_refused_by_name(tmp_path):
    tag = tmp_path / "step00000001"
    tag.mkdir()
    marker = tmp_path / "payload_ran"
    torch.save(
        {"optimizer_state_dict": {"zero_stage": 3, "partition_count": 1, "x": _Payload(marker)}},
        tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    with pytest.raises(UnsafeCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        consolidate_zero_checkpoint(tag)
    assert not marker.exists()


def test_a_missing_rank_file_is_named(tmp_path):
    tag = tmp_path / "step00000001"
    tag.mkdir()
    flat = {"optimizer_state_dict": {"zero_stage": 3, "partition_count": 2, "fp32_flat_groups": [torch.zeros(2)]}}
    torch.save(flat, tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(ZeroCheckpointError, match=r"ranks \[1\]: some rank's file is missing"):
        consolidate_zero_checkpoint(tag)
    torch.save(flat, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ZeroCheckpointError, match="0 model state files, 2 ranks"):
        consolidate_zero_checkpoint(tag)
    with pytest.raises(FileNotFoundError):
        consolidate_zero_checkpoint(tmp_path / "absent")


def test_a_zero0_checkpoint_exports_its_fp32_module_and_refuses_a_rounded_one(tmp_path):
    from pretrain.engine.export import consolidate_checkpoint

    tag = tmp_path / "step00000001"
    tag.mkdir()
    module = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    torch.save({"module": module, "buffer_names": []}, tag / "mp_rank_00_model_states.pt")
    got = consolidate_checkpoint(tag)
    assert got.keys() == module.keys() and all(torch.equal(got[k], module[k]) for k in module)
    torch.save({"module": {"w": torch.randn(3, 2).bfloat16()}}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ZeroCheckpointError, match="bf16/fp16 run holds rounded weights"):
        consolidate_checkpoint(tag)
