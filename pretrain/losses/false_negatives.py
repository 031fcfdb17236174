"""False-negative group ids: proteins with the same function text are one class.

In UniProt many different proteins carry identical annotations (the same terse name + family
sentence, or exactly the same GO set). Plain CLIP treats each such pair as a negative and pushes
apart embeddings that the data says should coincide.

This module computes the per-protein group ids (collate side). The loss that uses them, with its
semantics ("deduplication, a group is one class"), is :func:`kernels.grouped.grouped_symmetric_infonce`,
which also owns the ``NO_GROUP`` sentinel of a protein without a class.

Group ids must agree across processes: they are blake2b hashes, never Python's salted ``hash``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from data_shards.text_rules import canonical_text
from kernels.grouped import NO_GROUP

GROUP_MODES = ("text", "go")


# ----------------------------------------------------------------------------- group ids


def _stable_hash(text: str) -> int:
    """Non-negative 63-bit hash, identical in every process and run."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def group_key(fields: dict | None, mode: str = "text") -> str | None:
    """The canonical string two proteins must share to be one class (None: no class).

    ``"text"``: the canonical description (``canonical_text``), lower-cased, whitespace collapsed.
    ``"go"``: the sorted set of GO ids (an empty set is no class).
    """
    if mode not in GROUP_MODES:
        raise ValueError(f"group mode must be one of {GROUP_MODES}, got {mode!r}")
    if not fields:
        return None
    if mode == "text":
        key = " ".join(canonical_text(fields).lower().split())
    else:
        ids = sorted({(t.get("id") or "").strip() for t in fields.get("go") or []} - {""})
        key = "go:" + ",".join(ids) if ids else ""
    return key or None


def group_ids(text_fields: Sequence[dict | None], mode: str = "text") -> Tensor:
    """Per-protein group id for false-negative handling (collate side).

    Args:
        text_fields: per protein, the record's text fields (None when absent).
        mode: ``"text"`` (identical canonical text) or ``"go"`` (identical GO-id set).

    Shapes:
        -> (B,) int64, >= 0, or ``NO_GROUP`` for proteins without a class.
    """
    keys = [group_key(f, mode) for f in text_fields]
    return torch.tensor([NO_GROUP if k is None else _stable_hash(k) for k in keys], dtype=torch.int64)
