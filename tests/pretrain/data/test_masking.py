"""pretrain.data.masking: MLM / BSR span masks and text segments (invariants, determinism)."""

from __future__ import annotations

import math

import esm
import numpy as np
import pytest
import torch

from pretrain.data.masking import (
    IGNORE_INDEX,
    NUM_SEGMENTS,
    SEGMENTS,
    bsr_span_mask,
    mlm_mask,
    protclip_inputs,
    residue_positions,
    span_mask_tokens,
    text_segments,
    tokenize_segments,
    tokenize_segments_separately,
)
from pretrain.models.sequence_encoder import tokenize_sequences
from pretrain.models.text_encoder import TextEncoderConfig, build_tokenizer, tokenize_texts

ALPHABET = esm.Alphabet.from_architecture("ESM-1b")
SPECIALS = (ALPHABET.cls_idx, ALPHABET.eos_idx, ALPHABET.padding_idx)

FIELDS = {
    "name": "Serine/threonine kinase PK1",
    "function": "Catalyzes the phosphorylation of histone H3",
    "location": "Nucleus",
    "similarity": "Belongs to the protein kinase superfamily.",
    "go": [
        {"id": "GO:0004674", "aspect": "F", "name": "protein serine/threonine kinase activity"},
        {"id": "GO:0006281", "aspect": "P", "name": "DNA repair"},
        {"id": "GO:0005634", "aspect": "C", "name": "nucleus"},
        {"id": "GO:0005524", "aspect": "F", "name": "ATP binding"},
    ],
    "ec": ["2.7.11.1"],
}


def _random_tokens(lengths: list[int], seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)) for n in lengths]
    return tokenize_sequences(ALPHABET, seqs, max_length=2000)


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of the maximal True runs of a 1-D bool array."""
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]


# ----------------------------------------------------------------------------- MLM


def test_mlm_never_touches_specials_and_labels_only_selected():
    tokens = _random_tokens([5, 40, 300, 120])
    masked, labels = mlm_mask(tokens, ALPHABET, np.random.default_rng(0))
    special = ~residue_positions(tokens, ALPHABET)
    assert torch.equal(masked[special], tokens[special])
    assert torch.all(labels[special] == IGNORE_INDEX)
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], tokens[selected])
    assert torch.equal(masked[~selected], tokens[~selected])  # unselected residues never change


def test_mlm_ratio_and_80_10_10_split():
    tokens = _random_tokens([400] * 64, seed=1)
    masked, labels = mlm_mask(tokens, ALPHABET, np.random.default_rng(1), prob=0.15)
    selected = labels != IGNORE_INDEX
    residues = residue_positions(tokens, ALPHABET).sum().item()
    assert abs(selected.sum().item() / residues - 0.15) < 0.01
    n = selected.sum().item()
    to_mask = (masked[selected] == ALPHABET.mask_idx).sum().item() / n
    changed = ((masked[selected] != ALPHABET.mask_idx) & (masked[selected] != tokens[selected])).sum().item() / n
    assert abs(to_mask - 0.8) < 0.02
    assert abs(changed - 0.1 * 19 / 20) < 0.015  # a random amino acid equals the original 1 time in 20
    canonical = {ALPHABET.get_idx(a) for a in "ACDEFGHIKLMNPQRSTVWY"} | {ALPHABET.mask_idx}
    assert set(masked[selected].tolist()) <= canonical


def test_mlm_is_deterministic_per_seed():
    tokens = _random_tokens([50, 80])
    a = mlm_mask(tokens, ALPHABET, np.random.default_rng(7))
    b = mlm_mask(tokens, ALPHABET, np.random.default_rng(7))
    c = mlm_mask(tokens, ALPHABET, np.random.default_rng(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])


# ----------------------------------------------------------------------------- BSR spans

LENGTHS = [1, 3, 4, 5, 6, 12, 33, 40, 66, 100, 333, 1022]


def test_bsr_spans_have_length_5_to_10_and_cover_15_percent():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = bsr_span_mask(LENGTHS, rng)
        assert mask.shape == (len(LENGTHS), max(LENGTHS) + 2)
        for row, n in zip(mask, LENGTHS):
            assert not row[0] and not row[n + 1 :].any()  # BOS, EOS, padding untouched
            target = math.ceil(0.15 * n)
            count = int(row.sum())
            if n < 5:
                assert count == target and len(_runs(row)) == 1
                continue
            assert target <= count <= target + 9
            assert count / n >= 0.15
            for _start, length in _runs(row):
                assert 5 <= length <= 10


def test_bsr_span_mask_is_deterministic_and_respects_offset_and_width():
    a = bsr_span_mask(LENGTHS, np.random.default_rng(3))
    b = bsr_span_mask(LENGTHS, np.random.default_rng(3))
    assert np.array_equal(a, b)
    plain = bsr_span_mask([50], np.random.default_rng(4), offset=0, width=60)
    shifted = bsr_span_mask([50], np.random.default_rng(4), offset=1, width=60)
    assert plain.shape == (1, 60) and not plain[0, 50:].any()
    assert np.array_equal(plain[0, :59], shifted[0, 1:])
    with pytest.raises(ValueError, match="min_span"):
        bsr_span_mask([10], np.random.default_rng(0), min_span=6, max_span=5)


def test_span_mask_tokens_masks_spans_only():
    tokens = _random_tokens([8, 64, 200])
    masked, labels = span_mask_tokens(tokens, ALPHABET, np.random.default_rng(0))
    spans = labels != IGNORE_INDEX
    assert torch.all(masked[spans] == ALPHABET.mask_idx)
    assert torch.equal(labels[spans], tokens[spans])
    assert torch.equal(masked[~spans], tokens[~spans])
    assert not torch.isin(tokens[spans], torch.tensor(SPECIALS)).any()
    residues = residue_positions(tokens, ALPHABET).sum(1)
    assert torch.all(spans.sum(1) >= torch.ceil(0.15 * residues))


# ----------------------------------------------------------------------------- text segments


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TextEncoderConfig())


def test_text_segments_fill_their_slots():
    segs = text_segments(FIELDS)
    assert len(segs) == NUM_SEGMENTS
    by_slot = dict(zip(SEGMENTS, segs))
    assert by_slot["name"] == "Serine/threonine kinase PK1."
    assert by_slot["go_f"] == "Molecular function: protein serine/threonine kinase activity; ATP binding."
    assert by_slot["go_p"] == "Biological process: DNA repair."
    assert by_slot["location"] == "Subcellular location: Nucleus."
    assert by_slot["ec"] == "EC 2.7.11.1."
    assert text_segments(None) == [""] * NUM_SEGMENTS
    assert text_segments({"name": "X", "go": []})[SEGMENTS.index("go_c")] == ""


def test_tokenize_segments_matches_the_joined_text(tokenizer):
    rows = [text_segments(FIELDS), text_segments({"name": "Only a name"}), text_segments(None)]
    out = tokenize_segments(tokenizer, rows, max_length=128)
    joined = [" ".join(s for s in row if s) for row in rows]
    ids, attn = tokenize_texts(tokenizer, joined, 128)
    assert torch.equal(out["text_ids"], ids) and torch.equal(out["text_attn"], attn)
    seg = out["segment_ids"]
    assert torch.all(seg[out["text_attn"] == 0] == -1)  # padding
    assert torch.all(seg[:, 0] == -1)  # [CLS]
    for b in range(len(rows)):
        sep = int(attn[b].sum()) - 1
        assert seg[b, sep] == -1 and out["text_ids"][b, sep] == tokenizer.sep_token_id
        expected = torch.tensor([bool(s) for s in rows[b]])
        assert torch.equal(out["segment_present"][b], expected)
        # the tokens of segment k are exactly the tokenisation of segment k
        for k, text in enumerate(rows[b]):
            want = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            assert out["text_ids"][b][seg[b] == k].tolist() == want


def test_tokenize_segments_truncation_and_shuffle(tokenizer):
    rows = [text_segments(FIELDS)]
    short = tokenize_segments(tokenizer, rows, max_length=12)
    assert short["text_ids"].shape == (1, 12)
    assert short["segment_present"][0, 0] and not short["segment_present"][0, -1]  # EC was cut
    full = tokenize_segments(tokenizer, rows, max_length=128)
    a = tokenize_segments(tokenizer, rows, 128, np.random.default_rng(5))
    b = tokenize_segments(tokenizer, rows, 128, np.random.default_rng(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["segment_ids"][0, 1] == 0  # the name stays first
    for k in range(NUM_SEGMENTS):  # same tokens per segment, whatever the order
        assert (
            a["text_ids"][0][a["segment_ids"][0] == k].tolist()
            == full["text_ids"][0][full["segment_ids"][0] == k].tolist()
        )
    orders = {
        tuple(tokenize_segments(tokenizer, rows, 128, np.random.default_rng(s))["segment_ids"][0].tolist())
        for s in range(6)
    }
    assert len(orders) > 1


def test_tokenize_segments_separately_shapes(tokenizer):
    ids, attn = tokenize_segments_separately(tokenizer, [text_segments(FIELDS), text_segments(None)], 16)
    assert ids.shape[:2] == (2, NUM_SEGMENTS) and ids.shape == attn.shape
    assert attn[1].sum() == 0 and attn[0, 0].sum() > 2
    assert ids.shape[2] <= 16


def test_protclip_inputs_are_deterministic(tokenizer):
    tokens = _random_tokens([30, 70])
    fields = [FIELDS, None]
    a = protclip_inputs(tokens, fields, ALPHABET, tokenizer, np.random.default_rng(11), text_max_length=64)
    b = protclip_inputs(tokens, fields, ALPHABET, tokenizer, np.random.default_rng(11), text_max_length=64)
    assert set(a) == {
        "text_ids",
        "text_attn",
        "segment_ids",
        "segment_present",
        "mlm_tokens",
        "mlm_labels",
        "bsr_tokens",
        "bsr_labels",
    }
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["mlm_tokens"].shape == tokens.shape and a["segment_ids"].shape == a["text_ids"].shape
