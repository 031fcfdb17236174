"""Key masks for attention / softmax over padded rows that never mask a whole row."""

from __future__ import annotations

import torch
from torch import Tensor


def safe_key_mask(valid: Tensor) -> Tensor:
    """``valid`` with position 0 switched on in rows that have no valid position at all.

    Attention / softmax over a row with every key masked gives NaN, and NaN poisons gradients even
    when the row is later excluded from the loss (0 · NaN = NaN). Such rows (a protein without text
    or without residues) attend to position 0 instead; the loss masks them out.
    """
    empty = ~valid.any(dim=-1, keepdim=True)
    first = torch.zeros_like(valid)
    first[..., 0] = True
    return valid | (empty & first)
