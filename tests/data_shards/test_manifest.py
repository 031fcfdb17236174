"""manifest.json writing, loading and its error cases (data_shards/manifest.py)."""

import json

import pytest

from data_shards.manifest import ManifestError, ManifestNotFoundError, load_manifest, write_manifest


def entry(name="shard-000000.tar", n=3):
    return {"name": name, "num_samples": n, "sha256": "0" * 64, "bytes": 10240, "modalities": {"sequence": n}}


def test_round_trip(tmp_path):
    path = write_manifest(tmp_path, [entry(), entry("shard-000001.tar", 2)], {"split": "train", "seed": 0})
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and raw["num_samples"] == 5 and raw["created_by"]
    assert raw["modalities"] == {"sequence": 5, "structure": 0, "text": 0}
    manifest = load_manifest(tmp_path)
    assert manifest.num_samples == 5 and manifest.extra == {"split": "train", "seed": 0}
    assert [s.name for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert manifest.shards[1].path == (tmp_path / "shard-000001.tar").resolve()
    assert manifest.shards[0].modalities == {"sequence": 3, "structure": 0, "text": 0}
    assert manifest.root == manifest.dir == tmp_path.resolve()
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left behind


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(ManifestNotFoundError, match="nowhere"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        ("[]", "JSON object"),
        (json.dumps({"schema_version": 99, "shards": [], "num_samples": 0}), "schema_version 99"),
        (json.dumps({"schema_version": 1, "shards": [entry("../x.tar")], "num_samples": 3}), "unsafe"),
        (json.dumps({"schema_version": 1, "shards": [entry("sub/x.tar")], "num_samples": 3}), "unsafe"),
        (json.dumps({"schema_version": 1, "shards": [entry("/etc/x.tar")], "num_samples": 3}), "unsafe"),
        (json.dumps({"schema_version": 1, "shards": [entry(".."), entry()], "num_samples": 6}), "unsafe"),
        (json.dumps({"schema_version": 1, "shards": [entry(), entry()], "num_samples": 6}), "twice"),
        (json.dumps({"schema_version": 1, "shards": [entry()], "num_samples": 4}), "differs"),
        (
            json.dumps({"schema_version": 1, "shards": [{"name": "a.tar"}], "num_samples": 0}),
            "missing or of the wrong",
        ),
    ],
)
def test_bad_manifests_are_refused_naming_the_file(tmp_path, content, message):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)


def test_writer_side_refuses_traversal(tmp_path):
    with pytest.raises(ManifestError, match="unsafe"):
        write_manifest(tmp_path, [entry("../x.tar")])
    assert not (tmp_path / "manifest.json").exists()
