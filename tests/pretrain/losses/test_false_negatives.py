"""pretrain.losses.false_negatives: group ids (the deduplicated loss itself: tests/kernels/test_grouped.py)."""

from __future__ import annotations

import hashlib

import pytest

from pretrain.losses.false_negatives import NO_GROUP, group_ids, group_key

# ----------------------------------------------------------------------------- group ids


def test_group_ids_are_stable_hashes_and_ignore_phrasing_details():
    f1 = {"name": "Kinase A", "function": "Phosphorylates  X.", "go": [{"id": "GO:1", "aspect": "F", "name": "a"}]}
    f2 = {"name": "kinase a", "function": "Phosphorylates X.", "go": [{"id": "GO:1", "aspect": "F", "name": "a"}]}
    f3 = {"name": "Kinase B", "function": "Phosphorylates X.", "go": [{"id": "GO:1", "aspect": "F", "name": "a"}]}
    ids = group_ids([f1, f2, f3, None, {}])
    assert ids[0] == ids[1] != ids[2]
    assert ids[3] == NO_GROUP and ids[4] == NO_GROUP
    key = group_key(f1)
    want = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") & ((1 << 63) - 1)
    assert ids[0].item() == want  # blake2b, identical in every process (unlike hash())
    go = group_ids([f1, f3, {"go": []}], mode="go")
    assert go[0] == go[1] and go[2] == NO_GROUP  # GO mode: only the GO-id set counts
    g_ab = {"go": [{"id": "GO:2"}, {"id": "GO:1"}]}
    g_ba = {"go": [{"id": "GO:1"}, {"id": "GO:2"}, {"id": "GO:1"}]}
    assert group_ids([g_ab], mode="go") == group_ids([g_ba], mode="go")
    with pytest.raises(ValueError, match="group mode"):
        group_ids([f1], mode="ec")
