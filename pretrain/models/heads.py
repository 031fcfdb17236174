"""Projection heads mapping encoder outputs into the shared embedding space."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """Two-layer MLP: Linear -> GELU -> Dropout -> Linear. The output is not normalised.

    Args:
        in_dim: encoder output width.
        out_dim: shared embedding width.
        hidden_dim: width of the hidden layer (default: ``in_dim``).
        dropout: dropout after the activation.

    Shapes:
        x (..., in_dim) -> (..., out_dim)
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
