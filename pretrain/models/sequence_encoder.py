"""ESM-2 sequence encoder (fair-esm), with presets and safe local weight loading.

The model is fair-esm's own ``esm.model.esm2.ESM2``; only the loading path and the attention kernel
are ours. Attention runs through SDPA by default (``model.sequence.attention: fused``,
:mod:`pretrain.models.esm_attention`: same weights and outputs, no L × L matrices kept); the
loading path:
``esm.pretrained.load_model_and_alphabet_local`` unpickles the checkpoint with
``weights_only=False`` (arbitrary code execution, and an error on torch >= 2.6), so
:func:`load_esm2_weights` reads it with ``weights_only=True``, allowing only
``argparse.Namespace`` (the container the published checkpoints keep their config in).
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import esm
import torch
from esm.model.esm2 import ESM2
from torch import Tensor, nn

from pretrain.errors import ConfigError
from pretrain.models.activation_checkpointing import is_layer_checkpointed, set_layer_checkpointing
from pretrain.models.esm_attention import ATTENTION_MODES, esm_attention_mode, set_esm_attention

# name -> (num_layers, embed_dim, attention_heads), as published by fair-esm.
ESM2_PRESETS: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M": (6, 320, 20),
    "esm2_t12_35M": (12, 480, 20),
    "esm2_t30_150M": (30, 640, 20),
    "esm2_t33_650M": (33, 1280, 20),
    "esm2_t36_3B": (36, 2560, 40),
    "esm2_t48_15B": (48, 5120, 40),
}

# Published checkpoints ship the contact regression separately (not needed here);
# lm_head.weight is tied to embed_tokens.weight and rotary inv_freq buffers are recomputed
# at construction, so those may be left out too.
_OPTIONAL_KEYS = frozenset({"contact_head.regression.weight", "contact_head.regression.bias", "lm_head.weight"})
_OPTIONAL_SUFFIX = ".rot_emb.inv_freq"
_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")


@dataclass
class SequenceEncoderConfig:
    preset: str = "esm2_t6_8M"  # ESM2_PRESETS name, with or without the "_UR50D" suffix
    num_layers: int | None = None  # override the preset's transformer layers (tiny demo: 2)
    embed_dim: int | None = None  # override the preset's width (tiny demo: 64)
    attention_heads: int | None = None  # override the preset's heads (tiny demo: 4)
    token_dropout: bool = True  # ESM-2's rescaling of embeddings by the observed mask ratio
    max_length: int = 1022  # residues kept per sequence (cropped), excluding BOS / EOS
    weights: str | None = None  # local fair-esm .pt checkpoint or plain ESM2 state dict
    attention: str = "fused"  # "fused": SDPA (no L×L matrices kept); "reference": fair-esm's own bmm + softmax

    def validate(self, where: str = "model.sequence") -> None:
        """Checks of the subsection's values; raises ConfigError naming the field (``where`` + key)."""
        try:
            resolve_preset(self.preset)
        except ValueError as e:
            raise ConfigError(f"{where}.preset: {e}") from None
        for name in ("num_layers", "embed_dim", "attention_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{name}={value}: must be >= 1 (or null for the preset's)")
        if self.max_length < 1:
            raise ConfigError(f"{where}.max_length={self.max_length}: must be >= 1")
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"{where}.attention={self.attention!r}: expected one of {list(ATTENTION_MODES)}")
        _, dim, heads = resolve_preset(self.preset)
        dim = self.embed_dim if self.embed_dim is not None else dim
        heads = self.attention_heads if self.attention_heads is not None else heads
        if dim % heads:
            raise ConfigError(f"{where}.embed_dim={dim} is not divisible by {where}.attention_heads={heads}")


def resolve_preset(name: str) -> tuple[int, int, int]:
    """(num_layers, embed_dim, attention_heads) of an ESM-2 preset name.

    Args:
        name: e.g. ``"esm2_t33_650M"`` or ``"esm2_t33_650M_UR50D"``.
    """
    key = name.removesuffix("_UR50D")
    if key not in ESM2_PRESETS:
        raise ValueError(f"unknown ESM-2 preset {name!r}; known: {sorted(ESM2_PRESETS)}")
    return ESM2_PRESETS[key]


def _architecture(cfg: SequenceEncoderConfig) -> tuple[int, int, int]:
    layers, dim, heads = resolve_preset(cfg.preset)
    layers = cfg.num_layers if cfg.num_layers is not None else layers
    dim = cfg.embed_dim if cfg.embed_dim is not None else dim
    heads = cfg.attention_heads if cfg.attention_heads is not None else heads
    if dim % heads:
        raise ValueError(f"embed_dim {dim} is not divisible by attention_heads {heads}")
    return layers, dim, heads


def tokenize_sequences(alphabet: esm.data.Alphabet, seqs: list[str], max_length: int) -> Tensor:
    """Encode protein sequences as ESM-2 tokens: BOS + residues + EOS, right-padded.

    Args:
        alphabet: the ESM-1b / ESM-2 alphabet.
        seqs: one-letter sequences; case and whitespace are ignored, unknown letters map to
            ``<unk>``.
        max_length: residues kept per sequence (the first ``max_length``).

    Shapes:
        -> (B, Lmax + 2) long, padded with ``alphabet.padding_idx``.
    """
    encoded = [[alphabet.get_idx(ch) for ch in seq.upper() if not ch.isspace()][:max_length] for seq in seqs]
    width = max((len(e) for e in encoded), default=0) + 2
    tokens = torch.full((len(seqs), width), alphabet.padding_idx, dtype=torch.long)
    for row, ids in enumerate(encoded):
        tokens[row, 0] = alphabet.cls_idx
        tokens[row, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
        tokens[row, len(ids) + 1] = alphabet.eos_idx
    return tokens


def _read_field(container: object, names: tuple[str, ...]) -> object | None:
    """First of ``names`` found as a key or attribute of ``container``."""
    for name in names:
        if isinstance(container, Mapping) and name in container:
            return container[name]
        if not isinstance(container, Mapping) and hasattr(container, name):
            return getattr(container, name)
    return None


def _checkpoint_architecture(ckpt: Mapping) -> dict[str, int]:
    """num_layers / embed_dim / attention_heads recorded in a fair-esm checkpoint (if any)."""
    sources = []
    if isinstance(ckpt.get("cfg"), Mapping) and "model" in ckpt["cfg"]:
        sources.append(ckpt["cfg"]["model"])
    if ckpt.get("args") is not None:
        sources.append(ckpt["args"])
    fields = {
        "num_layers": ("encoder_layers", "layers", "num_layers"),
        "embed_dim": ("encoder_embed_dim", "embed_dim"),
        "attention_heads": ("encoder_attention_heads", "attention_heads"),
    }
    found: dict[str, int] = {}
    for source in sources:
        for field, names in fields.items():
            value = _read_field(source, names)
            if value is not None and field not in found:
                found[field] = int(value)
    return found


def _safe_load(path: Path) -> object:
    """``torch.load`` with ``weights_only=True``; ``argparse.Namespace`` is the one extra type."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(weights_only=True). Convert it to a plain state dict on a trusted machine. Cause: {err}"
        ) from err


def load_esm2_weights(module_or_esm2: nn.Module, path: str | Path) -> nn.Module:
    """Load a local ESM-2 checkpoint safely into a :class:`SequenceEncoder` or an ``ESM2``.

    Accepts the layout fair-esm publishes (``{"model": state_dict, "cfg": {"model": ...}}`` or with
    ``"args"``, keys possibly prefixed ``encoder.sentence_encoder.`` / ``encoder.``) and a plain
    ``ESM2.state_dict()``. The contact-regression weights may be absent; every other key must be
    present with the right shape.

    Args:
        module_or_esm2: the model to fill in place.
        path: local ``.pt`` file.

    Returns:
        ``module_or_esm2``.

    Raises:
        ValueError: unsafe pickle content, architecture recorded in the checkpoint differs from
            the model, or missing / unexpected / mis-shaped keys.
    """
    path = Path(path)
    model = module_or_esm2.esm if isinstance(module_or_esm2, SequenceEncoder) else module_or_esm2
    if not isinstance(model, ESM2):
        raise TypeError(f"expected a SequenceEncoder or esm ESM2, got {type(module_or_esm2).__name__}")
    ckpt = _safe_load(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    has_model = isinstance(ckpt.get("model"), Mapping)
    state = ckpt["model"] if has_model else ckpt

    expected_arch = {
        "num_layers": model.num_layers,
        "embed_dim": model.embed_dim,
        "attention_heads": model.attention_heads,
    }
    recorded = _checkpoint_architecture(ckpt) if has_model else {}
    clashes = {k: (v, expected_arch[k]) for k, v in recorded.items() if v != expected_arch[k]}
    if clashes:
        detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in clashes.items())
        raise ValueError(f"{path}: ESM-2 architecture differs from the configured model ({detail})")

    state = {_PREFIX.sub("", k): v for k, v in state.items()}
    _check_state_dict(path, model, state)
    model.load_state_dict(state, strict=False)
    return module_or_esm2


def _check_state_dict(path: Path, model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Strict key and shape comparison with an error that names the offending keys."""
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if k not in _OPTIONAL_KEYS and not k.endswith(_OPTIONAL_SUFFIX))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and (not isinstance(v, Tensor) or v.shape != own[k].shape)
    )
    problems = [
        f"{label} ({len(keys)}): {keys[:10]}{' ...' if len(keys) > 10 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(f"{path}: checkpoint does not match the ESM-2 model; " + "; ".join(problems))


class SequenceEncoder(nn.Module):
    """ESM-2 protein language model pooled to one vector per sequence.

    Args:
        cfg: preset, overrides and optional local weights.

    Shapes:
        tokens (B, L) from :func:`tokenize_sequences` -> (B, D)
    """

    def __init__(self, cfg: SequenceEncoderConfig):
        super().__init__()
        self.cfg = cfg
        num_layers, embed_dim, heads = _architecture(cfg)
        self.alphabet = esm.Alphabet.from_architecture("ESM-1b")
        self.esm = ESM2(
            num_layers=num_layers,
            embed_dim=embed_dim,
            attention_heads=heads,
            alphabet=self.alphabet,
            token_dropout=cfg.token_dropout,
        )
        self.output_dim = embed_dim
        if cfg.weights is not None:
            load_esm2_weights(self.esm, cfg.weights)
        self.set_attention(cfg.attention)

    def set_attention(self, mode: str) -> None:
        """``"fused"`` (SDPA) or ``"reference"`` (fair-esm's) self-attention in every ESM-2 layer.

        Calls that need attention probabilities (``self.esm(tokens, return_contacts=True)`` or
        ``need_head_weights=True``) run the reference attention for that call in either mode,
        since SDPA does not return them (:func:`pretrain.models.esm_attention.set_esm_attention`).
        """
        set_esm_attention(self.esm, mode)

    @property
    def attention(self) -> str:
        """The attention path in use: ``"fused"`` or ``"reference"``."""
        return esm_attention_mode(self.esm)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each ESM-2 layer's activations in backward (``pretrain.models.activation_checkpointing``)."""
        set_layer_checkpointing(self.esm.layers, enabled)

    @property
    def activation_checkpointing(self) -> bool:
        return all(is_layer_checkpointed(layer) for layer in self.esm.layers)

    def tokenize(self, seqs: list[str]) -> Tensor:
        """:func:`tokenize_sequences` with this encoder's alphabet and ``max_length``."""
        return tokenize_sequences(self.alphabet, seqs, self.cfg.max_length)

    def residue_representations(self, tokens: Tensor) -> Tensor:
        """Last-layer (final LayerNorm) representations of every position, BOS/EOS/PAD included.

        Shapes:
            tokens (B, L) -> (B, L, D)
        """
        return self.mlm_forward(tokens)[0]

    def mlm_forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Representations and language-model logits from one pass (for MLM objectives).

        Shapes:
            tokens (B, L) -> ((B, L, D), (B, L, V)) with V = len(alphabet)
        """
        layer = self.esm.num_layers
        out = self.esm(tokens, repr_layers=[layer])
        return out["representations"][layer], out["logits"]

    def residue_mask(self, tokens: Tensor) -> Tensor:
        """True at residue positions (not BOS, EOS or padding). Shapes: (B, L) -> (B, L) bool."""
        special = (self.alphabet.cls_idx, self.alphabet.eos_idx, self.alphabet.padding_idx)
        return ~torch.isin(tokens, torch.tensor(special, device=tokens.device))

    def forward(self, tokens: Tensor) -> Tensor:
        """Mean of the last-layer representations over real residues (zeros if there are none).

        Shapes:
            tokens (B, L) -> (B, D)
        """
        hidden = self.residue_representations(tokens)  # (B, L, D)
        mask = self.residue_mask(tokens).unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
