"""pretrain.engine.checkpoint: failed writes leave the previous checkpoint intact; hostile files are refused.

The write-failure tests run a real DeepSpeed ZeRO engine on 2 spawned gloo ranks. One test fills a
real (tiny, freshly mounted) tmpfs so the second save meets ENOSPC; it is skipped where this
machine may not mount file systems. The other injects the error on one rank only, which is the
case that would hang a naive implementation (the healthy rank waiting in a barrier).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pickle
import signal
import time
import traceback
import uuid
from pathlib import Path

import pytest
import torch

from pretrain.engine import checkpoint, checkpoint_safety
from pretrain.run import close_process_group
from tests.conftest import free_port, mount_small_tmpfs, unmount
from tests.spawn_ranks import run_ranks

WORLD = 2
TIMEOUT_S = 180.0


def _engine(stage: int):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 2 * WORLD,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _train_step(engine) -> None:
    x = torch.randn(2, 16)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _params(engine, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _failing_save(real_save, fail_on: str):
    """torch.save that writes part of the file, then fails like a full disk, for matching paths."""

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and fail_on in os.fspath(f):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(f))
        return real_save(obj, f, *args, **kwargs)

    return save


def _worker(rank: int, port: int, out: str, ckpt: str, stage: int, mode: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from pretrain.run import init_process_group

        init_process_group()
        ckpt_dir = Path(ckpt)
        engine = _engine(stage)
        _train_step(engine)
        checkpoint.save(engine, ckpt_dir, 1, {"step": 1}, {"cursor": {"epoch": 0, "batch": 1}}, keep=2)
        saved = _params(engine, stage)
        _train_step(engine)
        if mode == "killed_mid_save":
            torch.save(saved, Path(out) / f"saved{rank}.pt")
            if rank == 1:  # dies half-way through writing its step-2 files, like a SIGKILL or OOM
                real_save = torch.save

                def save_then_die(obj, f, *args, **kwargs):
                    if isinstance(f, (str, os.PathLike)) and "step00000002" in os.fspath(f):
                        Path(f).write_bytes(b"PK\x03\x04 partial")
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real_save(obj, f, *args, **kwargs)

                torch.save = save_then_die
            checkpoint.save(engine, ckpt_dir, 2, {"step": 2}, {"cursor": {"epoch": 0, "batch": 2}}, keep=2)
            return  # not reached: rank 1 is killed, rank 0 fails on the lost connection or is killed
        if mode == "one_rank_enospc" and rank == 1:
            torch.save = _failing_save(torch.save, "step00000002")
        elif mode == "script_copy_enospc" and rank == 0:
            # DeepSpeed's rank 0 copies zero_to_fp32.py (into ckpt_dir, over step 1's copy) with
            # shutil.copyfile, outside the checkpoint engine: on a full disk that copy can be the
            # write that fails. Here it writes half of the file, then fails.
            import deepspeed.runtime.engine as ds_engine

            def copyfile(src, dst):
                Path(dst).write_text(Path(src).read_text()[:100])
                raise OSError(errno.ENOSPC, "No space left on device", os.fspath(dst))

            ds_engine.copyfile = copyfile
        elif mode == "publish_fails" and rank == 0:
            real_replace = os.replace

            def replace(src, dst):
                if os.fspath(dst).endswith(checkpoint.COMPLETE):
                    raise OSError(errno.EIO, "Input/output error", os.fspath(dst))
                return real_replace(src, dst)

            os.replace = replace
        elif mode == "disk_full" and rank == 0:
            # Fill what is left of the small file system: the next save cannot fit.
            with open(ckpt_dir / "ballast", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
        torch.distributed.barrier()
        error = ""
        try:
            checkpoint.save(engine, ckpt_dir, 2, {"step": 2}, {"cursor": {"epoch": 0, "batch": 2}}, keep=2)
        except checkpoint.CheckpointWriteError as e:
            error = str(e)
        if mode == "disk_full" and rank == 0:
            (ckpt_dir / "ballast").unlink()
        torch.distributed.barrier()
        # The surviving checkpoint loads into a fresh engine and holds the step-1 weights.
        fresh = _engine(stage)
        client, rank_state = checkpoint.load(fresh, ckpt_dir)
        torch.save(
            {
                "error": error,
                "latest": (ckpt_dir / "latest").read_text(),
                "tags": sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()),
                "client_step": client["step"],
                "cursor": rank_state["cursor"],
                "saved": saved,
                "loaded": _params(fresh, stage),
            },
            Path(out) / f"rank{rank}.pt",
        )
    except Exception:  # noqa: BLE001 - reported to the parent
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        close_process_group()  # else gloo threads can abort the exit (-6)


def _run(tmp_path: Path, ckpt: Path, stage: int, mode: str) -> list[dict]:
    port = free_port()
    return run_ranks(
        _worker, lambda r: (r, port, str(tmp_path), str(ckpt), stage, mode), WORLD, tmp_path, TIMEOUT_S, "rank"
    )


def _assert_previous_checkpoint_intact(results: list[dict], ckpt: Path, needle: str) -> None:
    for rank, res in enumerate(results):
        assert "was not saved" in res["error"], rank  # every rank is told, none hangs
        assert "latest still names step00000001" in res["error"]
        assert res["latest"] == "step00000001"
        assert res["tags"] == ["step00000001"], "the partial checkpoint must be removed"
        assert res["client_step"] == 1 and res["cursor"] == {"epoch": 0, "batch": 1}
        for name, want in res["saved"].items():
            assert torch.equal(res["loaded"][name], want), name
    assert any(needle in res["error"] for res in results)
    assert checkpoint.latest_tag(ckpt) == "step00000001"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_one_rank_failing_to_write_keeps_the_previous_checkpoint(tmp_path, stage):
    ckpt = tmp_path / "ckpt"
    results = _run(tmp_path, ckpt, stage, "one_rank_enospc")
    _assert_previous_checkpoint_intact(results, ckpt, "No space left on device")
    assert "another rank failed" in results[0]["error"]  # rank 0 wrote fine and says so


@pytest.mark.slow
def test_failing_to_copy_the_recovery_script_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    script = ckpt / "zero_to_fp32.py"
    results = _run(tmp_path, ckpt, 3, "script_copy_enospc")
    _assert_previous_checkpoint_intact(results, ckpt, "zero_to_fp32.py: [Errno 28] No space left on device")
    import deepspeed.utils

    assert script.read_text() == (Path(deepspeed.utils.__file__).parent / "zero_to_fp32.py").read_text()
    assert not list(ckpt.glob(".recovery_scripts*")), "the temporary copy must be removed"


@pytest.mark.slow
def test_failing_to_publish_keeps_latest(tmp_path):
    ckpt = tmp_path / "ckpt"
    results = _run(tmp_path, ckpt, 3, "publish_fails")
    _assert_previous_checkpoint_intact(results, ckpt, "publishing failed")


def _load_worker(rank: int, port: int, out: str, ckpt: str, stage: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from pretrain.run import init_process_group

        init_process_group()
        fresh = _engine(stage)
        client, rank_state = checkpoint.load(fresh, Path(ckpt))
        torch.save({"client_step": client["step"], "loaded": _params(fresh, stage)}, Path(out) / f"load{rank}.pt")
    except Exception:  # noqa: BLE001 - reported to the parent
        (Path(out) / f"load{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        close_process_group()  # else gloo threads can abort the exit (-6)


@pytest.mark.slow
def test_a_rank_killed_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, port, str(tmp_path), str(ckpt), 3, "killed_mid_save"), daemon=True)
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:  # a survivor stuck in a collective is what a launcher would kill
        if p.is_alive():
            p.kill()
            p.join(10)
    assert procs[1].exitcode == -signal.SIGKILL
    assert (ckpt / "latest").read_text() == "step00000001"
    assert (ckpt / "step00000002").is_dir() and not (ckpt / "step00000002" / checkpoint.COMPLETE).exists()
    assert checkpoint.latest_tag(ckpt) == "step00000001"
    port = free_port()
    loaded = run_ranks(
        _load_worker, lambda r: (r, port, str(tmp_path), str(ckpt), 3), WORLD, tmp_path, TIMEOUT_S, "load"
    )
    for rank, res in enumerate(loaded):
        saved = torch.load(tmp_path / f"saved{rank}.pt")
        assert res["client_step"] == 1
        for name, want in saved.items():
            assert torch.equal(res["loaded"][name], want), name


@pytest.fixture
def small_filesystem(tmp_path):
    """A 6 MiB tmpfs mounted for the test (the injected-ENOSPC test covers machines that cannot mount)."""
    mnt = mount_small_tmpfs(tmp_path / "small_fs", "6m")
    yield mnt
    unmount(mnt)


@pytest.mark.slow
def test_real_disk_full_keeps_the_previous_checkpoint(tmp_path, small_filesystem):
    ckpt = small_filesystem / "ckpt"
    results = _run(tmp_path, ckpt, 3, "disk_full")
    _assert_previous_checkpoint_intact(results, ckpt, "MiB free on its file system")


# --------------------------------------------------------------------------- hostile files


class _Payload:
    """Unpickling this runs a command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _complete_checkpoint(ckpt_dir: Path, tag: str = "step00000001") -> Path:
    d = ckpt_dir / tag
    d.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, d / "mp_rank_00_model_states.pt")
    torch.save({"cursor": {"epoch": 0, "batch": 1}}, d / "rank_0.pt")
    (d / checkpoint.COMPLETE).write_text(json.dumps({"step": 1, "world_size": 1}))
    (ckpt_dir / "latest").write_text(tag)
    return d


@pytest.mark.parametrize("member", ["mp_rank_00_model_states.pt", "rank_0.pt", "zero_pp_rank_0_optim_states.pt"])
def test_crafted_checkpoint_file_is_refused_and_its_payload_never_runs(tmp_path, member):
    d = _complete_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    torch.save({"module": _Payload(marker)}, d / member)  # a valid torch zip whose pickle runs code
    with pytest.raises(RuntimeError, match=f"refusing checkpoint file .*{member}"):
        checkpoint_safety.verify_safe(d)
    assert not marker.exists(), "the pickle payload ran"
    # Sanity of the test itself: plain unpickling would have run it.
    torch.load(d / member, weights_only=False)
    assert marker.exists()


def test_deepspeeds_own_loads_are_weights_only_inside_the_guard(tmp_path):
    """A file swapped after verify_safe still cannot run code: DeepSpeed's torch.load(weights_only=False)
    calls are forced to weights_only=True while a checkpoint is loaded, converted or exported."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    marker = tmp_path / "pwned"
    torch.save({"module": _Payload(marker)}, tmp_path / "swapped.pt")
    torch.save({"scaler": LossScaler(1.0), "w": torch.ones(2)}, tmp_path / "deepspeed_like.pt")
    with checkpoint_safety.weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "swapped.pt", map_location="cpu", weights_only=False)
        state = torch.load(tmp_path / "deepspeed_like.pt", map_location="cpu", weights_only=False)
    assert not marker.exists()
    assert isinstance(state["scaler"], LossScaler) and torch.equal(state["w"], torch.ones(2))
    torch.load(tmp_path / "swapped.pt", weights_only=False)  # outside the block: the real loader again
    assert marker.exists()


def test_raw_pickle_file_posing_as_checkpoint_is_refused(tmp_path):
    d = _complete_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    (d / "rank_0.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(RuntimeError, match="refusing checkpoint file"):
        checkpoint_safety.verify_safe(d)
    assert not marker.exists()


def test_incomplete_or_dangling_latest_is_never_picked(tmp_path):
    ckpt = tmp_path / "ckpt"
    _complete_checkpoint(ckpt, "step00000001")
    (ckpt / "step00000002").mkdir()  # a save killed before COMPLETE
    (ckpt / "latest").write_text("step00000002")
    assert checkpoint.latest_tag(ckpt) == "step00000001"
    (ckpt / "latest").write_text("../../etc")  # a tampered pointer resolves to nothing loadable
    assert checkpoint.latest_tag(ckpt) == "step00000001"


def test_no_unsafe_torch_load_in_the_code_base():
    """Every torch.load call in the packages passes weights_only=True; nothing calls pickle.load(s)
    or np.load(allow_pickle=True). (Parsed with ast: docstrings and comments do not count.)"""
    import ast

    repo = Path(__file__).resolve().parents[3]
    offenders = []
    for pkg in ("pretrain", "kernels", "data_shards", "launch"):
        for path in (repo / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                kwargs = {k.arg: k.value for k in node.keywords}
                where = f"{path.relative_to(repo)}:{node.lineno}: {ast.unparse(node)[:120]}"
                if name == "torch.load":
                    wo = kwargs.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        offenders.append(where)
                elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                    offenders.append(where)
                elif "allow_pickle" in kwargs:
                    ap = kwargs["allow_pickle"]
                    if not (isinstance(ap, ast.Constant) and ap.value is False):
                        offenders.append(where)
    assert not offenders, "\n".join(offenders)


def test_retention_never_removes_the_checkpoint_just_written():
    """Killed between COMPLETE and `latest` at step 10, the run resumed from 5 and saved 7: keeping
    the newest `keep` by step would delete 7 (the new `latest`) and fall back to the abandoned 10."""
    complete = [(5, "step5"), (7, "step7"), (10, "step10")]
    assert checkpoint.retired_tags(complete, 7, keep=1) == ["step10", "step5"]
    assert checkpoint.retired_tags(complete, 7, keep=2) == ["step10"]
    assert checkpoint.retired_tags([(2, "a"), (4, "b"), (6, "c")], 6, keep=2) == ["a"]  # the ordinary case
