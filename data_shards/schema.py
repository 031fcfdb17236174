"""The shard schema: one protein record, its validation, and its tar-member encoding.

This module is the single source of truth for what a sample in a shard looks like. A sample is a
group of tar members sharing a WebDataset ``__key__`` (the member name before the first dot):

=====================  ===================================================================
member                 content
=====================  ===================================================================
``<key>.seq.txt``      one-letter amino acids, utf-8 (optional)
``<key>.backbone.npz`` ``np.savez`` archive: ``coords`` (L, 4, 3) float32 (N, CA, C, O, in Å),
                       ``atom_mask`` (L, 4) bool, optional ``plddt`` (L,) float32 and optional
                       ``residue_number`` (L,) int32 (author numbering)
``<key>.text.json``    function text fields, see :data:`TEXT_STR_FIELDS` (optional)
``<key>.meta.json``    ``{"id": ..., "source": ..., ...}`` (always present)
=====================  ===================================================================

Arrays are only ever loaded with ``allow_pickle=False`` and their headers are checked before any
data is read; members with any other extension make the sample bad. No pickle, ever.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1

MODALITIES = ("sequence", "structure", "text")
BACKBONE_ATOMS = ("N", "CA", "C", "O")
SEQ_EXT = "seq.txt"
BACKBONE_EXT = "backbone.npz"
_BACKBONE_ARRAYS = ("coords", "atom_mask", "plddt", "residue_number")
TEXT_EXT = "text.json"
META_EXT = "meta.json"
MEMBER_EXTS = (SEQ_EXT, BACKBONE_EXT, TEXT_EXT, META_EXT)

TEXT_STR_FIELDS = ("name", "function", "location", "similarity")
TEXT_LIST_FIELDS = ("go", "ec")
# Optional text keys added after schema version 1 was frozen; they are validated when present but
# never filled in by normalize_text, so records without them encode to the same bytes as before
# and older shards decode unchanged:
#   text["rewrites"]          list of non-empty strings: alternative descriptions written offline
#                             (``python -m data_shards rewrite``), picked by data_shards.text_rules
#   text["go"][i]["definition"]  the GO term's definition from the OBO (``build --go-obo``)
TEXT_REWRITES_FIELD = "rewrites"
MAX_REWRITES = 64
GO_ASPECTS = ("F", "P", "C")

MAX_KEY_LEN = 80  # USTAR member names hold 100 bytes; the longest extension is ".backbone.npz"
MAX_NPZ_ARRAY_BYTES = 256 << 20  # refuse arrays whose header declares more than this

_SEQ_RE = re.compile(r"[A-Z]+")
_GO_ID_RE = re.compile(r"GO:\d{7}")
_EC_RE = re.compile(r"\d+\.(\d+|-)\.(\d+|-)\.(n?\d+|-)")
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]")


class SchemaError(ValueError):
    """A record or an encoded member does not follow the shard schema."""


@dataclass
class Backbone:
    """Backbone coordinates of one chain.

    Shapes:
        coords: (L, 4, 3) float32, atoms N, CA, C, O in Å; values where ``atom_mask`` is False are
            meaningless (writers store 0).
        atom_mask: (L, 4) bool, True where the atom was observed.
        plddt: (L,) float32 per-residue confidence for predicted models, else None.
        residue_number: (L,) int32 author residue numbers (PDB/mmCIF ``auth_seq_id``), else None.
            Readers keep observed residues only; the numbers tell how many residues a gap between
            two of them hides (``pretrain.data.featurize.chain_positions``).
    """

    coords: np.ndarray
    atom_mask: np.ndarray
    plddt: np.ndarray | None = None
    residue_number: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.coords.shape[0])


@dataclass
class ProteinRecord:
    """One protein with any subset of the three modalities plus metadata.

    Attributes:
        id: protein id (accession, PDB chain "1abc_A", ...); stored in meta.json as "id".
        sequence: one-letter amino acids, uppercase, or None.
        backbone: :class:`Backbone` or None.
        text: {"name", "function", "location", "similarity": str, "go": [{"id", "aspect", "name"[,
            "definition"]}], "ec": [str][, "rewrites": [str]]} or None; decoded records always carry
            the six base fields ("" / [] when missing); "definition" and "rewrites" only when stored.
        meta: {"source": str, "evidence": str | int, "organism": str, ...free keys}; decoded records
            also carry "id".
    """

    id: str
    sequence: str | None
    backbone: Backbone | None
    text: dict | None
    meta: dict = field(default_factory=dict)

    def modalities(self) -> set[str]:
        """The modalities present, a subset of {"sequence", "structure", "text"}."""
        present = set()
        if self.sequence is not None:
            present.add("sequence")
        if self.backbone is not None:
            present.add("structure")
        if self.text is not None:
            present.add("text")
        return present


# ----------------------------------------------------------------------------- validation


def validate_sequence(sequence: str) -> None:
    """Raise SchemaError unless ``sequence`` is a non-empty string of uppercase letters A-Z."""
    if not isinstance(sequence, str) or not _SEQ_RE.fullmatch(sequence):
        shown = repr(sequence)[:40]
        raise SchemaError(f"sequence must be non-empty uppercase letters A-Z, got {shown}")


def validate_backbone(backbone: Backbone) -> None:
    """Raise SchemaError unless shapes, dtypes and finiteness follow the schema."""
    if not isinstance(backbone, Backbone):
        raise SchemaError(f"backbone must be a Backbone, got {type(backbone).__name__}")
    coords, mask, plddt = backbone.coords, backbone.atom_mask, backbone.plddt
    if not isinstance(coords, np.ndarray) or coords.dtype != np.float32:
        raise SchemaError(f"coords must be a float32 array, got {getattr(coords, 'dtype', type(coords))}")
    if coords.ndim != 3 or coords.shape[1:] != (4, 3) or coords.shape[0] < 1:
        raise SchemaError(f"coords must have shape (L, 4, 3) with L >= 1, got {coords.shape}")
    length = coords.shape[0]
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise SchemaError(f"atom_mask must be a bool array, got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape != (length, 4):
        raise SchemaError(f"atom_mask must have shape ({length}, 4), got {mask.shape}")
    if not np.isfinite(coords[mask]).all():
        raise SchemaError("coords are not finite where atom_mask is True")
    if plddt is not None:
        if not isinstance(plddt, np.ndarray) or plddt.dtype != np.float32:
            raise SchemaError(f"plddt must be a float32 array, got {getattr(plddt, 'dtype', type(plddt))}")
        if plddt.shape != (length,):
            raise SchemaError(f"plddt must have shape ({length},), got {plddt.shape}")
        if not np.isfinite(plddt).all():
            raise SchemaError("plddt is not finite")
    numbers = backbone.residue_number
    if numbers is not None:
        if not isinstance(numbers, np.ndarray) or numbers.dtype != np.int32:
            raise SchemaError(f"residue_number must be an int32 array, got {getattr(numbers, 'dtype', type(numbers))}")
        if numbers.shape != (length,):
            raise SchemaError(f"residue_number must have shape ({length},), got {numbers.shape}")


def validate_text(text: dict) -> None:
    """Raise SchemaError unless ``text`` is a dict whose known fields have the right types."""
    if not isinstance(text, dict):
        raise SchemaError(f"text must be a dict, got {type(text).__name__}")
    for name in TEXT_STR_FIELDS:
        if name in text and not isinstance(text[name], str):
            raise SchemaError(f"text.{name} must be a string, got {type(text[name]).__name__}")
    go = text.get("go", [])
    if not isinstance(go, list):
        raise SchemaError(f"text.go must be a list, got {type(go).__name__}")
    for term in go:
        if not isinstance(term, dict):
            raise SchemaError(f"text.go entries must be dicts, got {type(term).__name__}")
        if not isinstance(term.get("id"), str) or not _GO_ID_RE.fullmatch(term["id"]):
            raise SchemaError(f"text.go id must look like 'GO:0005524', got {term.get('id')!r}")
        if term.get("aspect") not in GO_ASPECTS:
            raise SchemaError(f"text.go aspect must be one of {GO_ASPECTS}, got {term.get('aspect')!r}")
        if not isinstance(term.get("name", ""), str):
            raise SchemaError("text.go name must be a string")
        if not isinstance(term.get("definition", ""), str):
            raise SchemaError("text.go definition must be a string")
    ec = text.get("ec", [])
    if not isinstance(ec, list):
        raise SchemaError(f"text.ec must be a list, got {type(ec).__name__}")
    for number in ec:
        if not isinstance(number, str) or not _EC_RE.fullmatch(number):
            raise SchemaError(f"text.ec entries must look like '2.7.11.1', got {number!r}")
    rewrites = text.get(TEXT_REWRITES_FIELD, [])
    if not isinstance(rewrites, list) or len(rewrites) > MAX_REWRITES:
        raise SchemaError(f"text.rewrites must be a list of at most {MAX_REWRITES} strings")
    for rewrite in rewrites:
        if not isinstance(rewrite, str) or not rewrite.strip():
            raise SchemaError(f"text.rewrites entries must be non-empty strings, got {rewrite!r}"[:120])


def validate_meta(meta: dict, record_id: str | None = None) -> None:
    """Raise SchemaError unless ``meta`` is a JSON-able dict with a string "source".

    "evidence" (str or int) and "organism" (str) are optional but typed; "id", when present, must
    equal ``record_id``.
    """
    if not isinstance(meta, dict):
        raise SchemaError(f"meta must be a dict, got {type(meta).__name__}")
    if not isinstance(meta.get("source"), str) or not meta["source"]:
        raise SchemaError("meta.source must be a non-empty string")
    evidence = meta.get("evidence")
    if evidence is not None and (isinstance(evidence, bool) or not isinstance(evidence, (str, int))):
        raise SchemaError(f"meta.evidence must be a string or an int, got {type(evidence).__name__}")
    if "organism" in meta and not isinstance(meta["organism"], str):
        raise SchemaError("meta.organism must be a string")
    if record_id is not None and "id" in meta and meta["id"] != record_id:
        raise SchemaError(f"meta.id {meta['id']!r} differs from the record id {record_id!r}")


def validate_record(record: ProteinRecord) -> None:
    """Raise SchemaError unless ``record`` follows the schema (including len(sequence) == L)."""
    if not isinstance(record, ProteinRecord):
        raise SchemaError(f"expected a ProteinRecord, got {type(record).__name__}")
    if not isinstance(record.id, str) or not record.id:
        raise SchemaError("record id must be a non-empty string")
    if not record.modalities():
        raise SchemaError(f"record {record.id!r} has no modality")
    if record.sequence is not None:
        validate_sequence(record.sequence)
    if record.backbone is not None:
        validate_backbone(record.backbone)
    if record.sequence is not None and record.backbone is not None:
        if len(record.sequence) != len(record.backbone):
            raise SchemaError(
                f"sequence length {len(record.sequence)} differs from backbone length {len(record.backbone)}"
            )
    if record.text is not None:
        validate_text(record.text)
    validate_meta(record.meta, record.id)


def normalize_text(text: dict) -> dict:
    """Return ``text`` with every known field present ("" / [] when missing); other keys are kept."""
    out = {name: "" for name in TEXT_STR_FIELDS}
    out.update({name: [] for name in TEXT_LIST_FIELDS})
    out.update(text)
    return out


def safe_key(record_id: str) -> str:
    """Map an id to a WebDataset key: chars outside [A-Za-z0-9_-] become '_', long ids are shortened.

    Uniqueness inside a shard set is the writer's job (it appends a counter on collision).
    """
    key = _KEY_BAD_CHARS.sub("_", record_id) or "_"
    if len(key) > MAX_KEY_LEN - 8:
        import hashlib

        digest = hashlib.sha1(record_id.encode("utf-8")).hexdigest()[:10]
        key = f"{key[: MAX_KEY_LEN - 20]}_{digest}"
    return key


# ----------------------------------------------------------------------------- encoding


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def encode_record(record: ProteinRecord) -> dict[str, bytes]:
    """Validate ``record`` and encode it as {extension: bytes} (deterministic bytes)."""
    validate_record(record)
    members = {META_EXT: _json_bytes({**record.meta, "id": record.id})}
    if record.sequence is not None:
        members[SEQ_EXT] = record.sequence.encode("ascii")
    if record.backbone is not None:
        arrays = {"coords": record.backbone.coords, "atom_mask": record.backbone.atom_mask}
        if record.backbone.plddt is not None:
            arrays["plddt"] = record.backbone.plddt
        if record.backbone.residue_number is not None:
            arrays["residue_number"] = record.backbone.residue_number
        stream = io.BytesIO()
        np.savez(stream, **arrays)
        members[BACKBONE_EXT] = stream.getvalue()
    if record.text is not None:
        members[TEXT_EXT] = _json_bytes(normalize_text(record.text))
    return members


def _reject_constant(name: str):
    raise SchemaError(f"JSON constant {name} is not allowed")


def decode_json(data: bytes, what: str) -> dict:
    """Decode a JSON member that must hold an object."""
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise SchemaError(f"{what}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise SchemaError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def decode_sequence(data: bytes) -> str:
    """Decode a ``.seq.txt`` member: utf-8, stripped, uppercased, letters only."""
    try:
        sequence = data.decode("utf-8").strip().upper()
    except UnicodeDecodeError as exc:
        raise SchemaError(f"sequence is not utf-8 ({exc})") from None
    validate_sequence(sequence)
    return sequence


def decode_backbone(data: bytes) -> Backbone:
    """Decode a ``.backbone.npz`` member without ever unpickling.

    Every array header is read first: object dtypes, unsupported format versions and oversized
    arrays are refused before any data is loaded; loading itself uses ``allow_pickle=False``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise SchemaError("backbone is not an npz (zip) archive") from None
    with archive:
        names = archive.namelist()
        arrays = {}
        for name in names:
            if not name.endswith(".npy") or name[:-4] not in _BACKBONE_ARRAYS:
                raise SchemaError(f"backbone npz holds an unexpected entry {name!r}")
            if name[:-4] in arrays:
                raise SchemaError(f"backbone npz holds {name!r} twice")
            try:
                with archive.open(name) as handle:
                    _check_npy_header(handle, name)
                with archive.open(name) as handle:
                    arrays[name[:-4]] = np.lib.format.read_array(handle, allow_pickle=False)
            except SchemaError:
                raise
            # RuntimeError: an encrypted entry; NotImplementedError: an unknown compression method or flag
            except (
                ValueError,
                OSError,
                EOFError,
                zipfile.BadZipFile,
                MemoryError,
                RuntimeError,
                NotImplementedError,
            ) as exc:
                raise SchemaError(f"backbone npz entry {name!r} is unreadable ({exc})") from None
    if "coords" not in arrays or "atom_mask" not in arrays:
        raise SchemaError(f"backbone npz must hold coords and atom_mask, has {sorted(arrays)}")
    backbone = Backbone(arrays["coords"], arrays["atom_mask"], arrays.get("plddt"), arrays.get("residue_number"))
    validate_backbone(backbone)
    return backbone


def _check_npy_header(handle, name: str) -> None:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(handle)
        else:
            raise SchemaError(f"backbone npz entry {name!r} has unsupported npy version {version}")
    except ValueError as exc:
        raise SchemaError(f"backbone npz entry {name!r} has a bad header ({exc})") from None
    if dtype.hasobject:
        raise SchemaError(f"backbone npz entry {name!r} is an object array (pickle refused)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_NPZ_ARRAY_BYTES:
        raise SchemaError(f"backbone npz entry {name!r} declares {nbytes} bytes (limit {MAX_NPZ_ARRAY_BYTES})")


def decode_sample(members: dict[str, bytes]) -> ProteinRecord:
    """Decode {extension: bytes} into a validated ProteinRecord; SchemaError on anything wrong."""
    unknown = sorted(set(members) - set(MEMBER_EXTS))
    if unknown:
        raise SchemaError(f"unexpected member extension(s) {unknown}")
    if META_EXT not in members:
        raise SchemaError("meta.json is missing")
    meta = decode_json(members[META_EXT], "meta.json")
    record_id = meta.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise SchemaError("meta.json has no string 'id'")
    sequence = decode_sequence(members[SEQ_EXT]) if SEQ_EXT in members else None
    backbone = decode_backbone(members[BACKBONE_EXT]) if BACKBONE_EXT in members else None
    text = None
    if TEXT_EXT in members:
        text = normalize_text(decode_json(members[TEXT_EXT], "text.json"))
    record = ProteinRecord(id=record_id, sequence=sequence, backbone=backbone, text=text, meta=meta)
    validate_record(record)
    return record
