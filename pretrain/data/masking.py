"""Masking and text segmentation for the ProtCLIP objectives (MLM, BSR, PDA); pure and rng-driven.

Every random choice comes from the ``numpy.random.Generator`` passed in, so a batch's masks are a
pure function of (seed, epoch, batch index) and resumed runs replay them, like the text augmentation.

- :func:`mlm_mask`: BERT 80/10/10 masking of residue tokens (ESM-2's own MLM objective).
- :func:`bsr_span_mask` / :func:`span_mask_tokens`: ProtCLIP's biotext-guided static segment
  reconstruction (BSR) input: contiguous residue spans of 5-10, at least 15% of every protein.
- :func:`text_segments` / :func:`tokenize_segments`: a protein's function text split into property
  segments, and one tokenised text whose every token carries the index of its segment (PDA).
- :func:`protclip_inputs`: all of the above for one collated batch (what the collate adds).

Differences from the public ProtCLIP code (``src/utils.py``, ``src/task/pretrain_task.py``), on
purpose: the 15% span budget counts the protein's residues, not its padded length, and spans never
touch BOS / EOS / padding (the public code draws spans over the padded row, then drops special
positions, so short proteins in a long batch get fewer masked residues); span lengths are drawn
i.i.d. in ``[min_span, max_span]`` (the public loop re-draws from its previous draw, so lengths
shrink); spans never overlap or touch, so every masked run is exactly one span; MLM uses BERT's
80/10/10 instead of 100% ``<mask>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pretrain.models.protclip_modules import IGNORE_INDEX, NUM_SEGMENTS, SEGMENTS

_GO_PREFIX = {"F": "Molecular function: ", "P": "Biological process: ", "C": "Cellular component: "}
CANONICAL_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # BERT's 10% random replacements draw from these


# ----------------------------------------------------------------------------- sequence masks


def _special_ids(alphabet) -> Tensor:
    return torch.tensor([alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx, alphabet.mask_idx])


def residue_positions(tokens: Tensor, alphabet) -> Tensor:
    """True where ``tokens`` holds a residue (not BOS, EOS, padding or ``<mask>``).

    Shapes:
        tokens (B, L) long -> (B, L) bool
    """
    return ~torch.isin(tokens, _special_ids(alphabet).to(tokens.device))


def mlm_mask(tokens: Tensor, alphabet, rng: np.random.Generator, prob: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT masking of residue tokens: each residue is selected with ``prob``; a selected residue
    becomes ``<mask>`` (80%), a random canonical amino acid (10%) or stays unchanged (10%).

    BOS, EOS and padding are never selected. Selection is Bernoulli per residue (as in ESM-2), so a
    short protein may get no masked residue; its labels are then all ignored.

    Args:
        tokens: ESM tokens from ``tokenize_sequences`` (BOS + residues + EOS, padded).
        alphabet: the ESM alphabet (``cls_idx``, ``eos_idx``, ``padding_idx``, ``mask_idx``).
        rng: drives every choice.
        prob: selection probability per residue.

    Shapes:
        tokens (B, L) long -> masked_tokens (B, L) long, labels (B, L) long

    Returns:
        ``(masked_tokens, labels)``: labels hold the original token at selected positions and
        ``IGNORE_INDEX`` elsewhere.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    shape = tuple(tokens.shape)
    maskable = residue_positions(tokens, alphabet).cpu().numpy()
    selected = (rng.random(shape) < prob) & maskable
    action = rng.random(shape)  # < 0.8: <mask>; < 0.9: random residue; else unchanged
    aa_ids = np.array([alphabet.get_idx(a) for a in CANONICAL_AMINO_ACIDS])
    random_aa = aa_ids[rng.integers(0, len(aa_ids), size=shape)]
    out = tokens.cpu().numpy().copy()
    out[selected & (action < 0.8)] = alphabet.mask_idx
    swap = selected & (action >= 0.8) & (action < 0.9)
    out[swap] = random_aa[swap]
    labels = np.where(selected, tokens.cpu().numpy(), IGNORE_INDEX)
    return torch.from_numpy(out).to(tokens.device), torch.from_numpy(labels).to(tokens.device)


def _place_spans(n: int, rng: np.random.Generator, min_span: int, max_span: int, ratio: float) -> np.ndarray:
    """Span mask of one protein with ``n`` residues (see :func:`bsr_span_mask`)."""
    masked = np.zeros(n, dtype=bool)
    if n == 0:
        return masked
    target = max(1, math.ceil(ratio * n))
    if n < min_span:  # too short for one span: mask the budget as a single run
        start = int(rng.integers(0, n - target + 1))
        masked[start : start + target] = True
        return masked
    # ``blocked`` marks masked residues and their neighbours: a new span may not start on, end on
    # or touch a masked residue, so maximal masked runs are exactly the drawn spans.
    blocked = np.zeros(n + 2, dtype=bool)  # padded by one on each side
    while masked.sum() < target:
        length = int(rng.integers(min_span, max_span + 1))
        placed = False
        for s in range(min(length, n), min_span - 1, -1):  # shorten the span if it no longer fits
            window = np.lib.stride_tricks.sliding_window_view(blocked[1 : n + 1], s)  # (n - s + 1, s)
            starts = np.flatnonzero(~window.any(axis=1))
            if starts.size:
                start = int(starts[rng.integers(0, starts.size)])
                masked[start : start + s] = True
                blocked[start : start + s + 2] = True  # the span and one neighbour on each side
                placed = True
                break
        if not placed:  # fragmented (never seen at ratio 0.15): take free residues left to right
            free = np.flatnonzero(~masked)
            masked[free[: target - int(masked.sum())]] = True
    return masked


def bsr_span_mask(
    lengths: Sequence[int],
    rng: np.random.Generator,
    min_span: int = 5,
    max_span: int = 10,
    ratio: float = 0.15,
    *,
    offset: int = 1,
    width: int | None = None,
) -> np.ndarray:
    """Contiguous residue spans to reconstruct from the function text (ProtCLIP's BSR).

    Per protein, spans of a length drawn uniformly in ``[min_span, max_span]`` are placed at random
    residue positions until at least ``ceil(ratio · n)`` of its ``n`` residues are masked (at most
    ``max_span - 1`` more). Spans neither overlap nor touch, so each maximal masked run is one span
    of length in ``[min_span, max_span]``. A protein shorter than ``min_span`` gets one run of
    ``ceil(ratio · n)`` residues.

    Args:
        lengths: residues per protein.
        rng: drives every choice.
        min_span, max_span: span length range (ProtCLIP: 5-10).
        ratio: minimum masked fraction of each protein's residues.
        offset: column of residue 0 (1 = after BOS, as in ``tokenize_sequences``).
        width: columns of the result (default ``max(lengths) + 2 · offset``, the token width).

    Shapes:
        -> (B, width) bool, True at masked residue columns; never True outside
        ``[offset, offset + n)``.
    """
    if not 1 <= min_span <= max_span:
        raise ValueError(f"need 1 <= min_span <= max_span, got {min_span}, {max_span}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    lengths = [int(n) for n in lengths]
    if width is None:
        width = max(lengths, default=0) + 2 * offset
    out = np.zeros((len(lengths), width), dtype=bool)
    for row, n in enumerate(lengths):
        if offset + n > width:
            raise ValueError(f"protein {row} has {n} residues, more than width {width} - offset {offset}")
        out[row, offset : offset + n] = _place_spans(n, rng, min_span, max_span, ratio)
    return out


def span_mask_tokens(
    tokens: Tensor,
    alphabet,
    rng: np.random.Generator,
    min_span: int = 5,
    max_span: int = 10,
    ratio: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """BSR input: :func:`bsr_span_mask` applied to ESM tokens, every masked residue set to ``<mask>``.

    Residues are the non-special tokens of each row (they follow BOS contiguously, as produced by
    ``tokenize_sequences``).

    Shapes:
        tokens (B, L) long -> masked_tokens (B, L) long, labels (B, L) long (``IGNORE_INDEX``
        outside the spans)
    """
    residues = residue_positions(tokens, alphabet)
    lengths = residues.sum(1).tolist()
    spans = torch.from_numpy(
        bsr_span_mask(lengths, rng, min_span, max_span, ratio, offset=1, width=tokens.shape[1])
    ).to(tokens.device)
    spans &= residues  # no-op for well-formed tokens; guards against any other layout
    masked = tokens.masked_fill(spans, alphabet.mask_idx)
    labels = torch.where(spans, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return masked, labels


# ----------------------------------------------------------------------------- text segments


def _sentence(text: str) -> str:
    text = " ".join((text or "").split())
    if not text:
        return ""
    return text if text.endswith(".") else text + "."


def text_segments(fields: dict | None) -> list[str]:
    """The function text of one protein as property segments, one per slot of :data:`SEGMENTS`.

    Slots: protein name, free-text function, subcellular location, family similarity, GO molecular
    function / biological process / cellular component terms, EC numbers. An absent property is an
    empty string (its slot is then masked out of PDA).

    Args:
        fields: a record's text fields (``name``, ``function``, ``location``, ``similarity``,
            ``go`` [{"id", "aspect", "name"}], ``ec`` [str]), or None.

    Returns:
        ``NUM_SEGMENTS`` strings.
    """
    if not fields:
        return [""] * NUM_SEGMENTS
    out = {
        "name": _sentence(fields.get("name", "")),
        "function": _sentence(fields.get("function", "")),
        "location": _sentence("Subcellular location: " + fields["location"]) if fields.get("location") else "",
        "similarity": _sentence(fields.get("similarity", "")),
    }
    for aspect, slot in (("F", "go_f"), ("P", "go_p"), ("C", "go_c")):
        names = [
            (t.get("name") or t.get("id") or "").strip() for t in fields.get("go") or [] if t.get("aspect") == aspect
        ]
        names = [n for n in names if n]
        out[slot] = _sentence(_GO_PREFIX[aspect] + "; ".join(names)) if names else ""
    ecs = [e for e in fields.get("ec") or [] if e]
    out["ec"] = _sentence("EC " + ", ".join(ecs)) if ecs else ""
    return [out[s] for s in SEGMENTS]


def tokenize_segments(
    tokenizer,
    segments: Sequence[Sequence[str]],
    max_length: int,
    rng: np.random.Generator | None = None,
) -> dict[str, Tensor]:
    """One text per protein made of its segments, with the segment index of every token.

    The text is ``[CLS] seg_a seg_b ... [SEP]``: the non-empty segments in slot order, or (with
    ``rng``) the name first and the rest in a random order. Segments are tokenised separately and
    concatenated, which for BERT's whitespace/punctuation pre-tokeniser gives exactly the ids of the
    joined string (tested). Tokens past ``max_length`` are cut; a segment left with no token is
    absent.

    Args:
        tokenizer: the BERT tokenizer (``build_tokenizer``).
        segments: per protein, ``NUM_SEGMENTS`` strings from :func:`text_segments`.
        max_length: tokens per text, [CLS] and [SEP] included.
        rng: optional; shuffles the order of the non-name segments per protein.

    Shapes:
        -> ``text_ids`` (B, Lt) long, ``text_attn`` (B, Lt) long, ``segment_ids`` (B, Lt) long in
        ``[-1, S)`` (-1 on [CLS], [SEP] and padding), ``segment_present`` (B, S) bool, S = slots.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 ([CLS], one token, [SEP]); got {max_length}")
    num_slots = len(segments[0]) if len(segments) else NUM_SEGMENTS
    flat = [s for row in segments for s in row]
    encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    rows_ids, rows_seg = [], []
    for b, row in enumerate(segments):
        if len(row) != num_slots:
            raise ValueError(f"every protein needs {num_slots} segments; protein {b} has {len(row)}")
        order = [k for k in range(num_slots) if row[k]]
        if rng is not None:
            head, rest = (order[:1], order[1:]) if order and order[0] == 0 else ([], order)
            if len(rest) > 1:
                order = head + [rest[i] for i in rng.permutation(len(rest))]
        ids, seg = [tokenizer.cls_token_id], [-1]
        for k in order:
            piece = encoded[b * num_slots + k]
            ids += piece
            seg += [k] * len(piece)
        ids, seg = ids[: max_length - 1] + [tokenizer.sep_token_id], seg[: max_length - 1] + [-1]
        rows_ids.append(ids)
        rows_seg.append(seg)
    width = max((len(r) for r in rows_ids), default=0)
    text_ids = torch.full((len(rows_ids), width), tokenizer.pad_token_id, dtype=torch.long)
    segment_ids = torch.full((len(rows_ids), width), -1, dtype=torch.long)
    text_attn = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for b, (ids, seg) in enumerate(zip(rows_ids, rows_seg)):
        text_ids[b, : len(ids)] = torch.tensor(ids)
        segment_ids[b, : len(seg)] = torch.tensor(seg)
        text_attn[b, : len(ids)] = 1
    present = (segment_ids.unsqueeze(-1) == torch.arange(num_slots)).any(1)  # (B, S)
    return {"text_ids": text_ids, "text_attn": text_attn, "segment_ids": segment_ids, "segment_present": present}


def tokenize_segments_separately(
    tokenizer, segments: Sequence[Sequence[str]], max_length: int
) -> tuple[Tensor, Tensor]:
    """Every segment as its own text (``[CLS] seg [SEP]``), for an encoder pass per segment.

    The public ProtCLIP code encodes sub-texts this way; it costs one text pass over ``B · S`` rows
    instead of sharing the main text pass (:func:`tokenize_segments`). Empty segments are all padding.

    Shapes:
        -> input_ids (B, S, Ls) long, attention_mask (B, S, Ls) long
    """
    num_slots = len(segments[0]) if len(segments) else NUM_SEGMENTS
    flat = [s for row in segments for s in row]
    enc = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    rows = [
        ([tokenizer.cls_token_id] + e[: max_length - 2] + [tokenizer.sep_token_id]) if t else []
        for e, t in zip(enc, flat)
    ]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
    return ids.view(len(segments), num_slots, width), attn.view(len(segments), num_slots, width)


# ----------------------------------------------------------------------------- batch helper


def protclip_inputs(
    seq_tokens: Tensor,
    text_fields: Sequence[dict | None],
    alphabet,
    tokenizer,
    rng: np.random.Generator,
    *,
    text_max_length: int,
    mlm_prob: float = 0.15,
    min_span: int = 5,
    max_span: int = 10,
    span_ratio: float = 0.15,
    shuffle_segments: bool = True,
) -> dict[str, Tensor]:
    """Everything the ProtCLIP objectives add to a collated batch.

    ``rng`` is consumed in a fixed order (MLM, spans, segment order), so the result is a pure
    function of the inputs and the generator state.

    Args:
        seq_tokens: the batch's ESM tokens.
        text_fields: per protein, the record's text fields (None when absent).
        alphabet, tokenizer: the batch builder's.
        rng: the batch's generator.
        text_max_length: ``model.text.max_length``.
        mlm_prob, min_span, max_span, span_ratio: see :func:`mlm_mask` and :func:`bsr_span_mask`.
        shuffle_segments: random segment order after the name (training); False for evaluation.

    Returns:
        ``text_ids`` / ``text_attn`` (B, Lt): the segmented text, meant to *replace* the batch's
        main text so that one text pass serves GC, BSR and PDA; ``mlm_tokens``, ``mlm_labels``,
        ``bsr_tokens``, ``bsr_labels`` (B, Ls); ``segment_ids`` (B, Lt); ``segment_present`` (B, S).
    """
    mlm_tokens, mlm_labels = mlm_mask(seq_tokens, alphabet, rng, mlm_prob)
    bsr_tokens, bsr_labels = span_mask_tokens(seq_tokens, alphabet, rng, min_span, max_span, span_ratio)
    segs = [text_segments(f) for f in text_fields]
    text = tokenize_segments(tokenizer, segs, text_max_length, rng if shuffle_segments else None)
    return {
        **text,
        "mlm_tokens": mlm_tokens,
        "mlm_labels": mlm_labels,
        "bsr_tokens": bsr_tokens,
        "bsr_labels": bsr_labels,
    }
