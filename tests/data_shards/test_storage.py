"""Shards on object storage and behind pipe: commands (data_shards/storage.py), against a real S3 API."""

from __future__ import annotations

import json
import sys

import pytest

from data_shards import storage
from data_shards.__main__ import main as data_shards_main
from data_shards.manifest import ManifestError, ManifestNotFoundError, load_manifest
from data_shards.reader import BadShardError, ShardReader
from tests.s3_server import reset_fsspec_cache, s3  # noqa: F401 - the fixture

SMALL_DEMO = ["--num-train", "96", "--num-heldout", "48", "--samples-per-shard", "24", "--seed", "3"]


@pytest.fixture(scope="module")
def local_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("local_demo")
    assert data_shards_main(["demo", "--out", str(out), *SMALL_DEMO]) == 0
    return out


def test_join_keeps_urls_intact_and_fills_pipe_templates(tmp_path):
    assert storage.join("s3://b/x/", "manifest.json") == "s3://b/x/manifest.json"
    assert storage.join(tmp_path, "a.tar") == tmp_path / "a.tar"
    assert storage.join("pipe:cat /d/{name}", "shard-000001.tar") == "pipe:cat /d/shard-000001.tar"
    # A name comes from a manifest that may be remote: nothing in it may reach the shell as code
    # (quoting cannot be right inside a template that quotes {name} itself, "pipe:cat '/d/{name}'").
    for name in ("a b.tar", "x-$(touch pwned).tar", "a'b.tar", "a;b.tar"):
        with pytest.raises(storage.StorageError, match="unsafe file name"):
            storage.join('pipe:cat "/d/{name}"', name)
    assert storage.is_url("gs://b/x") and storage.is_url("pipe:cat x") and not storage.is_url("file:///x")
    with pytest.raises(storage.StorageError, match="placeholder"):
        storage.join("pipe:cat /d/x.tar", "a.tar")


def test_pipe_locations_cannot_be_listed_and_unrunnable_commands_fail_at_once(monkeypatch, caplog):
    with pytest.raises(storage.StorageError, match="cannot list a pipe"):
        storage.listdir("pipe:cat /d/{name}")
    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)
    with pytest.raises(storage.StorageError, match=r"cannot run the command \(status 127\)"):
        storage.read_bytes("pipe:no-such-command-align-pro /d/a.tar")
    assert "retry" not in caplog.text
    with pytest.raises(storage.StorageError, match=r"status 3.*after 4 attempts"):
        storage.read_bytes("pipe:exit 3")  # any other failure may be transient (a network fetch)
    assert caplog.text.count("retry") == storage.RETRIES - 1


def test_threads_writing_one_file_do_not_collide(tmp_path):
    import threading

    target, errors = tmp_path / "latest", []

    def write(n):
        try:
            for i in range(50):
                storage.write_text(target, f"{n}-{i}")
        except OSError as e:  # a shared temporary file vanished under the other writer
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and target.read_text() in ("0-49", "1-49")
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary file left behind


def test_transient_errors_are_retried_and_permanent_ones_are_not(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert storage._retry("s3://b/k", "read", flaky) == "ok" and len(calls) == 3

    def denied():
        calls.append(1)
        raise PermissionError("Forbidden")

    calls.clear()
    with pytest.raises(storage.StorageError, match=r"s3://b/k: read failed: access denied .*AWS_ACCESS_KEY_ID"):
        storage._retry("s3://b/k", "read", denied)
    assert len(calls) == 1

    def down():
        raise TimeoutError("connect timeout")

    with pytest.raises(storage.StorageError, match=f"after {storage.RETRIES} attempts"):
        storage._retry("s3://b/k", "read", down)


def test_pipe_template_serves_manifest_and_shards(local_demo):
    template = f"pipe:{sys.executable} -c \"import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())\" "
    template += f"{local_demo}/train/{{name}}"
    remote, local = load_manifest(template), load_manifest(local_demo / "train")
    assert [s.name for s in remote.shards] == [s.name for s in local.shards]
    shard = remote.shards[1]
    assert shard.path.startswith("pipe:")
    with ShardReader(shard.path) as piped, ShardReader(local.shards[1].path) as plain:
        assert piped.keys() == plain.keys()
        assert piped.read_members(5) == plain.read_members(5)
    with pytest.raises(BadShardError, match="exited with status"):
        ShardReader(storage.join(template, "missing.tar"))


def test_demo_built_to_s3_reads_back_identically(s3, local_demo):  # noqa: F811
    url = s3.url("demo")
    assert data_shards_main(["demo", "--out", url, *SMALL_DEMO]) == 0
    keys = s3.keys("demo/")
    assert "demo/train/manifest.json" in keys and "demo/heldout/manifest.json" in keys
    assert not any("align-pro-build-" in k for k in keys)  # the temp dir name never leaks
    remote, local = load_manifest(f"{url}/train"), load_manifest(local_demo / "train")
    assert remote.root == f"{url}/train"
    assert [s.to_json() for s in remote.shards] == [s.to_json() for s in local.shards]  # same checksums
    for shard_r, shard_l in zip(remote.shards, local.shards):
        assert shard_r.path == f"{url}/train/{shard_l.name}"
        with ShardReader(shard_r.path) as rr, ShardReader(shard_l.path) as ll:
            assert rr.keys() == ll.keys()
            assert [rr.read_members(i) for i in (0, len(rr) - 1)] == [ll.read_members(i) for i in (0, len(ll) - 1)]
            assert rr.read(2).id == ll.read(2).id


def test_upload_dir_puts_manifests_last(tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    for name in ("manifest.json", "b.tar", "sub/manifest.json", "sub/a.tar"):
        (tmp_path / "src" / name).write_text(name)
    order = storage.upload_dir(tmp_path / "src", tmp_path / "dst", last=("manifest.json",))
    assert order[-2:] == ["manifest.json", "sub/manifest.json"]
    assert (tmp_path / "dst" / "sub" / "a.tar").read_text() == "sub/a.tar"


def test_missing_bucket_and_wrong_credentials_give_one_clear_error(s3, monkeypatch):  # noqa: F811
    with pytest.raises(ManifestError) as missing:
        load_manifest("s3://no-such-bucket-here/train")
    assert "s3://no-such-bucket-here/train/manifest.json" in str(missing.value)
    assert "bucket not found" in str(missing.value)
    with pytest.raises(ManifestNotFoundError, match="manifest not found"):
        load_manifest(s3.url("nothing-here"))

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    reset_fsspec_cache()
    try:
        with pytest.raises(ManifestError) as denied:
            load_manifest(s3.url("demo", "train"))
        text = str(denied.value)
        assert s3.url("demo", "train", "manifest.json") in text and "access denied" in text
        assert "AWS_ACCESS_KEY_ID" in text and "\n" not in text
        with pytest.raises(BadShardError, match="access denied"):
            ShardReader(s3.url("demo", "train", "shard-000000.tar"))
    finally:
        monkeypatch.undo()
        reset_fsspec_cache()


def test_validate_reads_a_shard_set_on_s3(s3, capsys):  # noqa: F811
    url = s3.url("demo", "heldout")
    if "demo/heldout/manifest.json" not in s3.keys("demo/"):
        assert data_shards_main(["demo", "--out", s3.url("demo"), *SMALL_DEMO]) == 0
        capsys.readouterr()
    assert data_shards_main(["validate", url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True


def test_remove_file_and_tree_on_s3_and_locally_tolerate_missing(s3, tmp_path):  # noqa: F811
    for name in ("run/export/config.yaml", "run/export/model.safetensors", "run/ckpt/a.pt", "run/ckpt/b/c.pt"):
        storage.write_bytes(s3.url(*name.split("/")), b"x")
    storage.remove_file(s3.url("run", "export", "config.yaml"))
    storage.remove_tree(s3.url("run", "ckpt"))
    assert s3.keys("run/") == ["run/export/model.safetensors"]
    storage.remove_file(s3.url("run", "export", "config.yaml"))  # already gone: nothing to do
    storage.remove_tree(s3.url("run", "ckpt"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    storage.remove_file(tmp_path / "d" / "f")
    storage.remove_file(tmp_path / "d" / "f")
    storage.remove_tree(tmp_path / "d")
    storage.remove_tree(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_local_copies_stream_and_never_hold_the_whole_file(tmp_path):
    """A shared-FS checkpoint upload or export fetch of a multi-GB file must not read it into memory."""
    import os
    import tracemalloc

    src = tmp_path / "shard.pt"
    size = 8 * storage.COPY_BLOCK  # 64 MiB
    with open(src, "wb") as f:
        for _ in range(8):
            f.write(os.urandom(storage.COPY_BLOCK))
    copies = ((storage.upload_file, tmp_path / "shared" / "up.pt"), (storage.download_file, tmp_path / "dl.pt"))
    for copy, dst in copies:
        tracemalloc.start()
        try:
            copy(src, dst)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 3 * storage.COPY_BLOCK < size, (copy.__name__, peak)
        assert dst.stat().st_size == size and dst.read_bytes() == src.read_bytes()
        assert [p.name for p in dst.parent.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_download_file_from_s3_is_whole_or_absent(s3, tmp_path, monkeypatch):  # noqa: F811
    storage.write_bytes(s3.url("run", "export", "model.safetensors"), b"weights" * 1000)
    storage.download_file(s3.url("run", "export", "model.safetensors"), tmp_path / "a" / "model.safetensors")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == b"weights" * 1000
    storage.download_dir(s3.url("run"), tmp_path / "tree")
    assert (tmp_path / "tree" / "export" / "model.safetensors").read_bytes() == b"weights" * 1000

    fs, _ = storage._filesystem(s3.url("run"))

    def dies_half_way(path, local, **kwargs):  # a fetch cut off after writing half the bytes
        with open(local, "wb") as f:
            f.write(b"weig")
        raise PermissionError("access denied")  # permanent: not retried

    monkeypatch.setattr(fs, "get_file", dies_half_way)
    with pytest.raises(storage.StorageError, match="model.safetensors"):
        storage.download_file(s3.url("run", "export", "model.safetensors"), tmp_path / "b" / "model.safetensors")
    assert list((tmp_path / "b").iterdir()) == []  # neither the half file nor its temp
    with pytest.raises(FileNotFoundError):
        storage.download_file(tmp_path / "nothing.pt", tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()
