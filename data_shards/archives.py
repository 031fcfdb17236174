"""Structure files read where they are: members of ``*.tar`` archives (AlphaFold DB's per-proteome
tars of ``*.pdb.gz`` / ``*.cif.gz``) and single files on object storage, without unpacking.

An archive is listed once by its tar headers (:func:`list_members`: a seekable handle skips over the
data, on object storage by range reads), then each member is read on its own by offset
(:func:`read_member`): memory holds one member at a time, whatever the size of the archive.

A member's bytes are parsed in memory by
:func:`data_shards.readers.structures.read_structure_bytes` under the member's file name (which tells
AlphaFold models, as a path does); nothing is written to disk, and messages name
``archive.tar:member``. Single files on object storage (:class:`RemoteUnit`) are read the same way.

A damaged archive never stops a build: a member whose bytes are short or do not parse is skipped
with the reason counted, and an archive whose headers break keeps the members listed before the
break (one counted skip for the rest).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data_shards import storage
from data_shards.readers.structures import (
    StructureError,
    StructureFile,
    looks_like_structure_file,
    read_structure_bytes,
)
from data_shards.records import StructureUnit, stem_of

ARCHIVE_SUFFIXES = (".tar",)
UNREADABLE_ARCHIVE = "unreadable archive (rest of archive ignored)"


def is_archive(name: str | Path) -> bool:
    """True for a ``*.tar`` name (AlphaFold DB ships uncompressed tars of gzipped models)."""
    return str(name).lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class MemberUnit(StructureUnit):
    """A structure file inside an archive (``archive`` is a local path or URL); ``path`` is the
    member's own name (it gives the record id), ``offset``/``size`` locate its bytes."""

    archive: str = ""
    offset: int = 0
    size: int = 0


@dataclass
class ArchiveUnit(StructureUnit):
    """A whole archive not listed yet (the grouped build lists it inside the task that reads it)."""

    archive: str = ""


@dataclass
class RemoteUnit(StructureUnit):
    """A single structure file on object storage; ``url`` is read whole when parsed."""

    url: str = ""


def list_members(location: str | Path, display: str, skip, stats: dict) -> list[MemberUnit]:
    """The structure members of one tar archive, in archive order.

    Args:
        location: local path or URL of the archive.
        display: how the archive is named in record metadata and skip examples.
        skip: ``skip(reason, example)`` tally; a damaged archive counts one skip.
        stats: counters updated in place: ``archive_members`` (structure members listed),
            ``archive_members_ignored`` (other files, e.g. AlphaFold's JSON), and
            ``archive_members_other_format`` (a model present as .pdb.gz and .cif.gz: the first is kept).

    Returns:
        One :class:`MemberUnit` per structure member (``rows=None``: every protein chain).
    """
    units: list[MemberUnit] = []
    seen: set[str] = set()
    try:
        handle = storage.open_read(location)
    except (OSError, storage.StorageError) as exc:
        skip(UNREADABLE_ARCHIVE, f"{display}: {exc}")
        return units
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                tar.members.clear()  # headers already seen are not kept: flat memory for any archive
                if not info.isfile():
                    continue
                name = PurePosixPath(info.name)
                if not looks_like_structure_file(name.name):
                    stats["archive_members_ignored"] = stats.get("archive_members_ignored", 0) + 1
                    continue
                stem = stem_of(Path(name.name))
                if stem in seen:
                    stats["archive_members_other_format"] = stats.get("archive_members_other_format", 0) + 1
                    continue
                seen.add(stem)
                units.append(
                    MemberUnit(
                        Path(name.name), f"{display}:{info.name}", None, str(location), info.offset_data, info.size
                    )
                )
    except (tarfile.TarError, OSError, EOFError, storage.StorageError) as exc:
        skip(UNREADABLE_ARCHIVE, f"{display}: {type(exc).__name__}: {exc} (after {len(units)} members)")
    finally:
        handle.close()
    stats["archive_members"] = stats.get("archive_members", 0) + len(units)
    return units


class _Open:
    """The archive handle of this process (members of one archive are read one after another)."""

    location: str | None = None
    handle = None


def read_member(archive: str, offset: int, size: int, where: str) -> bytes:
    """The bytes of one archive member; StructureError when the archive ends before them."""
    if _Open.location != archive:
        if _Open.handle is not None:
            _Open.handle.close()
        _Open.handle, _Open.location = None, None
        try:
            _Open.handle = storage.open_read(archive)
        except (OSError, storage.StorageError) as exc:
            raise StructureError(f"{where}: cannot open the archive ({exc})") from None
        _Open.location = archive
    try:
        _Open.handle.seek(offset)
        data = _Open.handle.read(size)
    except (OSError, storage.StorageError) as exc:
        raise StructureError(f"{where}: unreadable archive member ({exc})") from None
    if len(data) != size:
        raise StructureError(f"{where}: archive member truncated ({len(data)} of {size} bytes)")
    return data


def parse_located(member: tuple, plddt: str, chains: set[str] | None) -> StructureFile:
    """Parse a structure given by ``member``: ("tar", archive, offset, size, name, where) or
    ("url", url, name, where). Raises StructureError naming the member."""
    if member[0] == "tar":
        _, archive, offset, size, name, where = member
        data = read_member(archive, offset, size, where)
    else:
        _, url, name, where = member
        try:
            data = storage.read_bytes(url)
        except (OSError, storage.StorageError) as exc:
            raise StructureError(f"{where}: unreadable ({exc})") from None
    return read_structure_bytes(data, name, plddt=plddt, chains=chains, where=where)


def located(unit: StructureUnit) -> tuple | None:
    """The ``member`` tuple of :func:`parse_located` for an archive member or remote file, else None."""
    if isinstance(unit, MemberUnit):
        return ("tar", unit.archive, unit.offset, unit.size, unit.path.name, unit.display)
    if isinstance(unit, RemoteUnit):
        return ("url", unit.url, unit.path.name, unit.display)
    return None
