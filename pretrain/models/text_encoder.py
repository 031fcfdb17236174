"""BERT / PubMedBERT text encoder (transformers), offline only.

Either a randomly initialised BERT built from a preset (vocabulary from a local WordPiece file,
by default the bundled ``pretrain/assets/demo_vocab.txt``), or a local Hugging Face directory
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` + tokenizer files) loaded with
``local_files_only=True`` and ``weights_only=True``. Nothing is ever downloaded.

transformers 5.x notes: ``BertTokenizerFast`` is an alias of the tokenizers-backed
``BertTokenizer``, and its constructor silently ignores ``vocab_file=`` (every token becomes
``[UNK]``): the vocabulary must be passed as ``vocab=`` (a token -> id dict), as done here.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (transformers'
``attn_implementation="sdpa"``, requested explicitly on every construction path: an unsupported
setup then fails loudly instead of falling back to the eager L × L softmax). It equals the eager
implementation within fp32 rounding, padding included (tests/pretrain/models/test_text_encoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertTokenizerFast
from transformers.models.bert.tokenization_bert import load_vocab

from pretrain.errors import ConfigError

DEMO_VOCAB = Path(__file__).resolve().parent.parent / "assets" / "demo_vocab.txt"

# Architectures by name; the vocabulary size of a non-pretrained model comes from its tokenizer.
TEXT_PRESETS: dict[str, dict[str, int]] = {
    # microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract(-fulltext): BERT-base shape.
    "pubmedbert-base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=30522,
        max_position_embeddings=512,
    ),
    # google/bert_uncased_L-2_H-128_A-2 ("bert-tiny"): CPU demos and tests.
    "bert-tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        vocab_size=30522,
        max_position_embeddings=512,
    ),
}

_ATTENTION = "sdpa"  # transformers' attn_implementation (see the module docstring)

_OVERRIDES = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "attention_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
}


@dataclass
class TextEncoderConfig:
    preset: str = "pubmedbert-base"  # TEXT_PRESETS name (ignored when pretrained_dir is set)
    hidden_size: int | None = None  # override the preset's width
    num_layers: int | None = None  # override the preset's transformer layers
    attention_heads: int | None = None  # override the preset's attention heads
    intermediate_size: int | None = None  # override the preset's feed-forward width
    max_length: int = 128  # tokens per text, [CLS] and [SEP] included; longer texts are truncated
    pretrained_dir: str | None = None  # local HF directory with config, weights and vocabulary
    vocab_file: str | None = None  # WordPiece vocab for a fresh model (default: bundled demo vocab)
    pooling: str = "cls"  # "cls" (first token) or "mean" (over non-padding tokens)
    dropout: float = 0.1  # hidden and attention dropout (overrides a pretrained config's)

    def validate(self, where: str = "model.text") -> None:
        """Checks of the subsection's values that need no file; raises ConfigError naming the field."""
        for name in _OVERRIDES:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{name}={value}: must be >= 1 (or null for the preset's)")
        if self.max_length < 2:
            raise ConfigError(f"{where}.max_length={self.max_length}: must be >= 2 ([CLS] and [SEP] included)")
        if self.pooling not in ("cls", "mean"):
            raise ConfigError(f"{where}.pooling={self.pooling!r}: expected 'cls' or 'mean'")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout={self.dropout}: expected a value in [0, 1)")
        if self.pretrained_dir is not None and self.vocab_file is not None:
            raise ConfigError(f"{where}: set either pretrained_dir or vocab_file, not both")
        if self.pretrained_dir is not None:
            return  # the architecture is the directory's config.json (checked when the encoder is built)
        if self.preset not in TEXT_PRESETS:
            raise ConfigError(f"{where}.preset={self.preset!r}: unknown; known: {sorted(TEXT_PRESETS)}")
        arch = TEXT_PRESETS[self.preset]
        hidden = self.hidden_size if self.hidden_size is not None else arch["hidden_size"]
        heads = self.attention_heads if self.attention_heads is not None else arch["num_attention_heads"]
        if hidden % heads:
            raise ConfigError(f"{where}.hidden_size={hidden} is not divisible by {where}.attention_heads={heads}")
        if self.max_length > arch["max_position_embeddings"]:
            raise ConfigError(
                f"{where}.max_length={self.max_length}: exceeds the preset's "
                f"max_position_embeddings {arch['max_position_embeddings']}"
            )


def build_tokenizer(cfg: TextEncoderConfig) -> BertTokenizerFast:
    """Lower-casing WordPiece tokenizer, built offline.

    Args:
        cfg: ``pretrained_dir`` if set, else ``vocab_file`` (default: the bundled demo vocab).

    Returns:
        A ``BertTokenizerFast`` (``BertTokenizer`` in transformers 5).
    """
    if cfg.pretrained_dir is not None:
        if cfg.vocab_file is not None:
            raise ValueError("set either text pretrained_dir or vocab_file, not both")
        return BertTokenizerFast.from_pretrained(cfg.pretrained_dir, local_files_only=True)
    vocab_path = Path(cfg.vocab_file) if cfg.vocab_file is not None else DEMO_VOCAB
    return BertTokenizerFast(vocab=load_vocab(str(vocab_path)), do_lower_case=True)


def tokenize_texts(tokenizer: BertTokenizerFast, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Tokenise a batch of texts, padded to the longest and truncated to ``max_length``.

    Shapes:
        -> input_ids (B, Lmax) long, attention_mask (B, Lmax) long (1 = real token)
    """
    if not texts:
        empty = torch.zeros(0, 0, dtype=torch.long)
        return empty, empty.clone()
    enc = tokenizer(
        list(texts),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return enc["input_ids"], enc["attention_mask"]


def _fresh_config(cfg: TextEncoderConfig, vocab_size: int | None = None) -> BertConfig:
    """BertConfig for a randomly initialised model: preset, overrides, tokenizer vocabulary."""
    if cfg.preset not in TEXT_PRESETS:
        raise ValueError(f"unknown text preset {cfg.preset!r}; known: {sorted(TEXT_PRESETS)}")
    arch = dict(TEXT_PRESETS[cfg.preset])
    for field, key in _OVERRIDES.items():
        if getattr(cfg, field) is not None:
            arch[key] = getattr(cfg, field)
    tokenizer_size = len(build_tokenizer(cfg))
    if vocab_size is not None and vocab_size < tokenizer_size:
        raise ValueError(f"text vocab_size {vocab_size} is smaller than the tokenizer ({tokenizer_size})")
    arch["vocab_size"] = tokenizer_size if vocab_size is None else vocab_size
    return BertConfig(
        **arch,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        attn_implementation=_ATTENTION,
    )


def _check_overrides(cfg: TextEncoderConfig, config: BertConfig) -> None:
    """Overrides given together with a pretrained directory must agree with its config.json."""
    clashes = [
        f"{field}={getattr(cfg, field)} vs {getattr(config, key)}"
        for field, key in _OVERRIDES.items()
        if getattr(cfg, field) is not None and getattr(cfg, field) != getattr(config, key)
    ]
    if clashes:
        raise ValueError(f"text overrides disagree with {cfg.pretrained_dir}/config.json: {', '.join(clashes)}")


class TextEncoder(nn.Module):
    """BERT encoder pooled to one vector per text.

    Args:
        cfg: preset / overrides for a fresh model, or ``pretrained_dir``.
        vocab_size: embedding rows of a fresh model (default: the tokenizer's size; must not be
            smaller); with ``pretrained_dir`` it must equal the checkpoint's, if given.
        load_weights: with ``pretrained_dir``, read its weights; False builds the architecture
            from its ``config.json`` alone (an export's weights are loaded afterwards).

    Shapes:
        input_ids, attention_mask (B, L) -> (B, H)
    """

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int | None = None, load_weights: bool = True):
        super().__init__()
        # Imported here, not at module level: the model code loads torch._dynamo and DTensor (~4 s
        # of CPU), which processes that only tokenise or read the config (Ray reader actors,
        # configuration errors, finished runs) should not pay.
        from transformers import BertModel

        if cfg.pooling not in ("cls", "mean"):
            raise ValueError(f"text pooling must be 'cls' or 'mean', got {cfg.pooling!r}")
        self.cfg = cfg
        if cfg.pretrained_dir is not None:
            overrides = {
                "hidden_dropout_prob": cfg.dropout,
                "attention_probs_dropout_prob": cfg.dropout,
                "attn_implementation": _ATTENTION,
            }
            if load_weights:
                # No pooler: it is trained for next-sentence prediction and would sit unused.
                # dtype: transformers 5 keeps the checkpoint's dtype by default ("auto"); every other
                # module is fp32 (DeepSpeed casts to bf16 itself), so a half-precision directory must
                # not leave bf16 / fp16 parameters in front of the fp32 projection head.
                self.bert = BertModel.from_pretrained(
                    cfg.pretrained_dir,
                    local_files_only=True,
                    weights_only=True,
                    dtype=torch.float32,
                    add_pooling_layer=False,
                    **overrides,
                )
            else:  # the architecture only (config.json): the caller loads every weight itself
                config = BertConfig.from_pretrained(cfg.pretrained_dir, local_files_only=True, **overrides)
                self.bert = BertModel(config, add_pooling_layer=False)
            _check_overrides(cfg, self.bert.config)
            if vocab_size is not None and vocab_size != self.bert.config.vocab_size:
                raise ValueError(
                    f"text vocab_size {vocab_size} differs from {cfg.pretrained_dir}'s {self.bert.config.vocab_size}"
                )
        else:
            self.bert = BertModel(_fresh_config(cfg, vocab_size), add_pooling_layer=False)
        if cfg.max_length > self.bert.config.max_position_embeddings:
            raise ValueError(
                f"text max_length {cfg.max_length} exceeds max_position_embeddings "
                f"{self.bert.config.max_position_embeddings}"
            )
        self.output_dim = self.bert.config.hidden_size

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each BERT layer's activations in backward (transformers' own mechanism, which
        checkpoints in training mode only), non-reentrant like the other encoders."""
        bert = self.bert
        if hasattr(bert, "activation_checkpointing_enable"):  # transformers >= 5.2x names
            if enabled:
                bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                bert.activation_checkpointing_disable()
        elif enabled:  # older transformers: the same mechanism under its previous name
            bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            bert.gradient_checkpointing_disable()

    @property
    def activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.bert.modules())

    def token_representations(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Last-layer hidden states of every token.

        Shapes:
            input_ids, attention_mask (B, L) -> (B, L, H)
        """
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Pooled text embedding ([CLS] state or masked mean, per ``cfg.pooling``).

        Shapes:
            input_ids, attention_mask (B, L) -> (B, H)
        """
        hidden = self.token_representations(input_ids, attention_mask)  # (B, L, H)
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
