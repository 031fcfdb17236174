"""The structure encoder's input format: widths of the backbone-graph features.

``pretrain.data.featurize`` builds graphs of this format from coordinates and
``pretrain.models.structure_encoder`` consumes them; the widths live here, with the model, so
that the model never imports data code.
"""

from __future__ import annotations

NODE_S_DIM = 6  # sin/cos of phi, psi, omega
NODE_V_DIM = 3  # forward CA, backward CA, imputed CB direction
EDGE_V_DIM = 1  # unit direction source -> target


def edge_s_dim(num_rbf: int = 16, num_positional: int = 16) -> int:
    """Width of the scalar edge features: ``num_rbf`` distance RBFs + ``num_positional`` sequence-offset encodings."""
    return num_rbf + num_positional
