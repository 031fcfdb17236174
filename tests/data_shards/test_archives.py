"""Archive members read in place (data_shards/archives.py): parsed from memory, equal to the
unpacked file, with messages naming ``archive.tar:member`` and no scratch file written."""

import builtins
import gzip
import tempfile
from pathlib import Path

import pytest

from data_shards.archives import list_members, located, parse_located
from data_shards.readers.structures import StructureError, read_structure
from tests.data_shards.test_reader import write_tar
from tests.data_shards.test_readers_structures import _backbone_pdb, _plain

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


class Tally:
    """The ``skip(reason, example)`` callable of list_members, remembering what it was told."""

    def __init__(self):
        self.seen = []

    def __call__(self, reason, example):
        self.seen.append((reason, example))


def forbid_writes(monkeypatch) -> None:
    """Fail on any file opened for writing and on any temporary folder (the old scratch-file path)."""
    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise AssertionError(f"wrote {file} while parsing an archive member")
        return real_open(file, mode, *args, **kwargs)

    def no_mkdtemp(*args, **kwargs):
        raise AssertionError("made a scratch folder while parsing an archive member")

    monkeypatch.setattr(builtins, "open", read_only_open)
    monkeypatch.setattr(tempfile, "mkdtemp", no_mkdtemp)


def test_members_parse_from_memory_as_the_unpacked_files(tmp_path):
    text = _backbone_pdb({"A": 9, "B": 5}).encode()
    files = {"models/1abc.pdb.gz": gzip.compress(text), "AF-Q9-F1-model_v4.pdb": text}
    models = sorted((SHARED / "alphafold").glob("AF-*.pdb.gz"))[:1] if (SHARED / "alphafold").is_dir() else []
    files.update({m.name: m.read_bytes() for m in models})
    archive = write_tar(
        tmp_path / "p.tar", [*files.items(), ("x.json", b"{}"), ("cut.pdb.gz", gzip.compress(text)[:50])]
    )
    for name, data in files.items():
        (tmp_path / Path(name).name).write_bytes(data)
    tally, stats = Tally(), {}
    units = list_members(archive, "p.tar", tally, stats)
    assert [u.display for u in units] == [f"p.tar:{n}" for n in files] + ["p.tar:cut.pdb.gz"]
    assert stats == {"archive_members": len(files) + 1, "archive_members_ignored": 1} and not tally.seen
    with pytest.MonkeyPatch.context() as patch:
        forbid_writes(patch)
        parsed = [parse_located(located(u), "auto", None) for u in units[:-1]]
        with pytest.raises(StructureError, match=r"^p\.tar:cut\.pdb\.gz: truncated gzip stream"):
            parse_located(located(units[-1]), "auto", None)
    for unit, got in zip(units, parsed):
        expected = read_structure(tmp_path / unit.path.name)
        expected.path = unit.display
        assert _plain(got) == _plain(expected)
    assert [p.predicted for p in parsed] == [False, True] + [True] * len(models)
