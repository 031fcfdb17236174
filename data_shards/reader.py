"""ShardReader: random access to the samples of one shard tar.

The tar is indexed once with the stdlib ``tarfile`` (member offsets grouped by WebDataset key, in
file order); reading sample ``i`` then seeks to its members and decodes them with the schema's
decoders, never re-reading the whole file and never unpickling. A shard that cannot be indexed
(truncated, garbled, no end-of-archive marker, compressed: random access needs a plain tar)
raises :class:`BadShardError`; a sample with any bad member raises :class:`BadSampleError` and
leaves the other samples readable.

Readers are cheap to pickle (the index travels, the file handle is reopened lazily), so they can
be handed to Ray actors or DataLoader workers.

``path`` may also be an object-storage URL or a ``pipe:`` command (:mod:`data_shards.storage`):
a remote shard is indexed and read through range requests on one seekable handle, a pipe's
output is held in memory; the dataset is never downloaded as a whole.
"""

from __future__ import annotations

import os
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_shards import storage
from data_shards.schema import MEMBER_EXTS, ProteinRecord, SchemaError, decode_sample

MAX_MEMBER_BYTES = 256 << 20
# WebDataset's split of a member name into (__key__, extension): the key ends at the first dot of
# the last path component.
_KEY_EXT_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BLOCK = tarfile.BLOCKSIZE


class BadSampleError(Exception):
    """One sample of a shard is bad; ``shard``, ``key`` and ``reason`` say which and why."""

    def __init__(self, shard: str, key: str, reason: str):
        super().__init__(shard, key, reason)
        self.shard, self.key, self.reason = shard, key, reason

    def __str__(self) -> str:
        return f"{self.shard}: bad sample {self.key!r}: {self.reason}"


class BadShardError(Exception):
    """A whole shard is unreadable; the message names the file."""

    def __init__(self, shard: str, reason: str):
        super().__init__(shard, reason)
        self.shard, self.reason = shard, reason

    def __str__(self) -> str:
        return f"{self.shard}: unreadable shard: {self.reason}"


@dataclass
class _Sample:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset_data, size)
    problem: str | None = None


def _open(path: Path | str):
    """(handle, size) of a shard; remote handles are fsspec files, pipes are in-memory buffers."""
    if not storage.is_url(path):
        handle = open(path, "rb")
        return handle, os.fstat(handle.fileno()).st_size
    handle = storage.open_read(path)
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    return handle, size


def _index(path: Path | str) -> tuple[list[_Sample], object]:
    """Index a shard; returns the samples and the still-open handle (reused for reads)."""
    samples: list[_Sample] = []
    seen: set[str] = set()
    handle = None
    try:
        handle, file_size = _open(path)
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for info in tar:
                key, ext = _split_name(info.name)
                if not samples or samples[-1].key != key:
                    samples.append(_Sample(key))
                    if key in seen:
                        samples[-1].problem = "key repeated in non-contiguous members"
                    seen.add(key)
                sample = samples[-1]
                if info.offset_data + info.size > file_size:
                    raise BadShardError(str(path), f"member {info.name!r} runs past the end of the file")
                if sample.problem:
                    continue
                if not info.isreg():
                    sample.problem = f"member {info.name!r} is not a regular file"
                elif ext not in MEMBER_EXTS:
                    sample.problem = f"unexpected member {info.name!r} (allowed: {', '.join(MEMBER_EXTS)})"
                elif ext in sample.members:
                    sample.problem = f"member {info.name!r} appears twice"
                elif info.size > MAX_MEMBER_BYTES:
                    sample.problem = f"member {info.name!r} has {info.size} bytes (limit {MAX_MEMBER_BYTES})"
                else:
                    sample.members[ext] = (info.offset_data, info.size)
            end = tar.offset  # where the end-of-archive marker must start
        handle.seek(end)
        marker = handle.read(_BLOCK)
    except BadShardError:
        if handle is not None:
            handle.close()
        raise
    except FileNotFoundError:
        raise BadShardError(str(path), "file not found") from None
    except storage.StorageError as exc:
        raise BadShardError(str(path), exc.reason) from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        if handle is not None:
            handle.close()
        raise BadShardError(str(path), f"{type(exc).__name__}: {exc}") from None
    # tarfile silently stops at a truncated or garbled header; a complete tar ends in zero blocks
    if len(marker) < _BLOCK or marker.count(0) != _BLOCK:
        handle.close()
        if len(marker) < _BLOCK:
            raise BadShardError(str(path), f"truncated: no end-of-archive marker at byte {end}")
        raise BadShardError(str(path), f"garbled tar header at byte {end}")
    return samples, handle


def _split_name(name: str) -> tuple[str, str]:
    match = _KEY_EXT_RE.match(name)
    if match is None:
        return name, ""
    return match.group(1), match.group(2)


class ShardReader:
    """Random access to the samples of one shard.

    Args:
        path: the shard tar: a local path, an object-storage URL or a ``pipe:`` command.

    Raises:
        BadShardError: the tar cannot be indexed (missing, truncated, garbled).

    Example::

        reader = ShardReader("data/demo/train/shard-000000.tar")
        record = reader.read(3)  # ProteinRecord
    """

    def __init__(self, path: str | Path):
        self.remote = storage.is_url(path)
        self.path: Path | str = str(path) if self.remote else Path(path)
        self._samples, handle = _index(self.path)
        if self.remote:  # keep the remote handle (its read-ahead cache, or a pipe's bytes)
            self._handle = handle
        else:
            handle.close()
            self._handle = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._samples)

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path, "remote": self.remote, "_samples": self._samples, "_handle": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def keys(self) -> list[str]:
        """Sample keys in file order."""
        return [sample.key for sample in self._samples]

    def read_members(self, i: int) -> dict[str, bytes]:
        """Raw member bytes of sample ``i`` as {extension: bytes}; BadSampleError if it is bad."""
        if not 0 <= i < len(self._samples):  # e.g. a manifest that promises more than the tar holds
            raise BadSampleError(str(self.path), f"#{i}", f"index out of range: the shard holds {len(self)} samples")
        sample = self._samples[i]
        if sample.problem:
            raise BadSampleError(str(self.path), sample.key, sample.problem)
        if not sample.members:
            raise BadSampleError(str(self.path), sample.key, "sample has no members")
        # members of one key are contiguous: one read covers them all
        start = min(offset for offset, _ in sample.members.values())
        stop = max(offset + size for offset, size in sample.members.values())
        with self._lock:
            if self._handle is None:
                try:
                    self._handle = _open(self.path)[0]
                except OSError as exc:  # StorageError included
                    raise BadShardError(str(self.path), f"{type(exc).__name__}: {exc}") from None
            if not self.remote and hasattr(os, "pread"):  # positional read: no lock needed, but cheap
                span = os.pread(self._handle.fileno(), stop - start, start)
            else:
                try:
                    self._handle.seek(start)
                    span = self._handle.read(stop - start)
                except OSError as exc:
                    raise BadSampleError(str(self.path), sample.key, f"read failed: {exc}") from None
        if len(span) != stop - start:
            raise BadSampleError(str(self.path), sample.key, "short read (file changed since indexing?)")
        return {ext: span[offset - start : offset - start + size] for ext, (offset, size) in sample.members.items()}

    def read(self, i: int) -> ProteinRecord:
        """Decode and validate sample ``i`` (position in file order).

        Raises:
            BadSampleError: ``i`` is out of range, or a member is missing, unexpected, undecodable
                or off-schema.
        """
        members = self.read_members(i)
        try:
            return decode_sample(members)
        except SchemaError as exc:
            raise BadSampleError(str(self.path), self._samples[i].key, str(exc)) from None

    def close(self) -> None:
        """Close the file handle (reads after close reopen it)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def iter_records(path: str | Path, skip_bad: bool = False) -> Iterator[ProteinRecord]:
    """Yield the records of one shard in file order.

    Args:
        path: the shard tar.
        skip_bad: skip bad samples instead of raising BadSampleError.
    """
    with ShardReader(path) as reader:
        for i in range(len(reader)):
            try:
                yield reader.read(i)
            except BadSampleError:
                if not skip_bad:
                    raise
