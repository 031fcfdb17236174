"""ShardWriter: ProteinRecords → WebDataset tar shards + manifest.json.

Shards are real WebDataset tars written with ``webdataset.TarWriter`` (USTAR, sorted members per
sample) with fixed mtime/uid/gid/uname/gname/mode, so that the same records give byte-identical
shards and reproducible sha256 checksums. Each shard is written to a hidden temp file and fsynced
when it is complete; nothing in the directory changes until :meth:`ShardWriter.close`, which
renames the finished shards into place, writes the manifest atomically and only then removes old
shards of the prefix that the new set does not reuse. A build that fails before ``close`` (or
calls ``abort``) leaves the previous shards and manifest as they were. While a set is rebuilt,
the old and the new shards are both on disk. Only a crash inside ``close``, between its renames
and the manifest write (milliseconds), can leave shards newer than the manifest; ``validate``
reports that as checksum mismatches.

Not safe for two writers on the same directory at the same time.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from data_shards.manifest import (
    MANIFEST_NAME,
    ShardInfo,
    check_shard_name,
    keys_digest,
    load_manifest,
    write_manifest,
)
from data_shards.schema import MAX_KEY_LEN, MODALITIES, ProteinRecord, encode_record, safe_key

TAR_MTIME = 0  # fixed member metadata: reproducible bytes
TAR_USER = "align-pro"
TAR_MODE = 0o444
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class _HashingFile:
    """Write-only file wrapper that tracks sha256 and size of what passes through it."""

    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class ShardWriter:
    """Write records into ``out_dir/<prefix>-000000.tar``, ``-000001.tar``, ... plus the manifest.

    Args:
        out_dir: the shard directory (created if needed).
        prefix: shard file prefix; letters, digits, '_', '-', '.' only (no path parts).
        samples_per_shard: samples per tar; the last shard may hold fewer.
        extra: free JSON-able dict merged into the manifest's "extra" (split, seed, ...).
        overwrite: replace existing ``<prefix>-*.tar`` shards; without it they are an error.

    Shards of other prefixes already listed in ``out_dir/manifest.json`` are kept in the updated
    manifest, so several writers (one per source) can fill one directory one after another.
    Keys are ``safe_key(record.id)``, made unique within this writer by a ``_2``, ``_3``... suffix.
    If the ``with`` block raises, this writer's new shards are removed and the directory is as it
    was: with ``overwrite=True`` the previous shards are replaced only when ``close`` commits.

    Example::

        with ShardWriter("data/demo/train", samples_per_shard=400, extra={"split": "train"}) as w:
            for record in records:
                w.write(record)
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        samples_per_shard: int = 1000,
        extra: dict | None = None,
        overwrite: bool = False,
    ):
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix) or ".." in prefix:
            raise ValueError(f"unsafe shard prefix {prefix!r}: use letters, digits, '_', '-', '.' only")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = int(samples_per_shard)
        self.extra = dict(extra or {})
        self.overwrite = overwrite
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._old = sorted(self.out_dir.glob(f"{_glob_escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
        if self._old and not overwrite:
            raise FileExistsError(f"{self._old[0]} already exists (pass overwrite=True to replace the shards)")
        # an existing manifest must be sound before anything is written next to it
        self._previous = load_manifest(self.out_dir) if (self.out_dir / MANIFEST_NAME).exists() else None
        self._keys: set[str] = set()
        self._infos: list[ShardInfo] = []
        self._staged: list[Path] = []  # finished shards under hidden names, same order as _infos
        self._tar = None
        self._closed = False

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------ writing

    @property
    def num_samples(self) -> int:
        """Samples written so far."""
        done = sum(info.num_samples for info in self._infos)
        return done + (len(self._shard_keys) if self._tar is not None else 0)

    @property
    def shard_infos(self) -> list[ShardInfo]:
        """The shards completed so far."""
        return list(self._infos)

    def write(self, record: ProteinRecord, props: dict | None = None) -> str:
        """Validate, encode and append one record; returns the key it was stored under.

        Args:
            record: the record.
            props: optional JSON-able per-sample values (e.g. {"existence": 1, "coverage": 4});
                when any sample of a shard has them, the shard's manifest entry gets
                ``"sample_props": {name: [value per sample, null where absent]}``.

        Raises:
            SchemaError: the record does not follow the schema (nothing is written).
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        members = encode_record(record)
        key = self._unique_key(safe_key(record.id))
        if self._tar is None:
            self._open_shard()
        sample = {"__key__": key, **members}
        self._tar.write(sample)
        self._shard_keys.append(key)
        self._shard_props.append(dict(props) if props else None)
        counts = self._shard_modalities
        for modality in record.modalities():
            counts[modality] += 1
        if len(self._shard_keys) >= self.samples_per_shard:
            self._finish_shard()
        return key

    def close(self) -> None:
        """Finish the open shard, move the new shards into place, write/update manifest.json,
        then remove the replaced shards the new set does not reuse."""
        if self._closed:
            return
        if self._tar is not None:
            self._finish_shard()
        self._closed = True
        for staged, info in zip(self._staged, self._infos):
            os.replace(staged, info.path)
        kept, extra = [], {}
        if self._previous is not None:
            own = re.compile(re.escape(self.prefix) + r"-\d{6}\.tar")
            kept = [s for s in self._previous.shards if not own.fullmatch(s.name)]
            extra = self._previous.extra
        infos = sorted(kept + self._infos, key=lambda s: s.name)
        write_manifest(self.out_dir, infos, {**extra, **self.extra})
        new_names = {info.name for info in self._infos}
        for old in self._old:  # only now: until the manifest is written the old set stays whole
            if old.name not in new_names:
                old.unlink(missing_ok=True)

    def abort(self) -> None:
        """Discard everything this writer produced; previous shards and the manifest are not touched."""
        if self._closed:
            return
        self._closed = True
        if self._tar is not None:
            self._tar.close()
            self._handle.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None
        for staged in self._staged:
            staged.unlink(missing_ok=True)

    # ------------------------------------------------------------------ internals

    def _unique_key(self, key: str) -> str:
        unique, n = key, 1
        while unique in self._keys:
            n += 1
            suffix = f"_{n}"
            unique = key[: MAX_KEY_LEN - len(suffix)] + suffix
        self._keys.add(unique)
        return unique

    def _open_shard(self) -> None:
        from webdataset import TarWriter  # imported lazily: webdataset pulls in torch (~2 s)

        name = check_shard_name(f"{self.prefix}-{len(self._infos):06d}.tar", str(self.out_dir))
        self._path = (self.out_dir / name).absolute()
        self._tmp = self.out_dir / f".{name}.{os.getpid()}.tmp"
        self._handle = open(self._tmp, "wb")
        self._hashing = _HashingFile(self._handle)
        self._tar = TarWriter(
            self._hashing,
            user=TAR_USER,
            group=TAR_USER,
            mode=TAR_MODE,
            encoder=False,
            mtime=TAR_MTIME,
        )
        self._shard_keys: list[str] = []
        self._shard_props: list[dict | None] = []
        self._shard_modalities = {m: 0 for m in MODALITIES}

    def _finish_shard(self) -> None:
        self._tar.close()
        self._tar = None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._staged.append(self._tmp)  # renamed to self._path by close()
        self._infos.append(
            ShardInfo(
                name=self._path.name,
                path=self._path,
                num_samples=len(self._shard_keys),
                sha256=self._hashing.sha256.hexdigest(),
                bytes=self._hashing.bytes,
                modalities=dict(self._shard_modalities),
                keys_sha256=keys_digest(self._shard_keys),
                sample_props=_collect_props(self._shard_props),
            )
        )


def _collect_props(per_sample: list[dict | None]) -> dict[str, list] | None:
    names = sorted({name for props in per_sample if props for name in props})
    if not names:
        return None
    return {name: [props.get(name) if props else None for props in per_sample] for name in names}


def _glob_escape(text: str) -> str:
    # prefixes are already restricted to safe characters; this is belt and braces
    return re.sub(r"([*?\[])", r"[\1]", text)
