"""The grouped build (data_shards/ray_build.py, with its tasks in build_groups.py and its bookkeeping
in build_resume.py): equal to the single-pass build, resumable after a kill, the same on Ray,
appendable, and reading/writing object storage."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_shards import ray_build
from data_shards.__main__ import main
from data_shards.build import BuildConfig, BuildInputError, build_shards
from data_shards.manifest import load_manifest
from data_shards.ray_build import GroupedOptions, build_grouped
from data_shards.reader import iter_records
from data_shards.schema import encode_record
from data_shards.validate import validate_dir
from tests.data_shards.test_build import crafted, pdb_text  # noqa: F401 - the fixture
from tests.data_shards.test_reader import write_tar
from tests.s3_server import s3  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]


class Killed(BaseException):
    """What a kill looks like from inside: the build stops where it is."""


def records_of(root) -> list[tuple[str, dict]]:
    """(id, encoded members) of every record, in manifest order."""
    manifest = load_manifest(root)
    return [(r.id, encode_record(r)) for shard in manifest.shards for r in iter_records(shard.path)]


def output_bytes(root: Path) -> dict[str, str]:
    """sha256 of every shard and manifest under ``root`` (the build state excluded)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ray_build.STATE_DIR not in p.parts
    }


def config_of(crafted, out, **kw) -> BuildConfig:  # noqa: F811
    return BuildConfig(
        out=out,
        annotations=[str(crafted["table"])],
        fasta=[str(crafted["fasta"])],
        go_obo=str(crafted["obo"]),
        split_heldout=0.5,
        split_seed=3,
        samples_per_shard=2,
        **kw,
    )


@pytest.fixture
def extra_structures(crafted):  # noqa: F811
    """More structure files than one group holds (so that groups, ids and the split all matter)."""
    folder = crafted["root"] / "more"
    folder.mkdir()
    for i, seq in enumerate(["MKVLA", "GGSKL", "MKVLA", "LLSVA", "KKGGS", "VVLAM"]):
        (folder / f"{i}x{i}q.pdb").write_text(pdb_text({"A": seq, "B": seq[::-1]}))
    (folder / "dup").mkdir()
    (folder / "dup" / "0x0q.pdb").write_text(pdb_text({"A": "SSGGA"}))  # same record id as another file
    return folder


def test_grouped_build_equals_the_single_pass_build(crafted, extra_structures):  # noqa: F811
    single = build_shards(config_of(crafted, crafted["root"] / "single", structures=[str(extra_structures)]))
    grouped = build_grouped(
        config_of(crafted, crafted["root"] / "grouped", structures=[str(extra_structures)]),
        GroupedOptions(group_size=3),
    )
    assert grouped["build"]["groups"] >= 4 and grouped["num_samples"] == single["num_samples"] > 10
    for split in ("train", "heldout"):
        ours, theirs = records_of(crafted["root"] / "grouped" / split), records_of(crafted["root"] / "single" / split)
        assert ours == theirs and ours  # same records, same ids, same order, same side
        assert grouped["splits"][split]["coverage"] == single["splits"][split]["coverage"]
    ids = [i for split in ("train", "heldout") for i, _ in records_of(crafted["root"] / "grouped" / split)]
    assert "0x0q_A#2" in ids  # ids made unique over the whole build, across groups
    assert grouped["skipped"] == single["skipped"] and grouped["skipped_terms"] == single["skipped_terms"]
    assert {k: v for k, v in grouped["stats"].items()} == single["stats"]
    shard_names = [s.name for s in load_manifest(crafted["root"] / "grouped" / "train").shards]
    assert shard_names == sorted(shard_names) and all(n.startswith("shard-g") for n in shard_names)
    assert validate_dir(crafted["root"] / "grouped" / "train")["ok"]


def test_a_build_killed_mid_way_resumes_to_the_same_output(crafted, extra_structures, monkeypatch):  # noqa: F811
    whole = crafted["root"] / "whole"
    build_grouped(config_of(crafted, whole, structures=[str(extra_structures)]), GroupedOptions(group_size=3))
    out = crafted["root"] / "killed"
    calls = {"a": [], "b": []}
    real_a, real_b = ray_build.group_records, ray_build.group_shards

    def counting_a(ctx, gid, *rest):
        calls["a"].append(gid)
        return real_a(ctx, gid, *rest)

    def dying_b(ctx, gid, *rest):
        calls["b"].append(gid)
        if len(calls["b"]) == 3 and not calls["a"][-1:] == ["rerun"]:
            raise Killed("killed mid-build")
        return real_b(ctx, gid, *rest)

    monkeypatch.setattr(ray_build, "group_records", counting_a)
    monkeypatch.setattr(ray_build, "group_shards", dying_b)
    with pytest.raises(Killed):
        build_grouped(config_of(crafted, out, structures=[str(extra_structures)]), GroupedOptions(group_size=3))
    assert not (out / "train" / "manifest.json").exists()
    groups = len(calls["a"])
    calls["a"][:] = ["rerun"]
    calls["b"].clear()
    summary = build_grouped(config_of(crafted, out, structures=[str(extra_structures)]), GroupedOptions(group_size=3))
    assert calls["a"] == ["rerun"] and len(calls["b"]) == groups - 2  # only the missing shards are redone
    assert summary["build"]["groups_reused"] == groups
    assert output_bytes(out) == output_bytes(whole)
    # the same command on a finished build redoes nothing and rewrites the same manifests
    build_grouped(config_of(crafted, out, structures=[str(extra_structures)]), GroupedOptions(group_size=3))
    assert output_bytes(out) == output_bytes(whole) and len(calls["b"]) == groups - 2
    with pytest.raises(BuildInputError, match="finished build; pass --append"):
        build_grouped(config_of(crafted, out), GroupedOptions(group_size=3))


# ----------------------------------------------------------------------------- archives, streams, storage

SHARED = REPO.parent / "shared" / "data"
needs_af = pytest.mark.skipif(not (SHARED / "alphafold").is_dir(), reason="shared data not present")
needs_uniprot = pytest.mark.skipif(
    not (SHARED / "uniprot" / "swissprot_entries").is_dir(), reason="shared data not present"
)


def af_models(count: int, start: int = 0) -> list[Path]:
    return sorted((SHARED / "alphafold").glob("AF-*.pdb.gz"))[start : start + count]


def essence(root) -> list[tuple]:
    """What must not depend on where a structure was read from: id, sequence, coordinates, pLDDT."""
    manifest = load_manifest(root)
    out = []
    for shard in manifest.shards:
        for r in iter_records(shard.path):
            out.append((r.id, r.sequence, r.backbone.coords.tobytes(), r.backbone.plddt.tobytes(), r.meta["source"]))
    return out


@needs_af
def test_alphafold_tar_streams_and_a_bad_member_is_skipped_and_counted(tmp_path):
    models = af_models(4)
    good = models[1].read_bytes()
    archive = write_tar(
        tmp_path / "proteome.tar",
        [(f"models/{m.name}", m.read_bytes()) for m in models]
        + [
            ("AF-BROKEN-F1-model_v2.pdb.gz", good[: len(good) // 2]),  # truncated gzip
            (models[0].name.replace(".pdb.gz", ".cif.gz"), b"data_x\n"),  # the same model again as mmCIF
            ("AF-X-F1-confidence_v2.json.gz", b"{}"),  # not a structure
        ],
    )
    from_tar = build_grouped(BuildConfig(out=tmp_path / "tar", structures=[str(archive)]), GroupedOptions(group_size=2))
    unpacked = build_shards(BuildConfig(out=tmp_path / "files", structures=[str(m) for m in models]))
    assert essence(tmp_path / "tar") == essence(tmp_path / "files") and from_tar["num_samples"] == 4
    assert unpacked["splits"]["all"]["coverage"]["plddt"] == from_tar["splits"]["all"]["coverage"]["plddt"] == 4
    bad = from_tar["skipped"]["unreadable structure file"]
    assert bad["count"] == 1 and "proteome.tar:AF-BROKEN-F1-model_v2.pdb.gz" in bad["examples"][0]
    assert from_tar["stats"] == build_shards(BuildConfig(out=tmp_path / "t1", structures=[str(archive)]))["stats"]
    stats = from_tar["stats"]
    assert stats["archive_members"] == 5 and stats["archive_members_ignored"] == 1
    assert stats["archive_members_other_format"] == 1
    record = next(iter_records(load_manifest(tmp_path / "tar").shards[0].path))
    assert record.meta["structure_file"] == f"proteome.tar:models/{models[0].name}"
    # the single-pass build reads archives too, and a damaged archive costs its rest, not the build
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[:1536] + b"\x07" * 700)
    summary = build_shards(BuildConfig(out=tmp_path / "cut", structures=[str(cut), str(models[2])]))
    assert summary["num_samples"] == 1 and "unreadable archive (rest of archive ignored)" in summary["skipped"]


def _sprot_flat(tmp_path: Path) -> Path:
    entries = sorted((SHARED / "uniprot" / "swissprot_entries").glob("*.txt"))
    path = tmp_path / "uniprot_sprot.dat.gz"
    import gzip

    path.write_bytes(gzip.compress(b"".join(e.read_bytes().rstrip(b"\n") + b"\n" for e in entries)))
    return path


def _sprot_xml(tmp_path: Path) -> Path:
    import gzip
    import re

    bodies = []
    for file in sorted((SHARED / "uniprot" / "swissprot_entries").glob("*.xml")):
        bodies += re.findall(r"<entry .*?</entry>", file.read_text(), flags=re.S)
    head = '<?xml version="1.0" encoding="UTF-8"?>\n<uniprot xmlns="http://uniprot.org/uniprot">\n'
    path = tmp_path / "uniprot_sprot.xml.gz"
    path.write_bytes(gzip.compress((head + "\n".join(bodies) + "\n</uniprot>\n").encode()))
    return path


@needs_uniprot
def test_swissprot_flat_and_xml_single_streams(tmp_path):
    flat, xml = _sprot_flat(tmp_path), _sprot_xml(tmp_path)
    for name, stream in (("flat", flat), ("xml", xml)):
        grouped = build_grouped(BuildConfig(out=tmp_path / name, uniprot=[str(stream)]), GroupedOptions(group_size=4))
        single = build_shards(BuildConfig(out=tmp_path / f"{name}-single", uniprot=[str(stream)]))
        assert records_of(tmp_path / name) == records_of(tmp_path / f"{name}-single")
        assert grouped["build"]["by_input"]["standalone"]["records"] == single["num_samples"] >= 9
    assert grouped["build"]["by_input"]["standalone"]["groups"] >= 3


@needs_af
def test_append_adds_a_revision_without_rewriting_shards(tmp_path):
    first = write_tar(tmp_path / "a.tar", [(m.name, m.read_bytes()) for m in af_models(3)])
    second = write_tar(tmp_path / "b.tar", [(m.name, m.read_bytes()) for m in af_models(3, 2)])  # one model again
    out = tmp_path / "out"
    build_grouped(BuildConfig(out=out, structures=[str(first)], split_heldout=0.3), GroupedOptions(group_size=2))
    before = output_bytes(out)
    with pytest.raises(BuildInputError, match="--append"):
        build_grouped(BuildConfig(out=out, structures=[str(second)], split_heldout=0.3), GroupedOptions(group_size=2))
    with pytest.raises(BuildInputError, match="must keep the split"):
        build_grouped(BuildConfig(out=out, structures=[str(second)]), GroupedOptions(group_size=2, append=True))
    summary = build_grouped(
        BuildConfig(out=out, structures=[str(second)], split_heldout=0.3), GroupedOptions(group_size=2, append=True)
    )
    after = output_bytes(out)
    assert all(after[name] == digest for name, digest in before.items() if not name.endswith("manifest.json"))
    assert summary["build"]["revision"] == 1 and summary["num_samples"] == 6
    sides = {i: split for split in ("train", "heldout") for i, _ in records_of(out / split)}
    model = af_models(1, 2)[0].name.split("-")[1]
    assert sides[f"AF-{model}-F1"] == sides[f"AF-{model}-F1#2"]  # a new copy joins the old one's side
    revisions = load_manifest(out / "train").extra["build"]["revisions"]
    assert [r["revision"] for r in revisions] == [0, 1] and sum(r["num_samples"] for r in revisions) == 6


# ----------------------------------------------------------------------------- Ray, object storage


@pytest.mark.slow  # a local Ray cluster on 2 cores: ~40 s, most of it starting workers
@needs_af
def test_ray_build_equals_the_local_build_and_reads_and_writes_s3(crafted, extra_structures, s3):  # noqa: F811
    ray = pytest.importorskip("ray")
    config = dict(structures=[str(extra_structures)])
    build_grouped(config_of(crafted, crafted["root"] / "here", **config), GroupedOptions(group_size=3))
    archive = write_tar(crafted["root"] / "p.tar", [(m.name, m.read_bytes()) for m in af_models(5)])
    s3.client().upload_file(str(archive), s3.bucket, "in/p.tar")
    build_grouped(BuildConfig(out=crafted["root"] / "af", structures=[str(archive)]), GroupedOptions(group_size=2))
    # the local S3 API's credentials are in this process's environment: Ray's workers inherit them
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 * 1024**2, _node_ip_address="127.0.0.1")
    try:
        options = GroupedOptions(group_size=3, ray="local", stall_timeout_s=120)
        summary = build_grouped(config_of(crafted, crafted["root"] / "ray", **config), options)
        remote = s3.url("built")
        options = GroupedOptions(group_size=2, ray="local", stall_timeout_s=120)
        on_s3 = build_grouped(BuildConfig(out=remote, structures=[s3.url("in", "p.tar")]), options)
    finally:
        ray.shutdown()
    assert summary["build"]["engine"] == "ray" and summary["build"]["groups"] >= 4
    assert output_bytes(crafted["root"] / "ray") == output_bytes(crafted["root"] / "here")
    assert on_s3["num_samples"] == 5 and essence(remote) == essence(crafted["root"] / "af")
    keys = s3.keys("built/")
    assert "built/manifest.json" in keys and not any(k.endswith(".spool") for k in keys)
    local = load_manifest(crafted["root"] / "af")
    assert [s.sha256 for s in load_manifest(remote).shards] != []
    assert len(load_manifest(remote).shards) == len(local.shards)


def test_cli_build_killed_by_sigkill_then_rerun_equals_an_uninterrupted_build(tmp_path):
    folder = tmp_path / "structures"
    folder.mkdir()
    letters = "AGKMVLS"
    for i in range(24):
        seq = "".join(letters[(i * 7 + j * 3) % 7] for j in range(8 + i % 5))
        (folder / f"{i:02d}ab.pdb").write_text(pdb_text({"A": seq}))
    args = ["--structures", str(folder), "--split-heldout", "0.3", "--group-size", "1", "--samples-per-shard", "4"]
    assert main(["build", "--out", str(tmp_path / "whole"), "--resumable", *args]) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "data_shards", "build", "--out", str(out), "--resumable", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        marker = out / ray_build.STATE_DIR / "b-000003.json"
        for _ in range(6000):  # up to 60 s
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        code = proc.wait(timeout=60)
    assert code == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "train" / "manifest.json").exists()
    assert main(["build", "--out", str(out), "--resumable", *args]) == 0
    assert output_bytes(out) == output_bytes(tmp_path / "whole")
    assert len(load_manifest(out / "train").shards) + len(load_manifest(out / "heldout").shards) >= 20


@needs_uniprot
def test_swissprot_on_s3_built_to_s3_resumably(tmp_path, s3, monkeypatch):  # noqa: F811
    flat = _sprot_flat(tmp_path)
    s3.client().upload_file(str(flat), s3.bucket, "in/uniprot_sprot.dat.gz")
    local = build_grouped(BuildConfig(out=tmp_path / "here", uniprot=[str(flat)]), GroupedOptions(group_size=4))
    remote = s3.url("sprot")
    config = BuildConfig(out=remote, uniprot=[s3.url("in", "uniprot_sprot.dat.gz")])
    real_b = ray_build.group_shards

    def dying_b(ctx, gid, *rest):
        if gid == 1:
            raise Killed("killed mid-build")
        return real_b(ctx, gid, *rest)

    monkeypatch.setattr(ray_build, "group_shards", dying_b)
    with pytest.raises(Killed):
        build_grouped(config, GroupedOptions(group_size=4))
    monkeypatch.setattr(ray_build, "group_shards", real_b)
    summary = build_grouped(config, GroupedOptions(group_size=4))
    assert summary["build"]["groups_reused"] == summary["build"]["groups"] == local["build"]["groups"]
    assert records_of(remote) == records_of(tmp_path / "here") and summary["num_samples"] >= 9
    ours, theirs = load_manifest(remote), load_manifest(tmp_path / "here")
    assert [s.to_json() for s in ours.shards] == [s.to_json() for s in theirs.shards]  # same bytes
    assert not any(k.endswith(".spool") for k in s3.keys("sprot/"))
