"""A randomly initialised GPT-2-style causal LM and word-level tokenizer, saved to a folder for tests."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a an protein kinase enzyme activity involved in located membrane nucleus cytoplasm binds "
    "binding of and is this that it ATP DNA transport receptor signaling catalyzes reaction phosphorylation "
    "cell process function plays role . , : ;"
).split()


def make_tiny_causal_lm(directory: Path, seed: int = 0, chat_template: str | None = None) -> Path:
    """Write config, safetensors weights and a tokenizer (no download) into ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=512,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    # outputs long enough to be checked: no <pad>/<unk>, no <eos> before 8 new tokens
    model.generation_config.suppress_tokens = [0, 2]
    model.generation_config.min_new_tokens = 8
    model.save_pretrained(directory)
    return Path(directory)
