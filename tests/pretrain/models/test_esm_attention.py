"""Fused (SDPA) ESM-2 attention equals fair-esm's own attention: outputs, logits and gradients.

The oracle is an untouched fair-esm ``ESM2`` holding the same state dict. Shapes are odd on purpose
(token widths 1, 7, 41, 130; 1 and 4 heads; batches of 1 and 3 with mixed lengths, so padding is
masked), gradients are taken of a random linear functional (grad_output != 1), and ``<mask>`` tokens
are present so ESM-2's token-dropout rescaling is on the path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from esm.model.esm2 import ESM2

from pretrain.config import load_config
from pretrain.engine.builder import build_model
from pretrain.engine.two_pass import two_pass_step
from pretrain.errors import ConfigError
from pretrain.losses.align_pro import AlignProLoss
from pretrain.models.esm_attention import esm_attention_mode, set_esm_attention
from pretrain.models.sequence_encoder import SequenceEncoder, SequenceEncoderConfig
from tests.pretrain.engine.two_pass_helpers import demo_batch, grads_of

DIM = 32
LAYERS = 2


def _pair(heads: int, **kwargs) -> tuple[SequenceEncoder, ESM2]:
    """A fused SequenceEncoder and a pristine fair-esm ESM2 with the same weights."""
    torch.manual_seed(0)
    cfg = SequenceEncoderConfig(num_layers=LAYERS, embed_dim=DIM, attention_heads=heads, **kwargs)
    enc = SequenceEncoder(cfg).train()  # training mode: the dropout paths are the ones taken
    ref = ESM2(num_layers=LAYERS, embed_dim=DIM, attention_heads=heads, alphabet=enc.alphabet).train()
    ref.load_state_dict(enc.esm.state_dict())
    return enc, ref


def _tokens(alphabet, batch: int, width: int, seed: int = 0) -> torch.Tensor:
    """(batch, width) ESM-2 tokens: row 0 uses the full width, later rows are shorter (padded)."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.full((batch, width), alphabet.padding_idx, dtype=torch.long)
    for row in range(batch):
        length = max(1, width - 5 * row) if row else width
        toks[row, :length] = torch.randint(4, 24, (length,), generator=g)  # amino acids
        toks[row, 0] = alphabet.cls_idx
        if length > 1:
            toks[row, length - 1] = alphabet.eos_idx
        if length > 3:
            toks[row, 1 + int(torch.randint(0, length - 2, (1,), generator=g))] = alphabet.mask_idx
    return toks


def _run(esm: ESM2, tokens: torch.Tensor, seed: int = 1) -> tuple[dict, dict]:
    """Every layer's representations, the logits, and the gradients of a random functional of them
    w.r.t. every parameter and the token embeddings."""
    esm.zero_grad(set_to_none=True)
    embedded = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        embedded["x"] = output

    handle = esm.embed_tokens.register_forward_hook(keep)
    try:
        out = esm(tokens, repr_layers=list(range(esm.num_layers + 1)))
    finally:
        handle.remove()
    values = {f"repr{k}": v for k, v in out["representations"].items()} | {"logits": out["logits"]}
    g = torch.Generator().manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in values.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in esm.named_parameters() if p.grad is not None}
    grads["token_embeddings"] = embedded["x"].grad.clone()
    return {k: v.detach() for k, v in values.items()}, grads


def _assert_close(got: dict, want: dict, rel: float) -> None:
    """Per tensor: within ``rel`` of that tensor's largest magnitude (summation order differs). The
    floor of ``rel`` covers gradients that are 0 analytically (q / k projections when one token attends
    to itself alone): fair-esm's softmax backward gives exact zeros there, SDPA round-off (~1e-6)."""
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max()) + 1.0
        torch.testing.assert_close(got[name], want[name], rtol=rel, atol=rel * scale, msg=name)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("width", [1, 7, 41, 130])
def test_fused_equals_fair_esm(width, heads, batch):
    enc, ref = _pair(heads)
    assert enc.attention == "fused" and all(layer.self_attn.dropout == 0.0 for layer in enc.esm.layers)
    tokens = _tokens(enc.alphabet, batch, width)
    got_out, got_grads = _run(enc.esm, tokens)
    want_out, want_grads = _run(ref, tokens)
    _assert_close(got_out, want_out, rel=1e-5)
    _assert_close(got_grads, want_grads, rel=1e-5)
    # The public entry points agree too.
    with torch.no_grad():
        reps, logits = enc.mlm_forward(tokens)
        out = ref(tokens, repr_layers=[LAYERS])
    torch.testing.assert_close(logits, out["logits"], rtol=1e-5, atol=1e-5 * float(out["logits"].abs().max()))
    torch.testing.assert_close(reps, out["representations"][LAYERS], rtol=1e-5, atol=1e-5)


def test_padding_invariance_and_fused_saves_no_square_matrices():
    enc, _ = _pair(4)
    tokens = _tokens(enc.alphabet, 3, 130)
    width = tokens.shape[1]
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batched = enc(tokens)
    assert not any(len(s) >= 2 and s[-1] == s[-2] == width for s in shapes), "an L x L tensor was saved"
    enc.set_attention("reference")
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc(tokens)
    assert any(len(s) >= 2 and s[-1] == s[-2] == width for s in shapes)  # the probe does see them
    enc.set_attention("fused")
    enc.eval()
    with torch.no_grad():
        for row in range(3):
            length = int(tokens[row].ne(enc.alphabet.padding_idx).sum())
            alone = enc(tokens[row : row + 1, :length])
            torch.testing.assert_close(alone[0], enc(tokens)[row], rtol=1e-5, atol=1e-5)
    assert batched.shape == (3, DIM)


def test_with_activation_checkpointing():
    enc, ref = _pair(4)
    enc.set_activation_checkpointing(True)
    tokens = _tokens(enc.alphabet, 3, 41)
    got_out, got_grads = _run(enc.esm, tokens)
    want_out, want_grads = _run(ref, tokens)
    _assert_close(got_out, want_out, rel=1e-5)
    _assert_close(got_grads, want_grads, rel=1e-5)


def test_without_token_dropout():
    enc, _ = _pair(4, token_dropout=False)
    ref = copy.deepcopy(enc)
    ref.set_attention("reference")
    tokens = _tokens(enc.alphabet, 3, 41)
    _assert_close(_run(enc.esm, tokens)[0], _run(ref.esm, tokens)[0], rel=1e-5)


def test_bf16_autocast_within_bf16_tolerance():
    enc, ref = _pair(4)
    tokens = _tokens(enc.alphabet, 3, 41)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_out, got_grads = _run(enc.esm, tokens)
        want_out, want_grads = _run(ref, tokens)
    # Both sides round q, k, v and the products to bf16 (8 bits of mantissa), in different places:
    # measured 0.7% (outputs) and 1.9% (gradients) of each tensor's scale, as far as bf16 is from fp32.
    _assert_close(got_out, want_out, rel=2e-2)
    _assert_close(got_grads, want_grads, rel=5e-2)
    # The comparison ran in bf16 at all: fair-esm's own bf16 logits are that far from its fp32 ones.
    fp32_logits = _run(ref, tokens)[0]["logits"]
    assert (want_out["logits"] - fp32_logits).abs().max() > 1e-3 * fp32_logits.abs().max()


def test_contacts_fall_back_to_reference_attention():
    enc, ref = _pair(4)
    tokens = _tokens(enc.alphabet, 3, 41)
    with torch.no_grad():
        got = enc.esm(tokens, return_contacts=True)
        want = ref(tokens, return_contacts=True)
    assert enc.attention == "fused"  # the per-call fallback leaves the mode alone
    torch.testing.assert_close(got["attentions"], want["attentions"], rtol=0, atol=0)
    torch.testing.assert_close(got["contacts"], want["contacts"], rtol=0, atol=0)


def test_state_dict_and_mode_switch():
    enc, ref = _pair(4)
    assert list(enc.esm.state_dict()) == list(ref.state_dict())
    assert esm_attention_mode(ref) == "reference"
    set_esm_attention(ref, "fused")
    set_esm_attention(ref, "fused")  # idempotent
    assert esm_attention_mode(ref) == "fused"
    copied = copy.deepcopy(ref)  # the installed forward follows the copy, not the original
    assert copied.layers[0].self_attn.forward.module is copied.layers[0].self_attn
    set_esm_attention(ref, "reference")
    assert esm_attention_mode(ref) == "reference" and "forward" not in ref.layers[0].self_attn.__dict__
    plain = SequenceEncoderConfig(num_layers=1, embed_dim=DIM, attention_heads=4, attention="reference")
    assert SequenceEncoder(plain).attention == "reference"
    with pytest.raises(ValueError, match="attention mode"):
        set_esm_attention(ref, "flash")


def test_config_validation_names_the_field():
    SequenceEncoderConfig(attention="reference").validate()
    assert load_config(overrides=["model.sequence.attention=reference"]).model.sequence.attention == "reference"
    with pytest.raises(ConfigError, match=r"model\.sequence\.attention='flash'"):
        SequenceEncoderConfig(attention="flash").validate()
    with pytest.raises(ConfigError, match=r"model\.sequence\.attention='flash'"):
        load_config(overrides=["model.sequence.attention=flash"])


def test_two_pass_step_with_fused_attention_equals_reference_one_pass(tmp_path):
    """Two-pass step (fused, default) vs a plain step of the same model on fair-esm's attention."""
    cfg = load_config(overrides=["model.head_dropout=0.1"])
    assert cfg.model.sequence.attention == "fused"
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert model.sequence_encoder.attention == "fused"
    batch = demo_batch(cfg, tmp_path, rows=6)
    loss_fn = AlignProLoss(cfg.loss)
    ref = copy.deepcopy(model)
    ref.sequence_encoder.set_attention("reference")
    torch.manual_seed(7)
    emb = ref(batch)
    ref_terms = loss_fn.compute(emb, batch["present"], emb["logit_scale"])
    ref_terms["loss"].backward()
    torch.manual_seed(7)
    terms, _ = two_pass_step(model, batch, loss_fn, chunk_size=6)
    assert float(terms["loss"]) == pytest.approx(float(ref_terms["loss"].detach()), rel=1e-6)
    got, want = grads_of(model), grads_of(ref)
    assert any(n.startswith("sequence_encoder.esm.layers.0.self_attn.q_proj") for n in want)
    _assert_close(got, want, rel=1e-5)
