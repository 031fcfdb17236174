"""``manifest.json``: the per-directory index of a shard set (counts, checksums, modality coverage).

Layout::

    {"schema_version": 1, "created_by": "align-pro data_shards.writer", "num_samples": N,
     "shards": [{"name": "shard-000000.tar", "num_samples": n, "sha256": "...", "bytes": b,
                 "modalities": {"sequence": n_s, "structure": n_st, "text": n_t},
                 "keys_sha256": "...",
                 "sample_props": {"existence": [1, null, ...], "coverage": [4, 2, ...]}}],
     "modalities": {... totals ...}, "extra": {... free: split, seed, generator ...}}

``sample_props`` is optional: per-sample values in file order (null when unknown) that samplers
can use without opening the shard (the build writes ProtCLIP's existence level and property
coverage there, see :mod:`data_shards.sampling`).

The manifest holds no timestamps so that a deterministic build gives a byte-identical manifest.
Shard names are plain file names inside the manifest's directory; anything that could resolve
elsewhere ("../x.tar", "a/b.tar", absolute paths) is refused.

The directory may also be an object-storage URL (``s3://bucket/train``) or a ``pipe:`` template
(see :mod:`data_shards.storage`); shard paths are then URLs (strings) built the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from data_shards import storage
from data_shards.schema import MODALITIES, SCHEMA_VERSION

MANIFEST_NAME = "manifest.json"
CREATED_BY = "align-pro data_shards"


class ManifestError(ValueError):
    """The manifest is missing, malformed or unsafe; the message names the file."""


class ManifestNotFoundError(ManifestError, FileNotFoundError):
    """The shard directory or its manifest.json does not exist."""


@dataclass
class ShardInfo:
    """One shard as listed in the manifest; ``path`` is absolute and inside the manifest's dir
    (a string URL when the shard set lives in object storage)."""

    name: str
    path: Path | str
    num_samples: int
    sha256: str
    bytes: int
    modalities: dict[str, int]
    keys_sha256: str | None = None
    sample_props: dict[str, list] | None = None  # {prop: [value per sample in file order]}

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "num_samples": self.num_samples,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "modalities": {m: int(self.modalities.get(m, 0)) for m in MODALITIES},
        }
        if self.keys_sha256 is not None:
            out["keys_sha256"] = self.keys_sha256
        if self.sample_props is not None:
            out["sample_props"] = {k: list(v) for k, v in self.sample_props.items()}
        return out


@dataclass
class Manifest:
    """A loaded manifest: ``shards`` in manifest order, totals, and the free ``extra`` dict."""

    dir: Path | str  # absolute local directory, or the URL / pipe template it was loaded from
    schema_version: int
    created_by: str
    num_samples: int
    shards: list[ShardInfo]
    modalities: dict[str, int]
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> Path | str:
        """The manifest file."""
        return storage.join(self.dir, MANIFEST_NAME)

    @property
    def root(self) -> Path | str:
        """Alias of ``dir`` (the absolute shard directory)."""
        return self.dir


def keys_digest(keys: list[str]) -> str:
    """sha256 over the sample keys of a shard in file order (one per line)."""
    return hashlib.sha256("".join(k + "\n" for k in keys).encode("utf-8")).hexdigest()


def check_shard_name(name: object, where: str) -> str:
    """Return ``name`` if it is a plain ``*.tar`` file name, else raise ManifestError."""
    if (
        not isinstance(name, str)
        or not name.endswith(".tar")
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.basename(name) != name
    ):
        raise ManifestError(f"{where}: unsafe or invalid shard name {name!r} (must be a plain *.tar file name)")
    return name


def write_manifest(dir: str | Path, shard_infos: list[ShardInfo | dict], extra: dict | None = None) -> Path:
    """Write ``dir/manifest.json`` atomically (temp file + fsync + os.replace).

    Args:
        dir: the shard directory.
        shard_infos: ShardInfo objects or their JSON dicts (name, num_samples, sha256, bytes,
            modalities[, keys_sha256][, sample_props]); written in the given order.
        extra: free JSON-able dict (split, seed, generator, ...).

    Returns:
        The manifest path.
    """
    dir = Path(dir)
    path = dir / MANIFEST_NAME
    entries = [info.to_json() if isinstance(info, ShardInfo) else dict(info) for info in shard_infos]
    names = set()
    for entry in entries:
        check_shard_name(entry.get("name"), str(path))
        if entry["name"] in names:
            raise ManifestError(f"{path}: shard {entry['name']!r} listed twice")
        names.add(entry["name"])
    totals = {m: sum(int(e["modalities"].get(m, 0)) for e in entries) for m in MODALITIES}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": CREATED_BY,
        "num_samples": sum(int(e["num_samples"]) for e in entries),
        "shards": entries,
        "modalities": totals,
        "extra": dict(extra or {}),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    tmp = dir / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _field(obj: dict, key: str, kind: type | tuple, where: str):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"{where}: field {key!r} missing or of the wrong type ({value!r})")
    return value


def load_manifest(dir: str | Path) -> Manifest:
    """Load and check ``dir/manifest.json``.

    Raises:
        ManifestNotFoundError: the directory or the manifest does not exist.
        ManifestError: bad JSON, unknown schema_version, malformed fields, unsafe shard names,
            or counts that do not add up. Every message names the manifest file.
    """
    if storage.is_url(dir):
        root = str(dir).rstrip("/")
        path = storage.join(root, MANIFEST_NAME)
        try:
            data = storage.read_bytes(path)
        except storage.StorageError as exc:
            if "not found" in exc.reason and "bucket" not in exc.reason:
                raise ManifestNotFoundError(f"{path}: manifest not found") from None
            raise ManifestError(f"cannot read shard manifest: {exc}") from None
    else:
        dir = Path(dir)
        if not dir.is_dir():
            raise ManifestNotFoundError(f"shard directory {dir} does not exist")
        path = dir / MANIFEST_NAME
        if not path.is_file():
            raise ManifestNotFoundError(f"{path}: manifest not found")
        root = dir.resolve()
        data = path.read_bytes()
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: invalid JSON ({exc})") from None
    where = str(path)
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{where}: unknown schema_version {version!r} (this code reads {SCHEMA_VERSION})")
    shards, seen = [], set()
    for i, entry in enumerate(_field(raw, "shards", list, where)):
        spot = f"{where}: shards[{i}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{spot}: expected an object")
        name = check_shard_name(entry.get("name"), spot)
        if name in seen:
            raise ManifestError(f"{spot}: shard {name!r} listed twice")
        seen.add(name)
        modalities = _field(entry, "modalities", dict, spot)
        keys_sha = entry.get("keys_sha256")
        num = _field(entry, "num_samples", int, spot)
        props = entry.get("sample_props")
        if props is not None and (
            not isinstance(props, dict) or not all(isinstance(v, list) and len(v) == num for v in props.values())
        ):
            raise ManifestError(f"{spot}: 'sample_props' must map names to lists of {num} values")
        shards.append(
            ShardInfo(
                name=name,
                path=storage.join(root, name),
                num_samples=num,
                sha256=_field(entry, "sha256", str, spot),
                bytes=_field(entry, "bytes", int, spot),
                modalities={m: int(modalities.get(m, 0)) for m in MODALITIES},
                keys_sha256=keys_sha if isinstance(keys_sha, str) else None,
                sample_props=props,
            )
        )
    num_samples = _field(raw, "num_samples", int, where)
    if num_samples != sum(s.num_samples for s in shards):
        raise ManifestError(f"{where}: num_samples {num_samples} differs from the sum over shards")
    extra = raw.get("extra", {})
    if not isinstance(extra, dict):
        raise ManifestError(f"{where}: 'extra' must be an object")
    return Manifest(
        dir=root,
        schema_version=version,
        created_by=str(raw.get("created_by", "")),
        num_samples=num_samples,
        shards=shards,
        modalities={m: sum(s.modalities[m] for s in shards) for m in MODALITIES},
        extra=extra,
    )
