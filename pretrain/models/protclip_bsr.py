"""ProtCLIP's BSR decoder (biotext-guided static segment reconstruction).

Contiguous residue spans are masked (:func:`pretrain.data.masking.protclip_inputs`) and reconstructed
by this decoder, whose residue queries cross-attend to the function text; the loss is
``loss_bsr`` of :mod:`pretrain.losses.protclip`. Built by :class:`pretrain.models.protclip_modules.ProtCLIPHeads`.
"""

from __future__ import annotations

from torch import Tensor, nn

from pretrain.models.key_mask import safe_key_mask


class _CrossBlock(nn.Module):
    """Pre-norm cross-attention (queries: residues, keys/values: text tokens) + MLP, both residual."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden, hidden)
        )

    def forward(self, x: Tensor, memory: Tensor, key_padding_mask: Tensor) -> Tensor:
        attended, _ = self.attn(self.norm_q(x), memory, memory, key_padding_mask=key_padding_mask, need_weights=False)
        x = x + attended
        return x + self.mlp(self.norm_mlp(x))


class BSRDecoder(nn.Module):
    """Predicts masked residues from span-masked residue states and the function text.

    Residue states (queries) cross-attend to the text token states (keys / values, padding masked)
    in ``layers`` pre-norm blocks; a LayerNorm + linear layer gives amino-acid logits at every
    position (the loss reads the masked spans only). There is no self-attention among residues:
    context from the rest of the protein is already in the encoder's states, and what the span
    lost must come from the text.

    Unlike the public ProtCLIP code, which runs the projections and the decoder under
    ``torch.no_grad()`` (so BSR trains only its output head and neither encoder), nothing here is
    detached: the BSR gradient reaches the decoder, the protein encoder and the text encoder, which
    is what "biotext-guided" reconstruction needs to shape both representations.

    Args:
        protein_dim: width of the residue states (ESM-2 embed dim).
        text_dim: width of the text token states (BERT hidden size).
        hidden: decoder width.
        layers: cross-attention blocks.
        heads: attention heads (must divide ``hidden``).
        vocab_size: output classes (the ESM alphabet, 33).
        dropout: attention and MLP dropout.

    Shapes:
        protein_states (B, Lp, Dp), text_states (B, Lt, Dt), text_mask (B, Lt) bool/int (1 = token)
        -> logits (B, Lp, vocab_size)
    """

    def __init__(
        self,
        protein_dim: int,
        text_dim: int,
        hidden: int = 512,
        layers: int = 1,
        heads: int = 8,
        vocab_size: int = 33,
        dropout: float = 0.0,
    ):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"BSR hidden {hidden} is not divisible by heads {heads}")
        self.query_in = nn.Linear(protein_dim, hidden)
        self.memory_in = nn.Sequential(nn.Linear(text_dim, hidden), nn.LayerNorm(hidden))
        self.blocks = nn.ModuleList(_CrossBlock(hidden, heads, dropout) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, vocab_size))

    def forward(self, protein_states: Tensor, text_states: Tensor, text_mask: Tensor) -> Tensor:
        x = self.query_in(protein_states)  # (B, Lp, H)
        memory = self.memory_in(text_states)  # (B, Lt, H)
        pad = ~safe_key_mask(text_mask.bool())  # (B, Lt) True = ignore
        for block in self.blocks:
            x = block(x, memory, pad)
        return self.out(x)  # (B, Lp, V)
