"""PDA's per-segment text encoding (``loss.protclip.pda_text: per_segment``, ProtCLIP's public code):
every property segment of a text encoded as its own ``[CLS] segment [SEP]`` text."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def segment_token_rows(
    text_ids: Tensor, text_attn: Tensor, segment_ids: Tensor, num_segments: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One text row per present segment: ``[CLS] <the segment's tokens> [SEP]``, padded with 0.

    [CLS] is each text's first token and [SEP] its last attended one (``tokenize_segments`` writes
    ``[CLS] seg_a seg_b ... [SEP]``); the segment's tokens keep their order.

    Shapes:
        text_ids, text_attn, segment_ids (B, Lt); -> ids (R, W) long, attn (R, W) long,
        pairs (R, 2) long ((protein, slot) of each row), counts (R,) tokens of each segment;
        R = present segments, W = 2 + the longest segment.
    """
    slots = torch.arange(num_segments, device=segment_ids.device)
    present = (segment_ids.unsqueeze(-1) == slots).any(1)  # (B, S)
    pairs = present.nonzero()  # (R, 2)
    rows, slot = pairs[:, 0], pairs[:, 1]
    member = segment_ids[rows] == slot.unsqueeze(1)  # (R, Lt)
    counts = member.sum(1)  # (R,)
    width = int(counts.max()) + 2 if len(pairs) else 2
    # positions of each segment's tokens first, in their order (stable sort of "not a member")
    order = torch.argsort((~member).to(torch.int8), dim=1, stable=True)[:, : width - 2]  # (R, W-2)
    body = text_ids[rows].gather(1, order)
    pos = torch.arange(width, device=text_ids.device)
    inside = pos[: width - 2].unsqueeze(0) < counts.unsqueeze(1)  # (R, W-2) the segment's own tokens
    ids = torch.zeros((len(pairs), width), dtype=text_ids.dtype, device=text_ids.device)
    ids[:, 1:-1] = torch.where(inside, body, torch.zeros_like(body))
    ids[:, 0] = text_ids[rows, 0]
    last = text_attn.long().sum(1).clamp(min=1) - 1  # (B,) the [SEP] of each text
    ids.scatter_(1, (counts + 1).unsqueeze(1), text_ids[rows, last[rows]].unsqueeze(1))
    attn = (pos.unsqueeze(0) < (counts + 2).unsqueeze(1)).to(text_attn.dtype)
    return ids, attn, pairs, counts


def encode_segments_separately(
    text_encoder: nn.Module, text_ids: Tensor, text_attn: Tensor, segment_ids: Tensor, num_segments: int
) -> tuple[Tensor, Tensor]:
    """PDA's segment means with each segment encoded on its own (ProtCLIP's public code).

    Every present segment becomes its own ``[CLS] segment [SEP]`` text (:func:`segment_token_rows`);
    one text-encoder pass over all of them gives token states, and each segment's mean runs over its
    own tokens ([CLS] / [SEP] excluded, as in the joint encoding). Unlike the public code (which
    encodes the segments under ``torch.no_grad``), the gradient reaches the text encoder, as in the
    joint encoding.

    Shapes:
        text_ids, text_attn, segment_ids (B, Lt) -> means (B, S, H), present (B, S) bool
    """
    ids, attn, pairs, counts = segment_token_rows(text_ids, text_attn, segment_ids, num_segments)
    b = text_ids.shape[0]
    present = torch.zeros((b, num_segments), dtype=torch.bool, device=text_ids.device)
    present[pairs[:, 0], pairs[:, 1]] = True
    if len(pairs) == 0:  # no text in the batch: nothing to encode (every segment absent)
        return torch.zeros((b, num_segments, text_encoder.output_dim), device=text_ids.device), present
    states = text_encoder.token_representations(ids, attn)  # (R, W, H)
    pos = torch.arange(ids.shape[1], device=ids.device)
    body = ((pos >= 1) & (pos <= counts.unsqueeze(1))).to(states.dtype).unsqueeze(-1)  # (R, W, 1)
    seg_means = (states * body).sum(1) / counts.clamp(min=1).to(states.dtype).unsqueeze(-1)  # (R, H)
    means = states.new_zeros((b, num_segments, states.shape[-1]))
    means = means.index_put((pairs[:, 0], pairs[:, 1]), seg_means)
    return means, present
