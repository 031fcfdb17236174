"""A structure file that kills the process parsing it, on Ray (data_shards/parallel_parse.py's
GroupRunner): the group task's Ray worker dies, and the build must lose that file, not stop.

Monkeypatch does not reach Ray's worker processes, so the driver's ``ray_build.group_records`` is
replaced by :func:`tests.data_shards.crash_parser.group_records_or_die`, a Ray task that patches the
parser inside the worker it runs in (and, by name, in the parsing children it starts) and then runs
the real ``group_records``: the worker death, Ray's exception, the isolating re-run and the
skip are all real."""

import logging

import pytest

from data_shards import ray_build, scratch
from data_shards.build import BuildConfig
from data_shards.manifest import load_manifest
from data_shards.parallel_parse import WORKER_DIED
from data_shards.ray_build import GroupedOptions, build_grouped
from tests.data_shards import crash_parser
from tests.data_shards.test_build import pdb_text, shard_hashes

# Sorted, then cut into groups of 4: the killer is in the middle of the last group, so that the
# build without it cuts the same groups (and so writes the same shards).
NAMES = ["m00.pdb", "m01.pdb", "m02.pdb", "m03.pdb", "n00.pdb", crash_parser.KILLED_NAME, "p00.pdb", "p01.pdb"]


def tars(root) -> dict[str, str]:
    return {name: digest for name, digest in shard_hashes(root).items() if name.endswith(".tar")}


def rerun_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "data_shards.parallel_parse"]


@pytest.mark.slow  # a local Ray on 2 busy cores: 35-45 s, most of it starting Ray and its workers
@pytest.mark.timeout(480)
def test_a_file_that_kills_its_ray_worker_costs_the_file_not_the_build(tmp_path, monkeypatch, caplog):
    ray = pytest.importorskip("ray")
    structures = tmp_path / "structures"
    structures.mkdir()
    for i, name in enumerate(NAMES):
        (structures / name).write_text(pdb_text({"A": "MKVLAGS"[: 3 + i % 5], "B": "GGSGG"}))
    others = [str(structures / n) for n in NAMES if n != crash_parser.KILLED_NAME]
    reference = tmp_path / "reference"
    build_grouped(BuildConfig(out=reference, structures=others, samples_per_shard=3), GroupedOptions(group_size=4))

    monkeypatch.setattr(ray_build, "group_records", crash_parser.group_records_or_die)
    out = tmp_path / "out"
    options = GroupedOptions(group_size=4, ray="local", stall_timeout_s=300)  # a hang guard: minutes on a loaded host
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 * 1024**2, _node_ip_address="127.0.0.1")
    try:
        with caplog.at_level(logging.WARNING, logger="data_shards.parallel_parse"):
            summary = build_grouped(BuildConfig(out=out, structures=[str(structures)], samples_per_shard=3), options)
            reruns = rerun_messages(caplog)
            # a task that raises is a bug, not a bad file: it stops the build, without an isolating re-run
            monkeypatch.setattr(ray_build, "group_records", crash_parser.group_records_with_a_bug)
            caplog.clear()
            with pytest.raises(ValueError, match=r"a bug in group \d"):
                build_grouped(BuildConfig(out=tmp_path / "bug", structures=[str(structures)]), options)
            assert not rerun_messages(caplog)
    finally:
        ray.shutdown()
    assert summary["build"]["engine"] == "ray" and summary["build"]["groups"] == 2
    assert list(summary["skipped"]) == [WORKER_DIED] and summary["skipped"][WORKER_DIED]["count"] == 1
    (example,) = summary["skipped"][WORKER_DIED]["examples"]
    assert example.startswith(f"{crash_parser.KILLED_NAME}: worker died (signal 9) while reading ")
    assert load_manifest(out).extra["skipped"] == summary["skipped"]
    assert summary["num_samples"] == 2 * len(others)
    assert tars(out) == tars(reference) and tars(out)
    (rerun,) = reruns  # only the killer's group ran again
    # the killed worker's record spool (system temp) was removed when its group ran again on this host,
    # though the re-run can start while the killed worker is still a zombie or inside exit() (both left
    # it behind in CI on 2026-12-06; with the strict check below, 3 failures in 8 runs under load before
    # scratch counted PF_EXITING as dead, 0 in 10 after)
    assert scratch.sweep_dead("align-pro-group-") == []
    assert rerun.startswith("Ray task group_records_or_die(1, ...): its Ray worker died (WorkerCrashedError")
