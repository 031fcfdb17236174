"""ShardReader on damaged input: bad shards, bad samples, pickle payloads (data_shards/reader.py)."""

import io
import pathlib
import tarfile

import numpy as np
import pytest

from data_shards.reader import BadSampleError, BadShardError, ShardReader, iter_records
from data_shards.schema import Backbone, ProteinRecord, encode_record


def members_of(i: int, length: int = 5) -> dict[str, bytes]:
    rng = np.random.default_rng(i)
    return encode_record(
        ProteinRecord(
            id=f"S{i}",
            sequence="A" * length,
            backbone=Backbone(rng.normal(size=(length, 4, 3)).astype(np.float32), np.ones((length, 4), bool)),
            text={"name": f"s{i}"},
            meta={"source": "test"},
        )
    )


def write_tar(path: pathlib.Path, entries: list[tuple[str, bytes]]) -> pathlib.Path:
    """A plain tar written with the stdlib, so that tests can build any damage they need."""
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_entries(key: str, members: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for ext, data in sorted(members.items())]


def npz_bytes(**arrays) -> bytes:
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    return stream.getvalue()


class _Payload:
    """Unpickling this touches a file: proof that a pickle was executed."""

    def __init__(self, sentinel: pathlib.Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return pathlib.Path.touch, (self.sentinel,)


def test_bad_samples_are_reported_and_the_others_stay_readable(tmp_path):
    sentinel = tmp_path / "pickle-was-executed"
    evil = npz_bytes(coords=np.array([_Payload(sentinel)], dtype=object), atom_mask=np.ones((5, 4), bool))
    wrong_shape = npz_bytes(coords=np.zeros((5, 3, 3), np.float32), atom_mask=np.ones((5, 3), bool))
    entries = (
        sample_entries("good0", members_of(0))
        + sample_entries("pickled", {**members_of(1), "backbone.npz": evil})
        + sample_entries("shape", {**members_of(2), "backbone.npz": wrong_shape})
        + sample_entries("pklmember", {**members_of(3), "pkl": b"\x80\x04K\x01."})
        + sample_entries("nometa", {k: v for k, v in members_of(4).items() if k != "meta.json"})
        + sample_entries("good5", members_of(5))
    )
    path = write_tar(tmp_path / "damaged.tar", entries)
    reader = ShardReader(path)
    assert reader.keys() == ["good0", "pickled", "shape", "pklmember", "nometa", "good5"]
    assert reader.read(0).id == "S0" and reader.read(5).id == "S5"
    reasons = {}
    for i, key in [(1, "pickled"), (2, "shape"), (3, "pklmember"), (4, "nometa")]:
        with pytest.raises(BadSampleError) as info:
            reader.read(i)
        assert info.value.key == key and info.value.shard == str(path)
        assert str(path) in str(info.value) and key in str(info.value)
        reasons[key] = info.value.reason
    assert "object array" in reasons["pickled"] and "(L, 4, 3)" in reasons["shape"]
    assert "unexpected member" in reasons["pklmember"] and "meta.json" in reasons["nometa"]
    assert not sentinel.exists()  # the pickle never ran...
    np.load(io.BytesIO(evil), allow_pickle=True)["coords"]
    assert sentinel.exists()  # ...although it would have, had anyone allowed it
    assert [r.id for r in iter_records(path, skip_bad=True)] == ["S0", "S5"]
    with pytest.raises(BadSampleError):
        list(iter_records(path))
    with pytest.raises(BadSampleError, match="out of range"):
        reader.read(6)


def test_pickle_only_npy_and_oversized_header_are_refused(tmp_path):
    stream = io.BytesIO()
    np.save(stream, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    header_bomb = io.BytesIO()
    np.lib.format.write_array_header_1_0(header_bomb, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 4, 3)})
    import zipfile

    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr("coords.npy", header_bomb.getvalue())
        archive.writestr("atom_mask.npy", b"")
    entries = sample_entries("npy", {**members_of(0), "backbone.npz": stream.getvalue()})
    entries += sample_entries("bomb", {**members_of(1), "backbone.npz": bomb.getvalue()})
    reader = ShardReader(write_tar(tmp_path / "s.tar", entries))
    with pytest.raises(BadSampleError, match="npz"):
        reader.read(0)
    with pytest.raises(BadSampleError, match="declares"):
        reader.read(1)


def test_duplicate_and_non_contiguous_members_make_the_sample_bad(tmp_path):
    good = sample_entries("a", members_of(0))
    entries = good + good[:1] + sample_entries("b", members_of(1)) + sample_entries("a", members_of(2))
    reader = ShardReader(write_tar(tmp_path / "dup.tar", entries))
    assert reader.keys() == ["a", "b", "a"]
    with pytest.raises(BadSampleError, match="appears twice"):
        reader.read(0)
    assert reader.read(1).id == "S1"
    with pytest.raises(BadSampleError, match="non-contiguous"):
        reader.read(2)


def test_truncated_tars_raise_bad_shard_naming_the_file(tmp_path):
    entries = [e for i in range(4) for e in sample_entries(f"k{i}", members_of(i))]
    path = write_tar(tmp_path / "full.tar", entries)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        boundary = tar.getmembers()[5].offset  # a header boundary: tarfile alone would not notice
    for name, size in [("mid.tar", len(data) // 2), ("boundary.tar", boundary), ("one.tar", 100)]:
        cut = tmp_path / name
        cut.write_bytes(data[:size])
        with pytest.raises(BadShardError, match=name):
            ShardReader(cut)
    garbled = bytearray(data)
    garbled[boundary : boundary + 512] = b"\x07" * 512
    (tmp_path / "garbled.tar").write_bytes(bytes(garbled))
    with pytest.raises(BadShardError, match="garbled.tar"):
        ShardReader(tmp_path / "garbled.tar")
    with pytest.raises(BadShardError, match="missing.tar"):
        ShardReader(tmp_path / "missing.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(BadShardError, match="empty.tar"):
        ShardReader(tmp_path / "empty.tar")
    assert len(ShardReader(path)) == 4
