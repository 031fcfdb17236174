import pickle
import string

import pytest
import torch
from transformers import BertConfig, BertModel

from pretrain.models.text_encoder import (
    DEMO_VOCAB,
    TEXT_PRESETS,
    TextEncoder,
    TextEncoderConfig,
    _fresh_config,
    build_tokenizer,
    tokenize_texts,
)

TINY = dict(preset="bert-tiny", hidden_size=32, num_layers=2, attention_heads=4, intermediate_size=64)
TEXTS = [
    "Catalyzes the ATP-dependent phosphorylation of serine residues; located in the mitochondrial "
    "inner membrane (GO:0005743). EC 2.7.11.1",
    "DNA binding.",
    "Zn(2+)-dependent hydrolase, xyzzy Qwerty42 UNSEEN_word",
]


def _tiny(**kwargs) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(**{**TINY, **kwargs})).eval()


def test_demo_vocab_format():
    tokens = DEMO_VOCAB.read_text(encoding="utf-8").splitlines()
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokens[5:] == sorted(set(tokens[5:])) and len(tokens) == len(set(tokens))
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        assert ch in tokens and "##" + ch in tokens
    for word in ("binding", "kinase", "activity", "membrane", "mitochondrial", "oxidoreductase", "atp"):
        assert word in tokens
    assert 600 <= len(tokens) <= 1600


def test_no_unknown_tokens_for_ascii_text():
    tok = build_tokenizer(TextEncoderConfig())
    for text in TEXTS + [string.printable.strip()]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(tok("Kinase activity")["input_ids"]) == [
        "[CLS]",
        "kinase",
        "activity",
        "[SEP]",
    ]


def test_tokenize_texts_pads_and_truncates():
    tok = build_tokenizer(TextEncoderConfig())
    ids, mask = tokenize_texts(tok, TEXTS, max_length=12)
    assert ids.shape == mask.shape == (3, 12)
    assert ids[:, 0].eq(tok.cls_token_id).all() and ids[0, -1] == tok.sep_token_id
    short = tokenize_texts(tok, ["dna binding"], max_length=12)
    assert short[0].tolist() == [[tok.cls_token_id, *tok.convert_tokens_to_ids(["dna", "binding"]), tok.sep_token_id]]
    assert ids[1].tolist()[mask[1].sum() :] == [tok.pad_token_id] * (12 - int(mask[1].sum()))
    empty_ids, empty_mask = tokenize_texts(tok, [], 12)
    assert empty_ids.shape == (0, 0) and empty_mask.shape == (0, 0)


def test_pubmedbert_preset_resolves_to_base():
    assert TEXT_PRESETS["pubmedbert-base"] == dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        vocab_size=30522,
        max_position_embeddings=512,
    )
    config = _fresh_config(TextEncoderConfig())
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.intermediate_size == 3072 and config.max_position_embeddings == 512
    assert config.vocab_size == len(build_tokenizer(TextEncoderConfig()))  # fresh model: from tokenizer


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_forward_shapes_and_padding_invariance(pooling):
    enc = _tiny(pooling=pooling)
    tok = build_tokenizer(enc.cfg)
    with torch.no_grad():
        batched = enc(*tokenize_texts(tok, TEXTS, 64))
        alone = torch.cat([enc(*tokenize_texts(tok, [t], 64)) for t in TEXTS])
        tokens = enc.token_representations(*tokenize_texts(tok, TEXTS, 64))
    assert batched.shape == (3, 32) and enc.output_dim == 32
    assert tokens.shape[0] == 3 and tokens.shape[2] == 32
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_explicit_vocab_size():
    tokenizer_size = len(build_tokenizer(TextEncoderConfig()))
    assert _tiny().bert.config.vocab_size == tokenizer_size
    enc = TextEncoder(TextEncoderConfig(**TINY), vocab_size=tokenizer_size + 6)
    assert enc.bert.embeddings.word_embeddings.num_embeddings == tokenizer_size + 6
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        TextEncoder(TextEncoderConfig(**TINY), vocab_size=10)


def test_gradient_flows():
    enc = _tiny(pooling="mean").train()
    enc(*tokenize_texts(build_tokenizer(enc.cfg), TEXTS, 32)).sum().backward()
    assert enc.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def _save_tiny_hf(directory, safetensors: bool = True) -> BertModel:
    torch.manual_seed(3)
    tok = build_tokenizer(TextEncoderConfig())
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = BertModel(config).eval()
    tok.save_pretrained(directory)
    if safetensors:
        model.save_pretrained(directory)
    else:
        config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return model


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_pretrained_dir_round_trip(tmp_path, safetensors):
    reference = _save_tiny_hf(tmp_path, safetensors)
    cfg = TextEncoderConfig(pretrained_dir=str(tmp_path), pooling="mean", max_length=64)
    enc = TextEncoder(cfg).eval()
    ids, mask = tokenize_texts(build_tokenizer(cfg), TEXTS, cfg.max_length)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(enc.token_representations(ids, mask), expected)
    assert enc.output_dim == 32 and enc.bert.config.hidden_dropout_prob == cfg.dropout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_directory_loads_as_fp32(tmp_path, dtype):
    """A re-saved bf16 / fp16 checkpoint must not leave half-precision parameters in the model
    (its fp32 projection head would then fail on the encoder's output)."""
    reference = _save_tiny_hf(tmp_path).to(dtype)
    reference.save_pretrained(tmp_path)
    cfg = TextEncoderConfig(pretrained_dir=str(tmp_path), max_length=64)
    enc = TextEncoder(cfg).eval()
    assert {p.dtype for p in enc.parameters()} == {torch.float32}
    ids, mask = tokenize_texts(build_tokenizer(cfg), TEXTS, cfg.max_length)
    head = torch.nn.Linear(enc.output_dim, 8)
    assert head(enc(ids, mask)).dtype == torch.float32
    state = reference.state_dict()
    for name, p in enc.bert.state_dict().items():
        torch.testing.assert_close(p, state[name].float())  # the stored values, widened exactly


def test_pretrained_dir_checks(tmp_path):
    _save_tiny_hf(tmp_path)
    with pytest.raises(ValueError, match="hidden_size=64 vs 32"):
        TextEncoder(TextEncoderConfig(pretrained_dir=str(tmp_path), hidden_size=64, max_length=64))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TextEncoder(TextEncoderConfig(pretrained_dir=str(tmp_path), max_length=256))
    with pytest.raises(ValueError, match="vocab_size 7 differs"):
        TextEncoder(TextEncoderConfig(pretrained_dir=str(tmp_path), max_length=64), vocab_size=7)
    with pytest.raises(ValueError, match="not both"):
        build_tokenizer(TextEncoderConfig(pretrained_dir=str(tmp_path), vocab_file=str(DEMO_VOCAB)))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_pickled_bin_payload_is_refused(tmp_path):
    _save_tiny_hf(tmp_path, safetensors=False)
    marker = tmp_path / "pwned"
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["evil"] = _Payload(str(marker))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        TextEncoder(TextEncoderConfig(pretrained_dir=str(tmp_path), max_length=64))
    assert not marker.exists()


def _eager_twin(enc: TextEncoder) -> BertModel:
    """The same BERT weights on transformers' eager attention (explicit softmax over L x L scores)."""
    config = BertConfig.from_dict(enc.bert.config.to_dict())
    config._attn_implementation = "eager"
    twin = BertModel(config, add_pooling_layer=False)
    twin.load_state_dict(enc.bert.state_dict())
    assert twin.config._attn_implementation == "eager"
    return twin.train(enc.training)


@pytest.mark.parametrize("source", ["preset", "pretrained_dir", "architecture_only"])
def test_attention_is_sdpa_and_equals_eager_with_padding(tmp_path, source):
    if source == "preset":
        enc = _tiny(dropout=0.0)
    else:
        _save_tiny_hf(tmp_path)
        cfg = TextEncoderConfig(pretrained_dir=str(tmp_path), max_length=64, dropout=0.0)
        enc = TextEncoder(cfg, load_weights=source == "pretrained_dir")
    assert enc.bert.config._attn_implementation == "sdpa"
    enc.train()  # dropout 0: training mode so gradients are compared on the training path
    eager = _eager_twin(enc)
    ids, mask = tokenize_texts(build_tokenizer(enc.cfg), TEXTS, 48)
    assert (mask == 0).any() and (mask == 1).all(dim=0).any()  # mixed lengths: padding is masked
    got = enc.token_representations(ids, mask)
    want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(0)) * mask.unsqueeze(-1)
    (got * g).sum().backward()
    (want * g).sum().backward()
    own = dict(eager.named_parameters())
    for name, p in enc.bert.named_parameters():
        if p.grad is None:
            assert own[name].grad is None, name
            continue
        scale = float(own[name].grad.abs().max()) + 1.0  # + 1: key biases' gradients are 0 analytically
        torch.testing.assert_close(p.grad, own[name].grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
