"""Shared fixtures: a small demo shard set, the real DeepSpeed launcher on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET once, at its first import (deepspeed may import it early): set it
# here, before any test module loads, so the Triton kernels run on the CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


# Under ``make test`` (``pytest -n 2``) the tests of these modules (but RAY_FREE_TESTS, below) run
# one after another, as one unit, on one xdist worker: they start Ray (the launcher's Ray readers,
# launch/ray_job.py, ``ray start`` clusters), and two Ray instances on one node have broken each other.
RAY_GROUP_MODULES = {
    "tests/data_shards/test_ray_build.py",
    "tests/data_shards/test_ray_build_crash.py",
    "tests/launch/test_bad_data.py",
    "tests/launch/test_object_storage.py",
    "tests/launch/test_pretrain.py",
    "tests/launch/test_ray_cluster.py",
    "tests/launch/test_ray_job.py",
    "tests/launch/test_ray_job_lock.py",
    "tests/launch/test_resume.py",
    "tests/launch/test_soak.py",
    "tests/pretrain/data/test_ray_stream.py",
    "tests/pretrain/data/test_stream.py",
}
# Launcher runs without Ray (``data.loader=local``) that use the cached reference runs: a unit of
# their own, which runs beside the Ray unit. Other launcher modules without Ray and without a
# reference run (test_protclip_launch, test_real_recipes_launch) spread like unit tests.
# ``tests/test_xdist_groups.py`` keeps these lists complete.
REFERENCE_GROUP_MODULES = {
    "tests/launch/test_elastic.py",
    "tests/launch/test_multinode.py",
    "tests/pretrain/engine/test_two_pass_zero3.py",
}


# Tests of RAY_GROUP_MODULES that start no Ray: their launches pass ``data.loader=local`` (or stop in
# the configuration check, before any process group), or they run in-process without Ray. The serial
# Ray unit is the suite's longest path under ``-n 2``, so these spread like unit tests instead. Those
# that use a reference run may launch it once more on the other worker (the cache is per worker): one
# launch, against minutes off the Ray unit. Listed by test (parameters apart), so that a test added
# to one of these modules lands in the Ray unit until it is listed here.
RAY_FREE_TESTS = {
    "tests/launch/test_bad_data.py::test_too_many_bad_samples_stop_the_run_with_a_clear_message",
    "tests/launch/test_object_storage.py::test_s3_shards_train_and_a_checkpoint_round_trips_through_s3",
    "tests/launch/test_object_storage.py::test_wrong_credentials_stop_the_launch_with_one_clear_error",
    "tests/launch/test_pretrain.py::test_stage1_keeps_encoders_bit_identical",
    "tests/launch/test_pretrain.py::test_bad_configuration_fails_before_any_process_group",
    "tests/launch/test_pretrain.py::test_config_errors_are_printed_once_per_node",
    "tests/launch/test_resume.py::test_sigkill_then_relaunch_gives_the_uninterrupted_losses",
    "tests/launch/test_resume.py::test_a_run_killed_after_its_final_checkpoint_exports_on_relaunch",
    "tests/launch/test_resume.py::test_a_resume_under_another_batch_size_is_refused",
    "tests/launch/test_resume.py::test_a_resume_on_another_shard_set_is_refused_and_a_moved_copy_resumes",
    "tests/launch/test_resume.py::test_sigterm_saves_a_checkpoint_and_exits_zero",
    *(
        f"tests/pretrain/data/test_stream.py::{name}"
        for name in (
            "test_ranks_partition_each_epoch_without_repeats",
            "test_too_large_a_batch_is_a_config_error",
            "test_unequal_shards_leave_only_a_remainder_out_of_each_epoch",
            "test_balanced_shards_keep_the_shard_level_split",
            "test_no_two_random_streams_of_a_plan_coincide",
            "test_resume_from_cursor_replays_exactly_the_same_batches",
            "test_batch_layout",
            "test_property_sampling_drops_low_confidence_samples",
            "test_elastic_resume_delivers_each_sample_of_the_epoch_at_most_once",
            "test_elastic_remainder_keeps_the_seen_batches_and_a_new_rng_key",
            "test_elastic_resume_rejects_cursors_that_disagree",
            "test_elastic_resume_with_property_sampling_stays_inside_the_epochs_draw",
        )
    ),
}


def work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: ``"ray"`` or ``"reference"`` for the serial groups, else the
    test itself."""
    module = nodeid.split("::", 1)[0]
    if module in RAY_GROUP_MODULES and nodeid.split("[", 1)[0] not in RAY_FREE_TESTS:
        return "ray"
    return "reference" if module in REFERENCE_GROUP_MODULES else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduler with :func:`work_unit` as the scope; the largest units (the serial
    groups) are handed out first. (``--dist loadgroup`` would read ``xdist_group`` marks, but it tags
    node ids in a way pytest 9.2 ignores, so the group was split over workers.)"""
    from xdist.scheduler import LoadScopeScheduling

    class _SerialRayScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return _SerialRayScheduling(config, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A small linked demo corpus: 8 train shards of 48 and 2 held-out shards of 48."""
    from data_shards.demo_corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("demo")
    build_demo_corpus(out, num_train=384, num_heldout=96, samples_per_shard=48, seed=0)
    return out


TINY_OVERRIDES = [
    "model.sequence.num_layers=1",
    "model.structure.num_layers=1",
    "model.text.num_layers=1",
    "data.batch_size=8",
    "data.readers_per_rank=1",
    "data.prefetch_batches=2",
    "train.log_every=1",
    "optim.warmup_steps=1",
    "eval.batch_size=48",
]


def cpu_env() -> dict:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def launcher_cmd(
    launcher_args: list[str],
    run_dir: Path,
    shards: Path,
    overrides: list[str],
    *,
    config: str = "zero3.json",
    recipe: Path | None = None,
) -> list[str]:
    """``deepspeed <launcher_args> launch/pretrain.py ...`` on ``shards`` (its train/ and heldout/) with
    ``TINY_OVERRIDES`` + ``overrides``; ``launcher_args`` pick the ranks and nodes (``--num_gpus 2 ...``)."""
    cmd = [
        str(Path(sys.executable).with_name("deepspeed")),
        *launcher_args,
        str(REPO / "launch" / "pretrain.py"),
        "--config",
        config,
        "--run-dir",
        str(run_dir),
        *(["--recipe", str(recipe)] if recipe is not None else []),
        "--set",
        f"data.train_shards={shards / 'train'}",
        "--set",
        f"data.eval_shards={shards / 'heldout'}",
    ]
    for o in TINY_OVERRIDES + overrides:
        cmd += ["--set", o]
    return cmd


def run_launcher(
    run_dir: Path,
    shards: Path,
    overrides: list[str],
    *,
    ranks: int = 2,
    config: str = "zero3.json",
    timeout=420,
    env: dict | None = None,
    background: bool = False,
    recipe: Path | None = None,
):
    """Run ``deepspeed --num_gpus N launch/pretrain.py`` as a user would.

    ``recipe`` picks ``--recipe`` (default: the launcher's, the demo recipe).
    Returns the finished ``CompletedProcess``, or with ``background`` the running ``Popen``.
    """
    launcher_args = ["--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd = launcher_cmd(launcher_args, run_dir, shards, overrides, config=config, recipe=recipe)
    full_env = {**cpu_env(), **(env or {})}
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, small_demo):
    """``reference_run(overrides)`` -> the run directory of a finished, uninterrupted launcher run
    (2 ranks, ZeRO-3, ``small_demo``, ``TINY_OVERRIDES`` + ``overrides``, as :func:`run_launcher`).

    Several tests compare their per-step losses with the same uninterrupted run (a SIGKILL and
    relaunch, a Ray Train restart, an S3 resume, two launcher nodes, the two-pass step). Each such run takes
    30-60 s on the 2-core CI machine, so it is launched once per session per resolved recipe:
    the cache key is the fully resolved config, so two override lists share a run only when
    they mean exactly the same training. Callers must not write into the returned directory
    (copy it to continue the run, as test_elastic does). Every rank records the batches it
    consumes (``ALIGN_PRO_RECORD_BATCHES``, a testing aid that changes no step) under
    ``consumed/``, for test_elastic's no-repeat check.
    """
    from pretrain.config import load_config

    runs: dict[str, Path] = {}

    def get(overrides: list[str]) -> Path:
        key = json.dumps(load_config(overrides=TINY_OVERRIDES + list(overrides)).to_dict(), sort_keys=True)
        if key not in runs:
            run = tmp_path_factory.mktemp("reference") / "run"
            p = run_launcher(run, small_demo, list(overrides), env={"ALIGN_PRO_RECORD_BATCHES": "1"})
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            runs[key] = run
        return runs[key]

    return get


def mount_small_tmpfs(directory: Path, size: str) -> Path:
    """Mount a tmpfs of ``size`` (e.g. ``"6m"``) on a new ``directory``; skips the test where this
    machine may not mount file systems (needs CAP_SYS_ADMIN). Unmount with :func:`unmount`."""
    directory.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.strip()})")
    return directory


def unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)
