"""ShardWriter → ShardReader round trips (data_shards/writer.py, data_shards/reader.py)."""

import hashlib
import pickle
import tarfile

import numpy as np
import pytest

from data_shards.manifest import load_manifest
from data_shards.reader import ShardReader, iter_records
from data_shards.schema import Backbone, ProteinRecord, SchemaError
from data_shards.writer import ShardWriter


def record(i: int, *, seq=True, struct=True, text=True, plddt=False, record_id=None) -> ProteinRecord:
    rng = np.random.default_rng(i)
    length = 6 + i % 5
    backbone = None
    if struct:
        coords = rng.normal(size=(length, 4, 3)).astype(np.float32)
        mask = rng.random((length, 4)) > 0.1
        backbone = Backbone(coords, mask, rng.uniform(30, 95, length).astype(np.float32) if plddt else None)
    return ProteinRecord(
        id=record_id or f"P{i:05d}",
        sequence="".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), length)) if seq else None,
        backbone=backbone,
        text={"name": f"protein {i}", "function": "Binds things.", "go": [], "ec": []} if text else None,
        meta={"source": "test", "evidence": i % 5 + 1, "organism": "E. coli"},
    )


def mixed_records(n: int) -> list[ProteinRecord]:
    return [record(i, seq=i % 4 != 1, struct=i % 4 != 2, text=i % 4 != 3, plddt=i % 2 == 0) for i in range(n)]


def assert_same(a: ProteinRecord, b: ProteinRecord) -> None:
    assert a.id == b.id and a.sequence == b.sequence and a.modalities() == b.modalities()
    if a.backbone is not None:
        np.testing.assert_array_equal(a.backbone.coords, b.backbone.coords)
        np.testing.assert_array_equal(a.backbone.atom_mask, b.backbone.atom_mask)
        if a.backbone.plddt is None:
            assert b.backbone.plddt is None
        else:
            np.testing.assert_array_equal(a.backbone.plddt, b.backbone.plddt)
    if a.text is not None:
        assert {k: b.text[k] for k in a.text} == a.text
    assert b.meta == {**a.meta, "id": a.id}


def test_round_trip_with_missing_modalities_and_plddt(tmp_path):
    records = mixed_records(23)
    with ShardWriter(tmp_path, samples_per_shard=10, extra={"split": "train"}) as writer:
        keys = [writer.write(r) for r in records]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar",
    ]  # fmt: skip
    manifest = load_manifest(tmp_path)
    assert manifest.num_samples == 23 and [s.num_samples for s in manifest.shards] == [10, 10, 3]
    assert manifest.extra == {"split": "train"}
    assert manifest.modalities == {
        m: sum(m in r.modalities() for r in records) for m in ("sequence", "structure", "text")
    }
    for info in manifest.shards:
        assert info.path.is_absolute() and info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    read = [r for info in manifest.shards for r in iter_records(info.path)]
    assert len(read) == 23
    for a, b in zip(records, read):
        assert_same(a, b)
    reader = ShardReader(manifest.shards[1].path)
    assert reader.keys() == keys[10:20] and len(reader) == 10
    assert_same(records[17], reader.read(7))  # random access
    assert_same(records[11], pickle.loads(pickle.dumps(reader)).read(1))  # readers travel to actors


def test_members_are_standard_webdataset_samples(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=100) as writer:
        writer.write(record(0, plddt=True))
        writer.write(record(1, struct=False))
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "P00000.backbone.npz", "P00000.meta.json", "P00000.seq.txt", "P00000.text.json",
        "P00001.meta.json", "P00001.seq.txt", "P00001.text.json",
    ]  # fmt: skip
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members} == {(0, 0, 0, "align-pro")}
    import webdataset as wds

    samples = list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["P00000", "P00001"]
    assert samples[0]["seq.txt"].decode() == record(0, plddt=True).sequence


def test_same_records_give_identical_bytes(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, samples_per_shard=4) as writer:
            for r in mixed_records(9):
                writer.write(r)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for shard in ("shard-000000.tar", "shard-000002.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_keys_are_safe_and_unique(tmp_path):
    ids = ["sp|P1|A_HUMAN", "sp_P1_A_HUMAN", "1abc.A", "../../escape", "x" * 200]
    with ShardWriter(tmp_path) as writer:
        keys = [writer.write(record(i, record_id=rid)) for i, rid in enumerate(ids)]
    assert keys[:3] == ["sp_P1_A_HUMAN", "sp_P1_A_HUMAN_2", "1abc_A"]
    assert len(set(keys)) == len(keys) and all(len(k) <= 80 and "/" not in k and "." not in k for k in keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert [r.id for r in iter_records(tmp_path / "shard-000000.tar")] == ids  # the real id survives


def test_invalid_record_is_refused_before_anything_is_written(tmp_path):
    bad = record(0)
    bad.sequence = bad.sequence[:-1]  # length no longer matches the backbone
    with ShardWriter(tmp_path) as writer:
        writer.write(record(1))
        with pytest.raises(SchemaError, match="length"):
            writer.write(bad)
    assert load_manifest(tmp_path).num_samples == 1


@pytest.mark.parametrize("prefix", ["../evil", "a/b", "", ".hidden", "..", "/abs"])
def test_unsafe_prefixes_are_refused(tmp_path, prefix):
    with pytest.raises(ValueError, match="prefix"):
        ShardWriter(tmp_path, prefix=prefix)


def test_existing_shards_need_overwrite_and_other_prefixes_are_kept(tmp_path):
    with ShardWriter(tmp_path, prefix="pdb", samples_per_shard=2, extra={"source": "pdb"}) as writer:
        for r in mixed_records(5):
            writer.write(r)
    with ShardWriter(tmp_path, prefix="uniprot", extra={"split": "train"}) as writer:
        writer.write(record(10, record_id="U1"))
    manifest = load_manifest(tmp_path)
    assert [s.name for s in manifest.shards] == [
        "pdb-000000.tar",
        "pdb-000001.tar",
        "pdb-000002.tar",
        "uniprot-000000.tar",
    ]
    assert manifest.num_samples == 6 and manifest.extra == {"source": "pdb", "split": "train"}
    with pytest.raises(FileExistsError, match="pdb-000000.tar"):
        ShardWriter(tmp_path, prefix="pdb")
    with ShardWriter(tmp_path, prefix="pdb", overwrite=True) as writer:
        writer.write(record(20))
    manifest = load_manifest(tmp_path)
    assert [s.name for s in manifest.shards] == ["pdb-000000.tar", "uniprot-000000.tar"]
    assert not (tmp_path / "pdb-000001.tar").exists() and manifest.num_samples == 2


def test_failure_inside_the_with_block_leaves_no_shards_and_no_manifest(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, samples_per_shard=2) as writer:
            for r in mixed_records(5):
                writer.write(r)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
