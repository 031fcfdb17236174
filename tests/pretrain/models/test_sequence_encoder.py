import argparse
import pickle

import pytest
import torch
from esm.model.esm2 import ESM2

from pretrain.models.sequence_encoder import (
    ESM2_PRESETS,
    SequenceEncoder,
    SequenceEncoderConfig,
    load_esm2_weights,
    resolve_preset,
    tokenize_sequences,
)

TINY = dict(num_layers=2, embed_dim=64, attention_heads=4)
PUBLISHED = {
    "esm2_t6_8M": (6, 320, 20),
    "esm2_t12_35M": (12, 480, 20),
    "esm2_t30_150M": (30, 640, 20),
    "esm2_t33_650M": (33, 1280, 20),
    "esm2_t36_3B": (36, 2560, 40),
    "esm2_t48_15B": (48, 5120, 40),
}


def _tiny(**kwargs) -> SequenceEncoder:
    torch.manual_seed(0)
    return SequenceEncoder(SequenceEncoderConfig(**{**TINY, **kwargs})).eval()


def _published_layout(model: ESM2, arch: tuple[int, int, int]) -> dict:
    """A checkpoint laid out like fair-esm's published ESM-2 files (fairseq prefixes, Namespace)."""
    state = {
        ("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
        for k, v in model.state_dict().items()
        if not k.startswith("contact_head.regression")
    }
    layers, dim, heads = arch
    cfg = argparse.Namespace(
        encoder_layers=layers, encoder_embed_dim=dim, encoder_attention_heads=heads, token_dropout=True
    )
    return {"model": state, "cfg": {"model": cfg}}


def test_presets_resolve():
    assert ESM2_PRESETS == PUBLISHED
    for name, arch in PUBLISHED.items():
        assert resolve_preset(name) == arch
        assert resolve_preset(name + "_UR50D") == arch
    with pytest.raises(ValueError, match="unknown ESM-2 preset"):
        resolve_preset("esm2_t99_1T")


def test_t6_8m_instantiates_with_published_size():
    enc = SequenceEncoder(SequenceEncoderConfig(preset="esm2_t6_8M_UR50D"))
    assert enc.output_dim == 320 and len(enc.esm.layers) == 6
    assert enc.esm.layers[0].self_attn.num_heads == 20
    assert 7.5e6 < sum(p.numel() for p in enc.parameters()) < 8.5e6


def test_tokenize_sequences():
    enc = _tiny()
    a = enc.alphabet
    tokens = tokenize_sequences(a, ["mkv", "MKTAYJ", ""], max_length=4)
    assert tokens.shape == (3, 6)
    assert tokens[0].tolist() == [
        a.cls_idx,
        a.get_idx("M"),
        a.get_idx("K"),
        a.get_idx("V"),
        a.eos_idx,
        a.padding_idx,
    ]
    assert tokens[1].tolist() == [a.cls_idx] + [a.get_idx(c) for c in "MKTA"] + [a.eos_idx]
    assert tokens[2].tolist()[:2] == [a.cls_idx, a.eos_idx]
    assert tokenize_sequences(a, ["MJ"], 10)[0, 2] == a.unk_idx
    assert enc.tokenize(["A" * 2000]).shape == (1, 1024)


def test_forward_shapes():
    enc = _tiny()
    tokens = enc.tokenize(["MKTAYIAKQRQISFVKSHFSRQ", "GSHM"])
    with torch.no_grad():
        assert enc(tokens).shape == (2, 64)
        assert enc.residue_representations(tokens).shape == (2, tokens.shape[1], 64)
        reps, logits = enc.mlm_forward(tokens)
    assert logits.shape == (2, tokens.shape[1], len(enc.alphabet))


def test_padding_invariance():
    enc = _tiny()
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLE", ""]
    with torch.no_grad():
        batched = enc(enc.tokenize(seqs))
        alone = torch.cat([enc(enc.tokenize([s])) for s in seqs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert batched[2].abs().sum() == 0  # no residues -> zeros


def test_gradient_flows():
    enc = _tiny().train()
    enc(enc.tokenize(["MKTAYIAKQR", "GSH"])).sum().backward()
    assert enc.esm.embed_tokens.weight.grad.abs().sum() > 0
    assert enc.esm.layers[0].fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["published", "plain"])
def test_weight_round_trip(tmp_path, layout):
    source = _tiny()
    target = _tiny()
    torch.manual_seed(1)
    for p in source.parameters():  # make sure target's own init differs from the source
        p.data.normal_()
    ckpt = _published_layout(source.esm, (2, 64, 4)) if layout == "published" else source.esm.state_dict()
    path = tmp_path / "esm2_tiny.pt"
    torch.save(ckpt, path)
    tokens = source.tokenize(["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLE"])
    with torch.no_grad():
        assert not torch.allclose(source(tokens), target(tokens))
        load_esm2_weights(target, path)
        torch.testing.assert_close(target(tokens), source(tokens))
        via_config = SequenceEncoder(SequenceEncoderConfig(**TINY, weights=str(path))).eval()
        torch.testing.assert_close(via_config(tokens), source(tokens))


def test_architecture_mismatch_is_named(tmp_path):
    path = tmp_path / "esm2.pt"
    torch.save(_published_layout(_tiny().esm, (3, 64, 4)), path)
    with pytest.raises(ValueError, match=r"num_layers: checkpoint 3 vs config 2"):
        load_esm2_weights(_tiny(), path)


def test_shape_and_key_mismatch_are_named(tmp_path):
    path = tmp_path / "wide.pt"
    wide = SequenceEncoder(SequenceEncoderConfig(num_layers=2, embed_dim=32, attention_heads=4))
    torch.save(wide.esm.state_dict(), path)
    with pytest.raises(ValueError, match=r"wide\.pt.*shape mismatch.*embed_tokens\.weight"):
        load_esm2_weights(_tiny(), path)
    state = _tiny().esm.state_dict()
    del state["layers.1.fc2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \(1\).*layers\.1\.fc2\.weight.*unexpected \(1\).*extra"):
        load_esm2_weights(_tiny(), path)


class _Payload:
    """Pickles to a call that writes a marker file when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_pickle_payload_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = {"model": _tiny().esm.state_dict(), "args": _Payload(str(marker))}
    # The payload is live: a plain unpickle runs it.
    pickle.loads(pickle.dumps(ckpt))
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_esm2_weights(_tiny(), path)
    assert not marker.exists()
