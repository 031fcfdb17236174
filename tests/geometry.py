"""Synthetic protein geometry shared by the featurisation and structure-encoder tests."""

from __future__ import annotations

import torch


def random_backbone(length: int, seed: int = 0) -> torch.Tensor:
    """Random-walk backbone (L, 4, 3) with 3.8 Å CA steps and N/C/O scattered around each CA."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(length, 3, generator=gen)
    ca = (3.8 * steps / steps.norm(dim=-1, keepdim=True)).cumsum(0)
    coords = ca.unsqueeze(1) + 1.3 * torch.randn(length, 4, 3, generator=gen)
    coords[:, 1] = ca
    return coords


def random_rotation(seed: int = 0) -> torch.Tensor:
    """A proper rotation (3, 3), det +1."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q
