"""ProtCLIP modules and loss: BSR gradients, PDA padding invariance, segment InfoNCE by hand, and the
full loss on a tiny collated batch of the demo corpus."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.losses.protclip import (
    ProtCLIPLoss,
    ProtCLIPLossConfig,
    masked_cross_entropy,
    segment_infonce,
    validate_protclip_config,
)
from pretrain.models.protclip_modules import BSRDecoder, PDAHead, ProtCLIPHeads, protclip_forward
from tests.conftest import TINY_OVERRIDES

TINY_LOSS = ProtCLIPLossConfig(
    bsr_hidden=32, bsr_heads=4, bsr_dropout=0.0, pda_proj_dim=16, pda_prototypes=8, false_negatives="text"
)


# ----------------------------------------------------------------------------- BSR


def test_bsr_gradients_reach_protein_and_text_and_ignore_text_padding():
    torch.manual_seed(0)
    dec = BSRDecoder(protein_dim=12, text_dim=10, hidden=16, layers=2, heads=4, vocab_size=33)
    prot = torch.randn(3, 7, 12, requires_grad=True)
    text = torch.randn(3, 5, 10, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])  # row 2: no text
    labels = torch.full((3, 7), -100)
    labels[:, 2:5] = torch.randint(4, 24, (3, 3))
    logits = dec(prot, text, mask)
    assert logits.shape == (3, 7, 33) and torch.isfinite(logits).all()
    masked_cross_entropy(logits, labels).backward()
    assert prot.grad.abs().sum() > 0 and text.grad[:2].abs().sum() > 0  # both encoders get a gradient
    assert torch.all(text.grad[0, 3:] == 0)  # padding tokens get none
    moved = text.detach().clone()
    moved[0, 3:] += 100.0  # padding content is never attended to
    torch.testing.assert_close(dec(prot, moved, mask)[:2], logits[:2], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- PDA


def _pda_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    residues = torch.randn(3, 9, 12, generator=g)
    residue_mask = torch.zeros(3, 9, dtype=torch.bool)
    residue_mask[0, 1:8] = True
    residue_mask[1, 1:5] = True  # row 1: 4 residues, then padding
    residue_mask[2, 1:3] = True
    text = torch.randn(3, 10, 10, generator=g)
    seg = torch.tensor(
        [
            [-1, 0, 0, 1, 1, 1, 3, 3, -1, -1],
            [-1, 0, 2, 2, 4, 4, 4, -1, -1, -1],
            [-1, 5, 5, 5, 5, -1, -1, -1, -1, -1],  # a single segment: no negatives
        ]
    )
    return residues, residue_mask, text, seg


def _pda_loss(head, residues, residue_mask, text, seg):
    out = head(residues, residue_mask, text, seg)
    return segment_infonce(out["text"], out["protein"], out["present"], out["logit_scale"]) + out["vq_loss"], out


@pytest.mark.parametrize("quantize", ["soft", "ste"])
def test_vq_codebook_term_moves_the_prototypes_only(quantize):
    """|sg(z) - q|^2 trains the bank; only the commitment term may pull the segment vectors (with a
    soft assignment, q depends on z, so the codebook term must use an assignment of sg(z))."""
    torch.manual_seed(0)
    head = PDAHead(12, 10, proj_dim=8, num_prototypes=6, num_segments=4, quantize=quantize, commitment=0.0)
    z = F.normalize(torch.randn(3, 4, 8), dim=-1).requires_grad_(True)
    _, vq_loss, _ = head.quantise(z, torch.ones(3, 4, dtype=torch.bool))
    dz, dbank = torch.autograd.grad(vq_loss, [z, head.prototypes])
    assert dz.abs().max() == 0 and dbank.abs().max() > 0
    head.commitment = 0.25
    _, with_commitment, _ = head.quantise(z, torch.ones(3, 4, dtype=torch.bool))
    assert torch.autograd.grad(with_commitment, z)[0].abs().max() > 0


@pytest.mark.parametrize("quantize", ["soft", "ste"])
def test_pda_pooling_ignores_padding(quantize):
    torch.manual_seed(0)
    head = PDAHead(12, 10, proj_dim=8, num_prototypes=6, num_segments=8, quantize=quantize)
    residues, residue_mask, text, seg = _pda_inputs()
    residues.requires_grad_()
    text.requires_grad_()
    loss, out = _pda_loss(head, residues, residue_mask, text, seg)
    assert torch.isfinite(loss) and loss > 0
    assert torch.equal(out["present"][1], torch.tensor([1, 0, 1, 0, 1, 0, 0, 0], dtype=torch.bool))
    loss.backward()
    assert torch.all(residues.grad[~residue_mask] == 0) and torch.all(text.grad[seg < 0] == 0)
    assert residues.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    moved_res, moved_text = residues.detach().clone(), text.detach().clone()
    moved_res[~residue_mask] = 50.0  # padding, BOS and EOS residues
    moved_text[seg < 0] = -50.0  # [CLS], [SEP], padding tokens: no segment
    again, _ = _pda_loss(head, moved_res, residue_mask, moved_text, seg)
    torch.testing.assert_close(again, loss.detach(), rtol=0, atol=1e-6)


def test_pda_ste_outputs_are_prototypes_and_rows_without_residues_stay_finite():
    torch.manual_seed(1)
    head = PDAHead(12, 10, proj_dim=8, num_prototypes=6, num_segments=8, quantize="ste")
    residues, residue_mask, text, seg = _pda_inputs(1)
    residue_mask[2] = False  # a protein without residues
    out = head(residues, residue_mask, text, seg)
    bank = F.normalize(head.prototypes, dim=-1)
    torch.testing.assert_close(out["text"], bank[out["codes"]])  # value of the nearest prototype
    assert not out["present"][2].any() and torch.isfinite(out["protein"]).all()


# ----------------------------------------------------------------------------- segment InfoNCE


def test_segment_infonce_against_a_hand_computed_case():
    s = 2.0
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    p = torch.tensor([[[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    present = torch.tensor([[True, True, True], [True, False, False]])  # protein 1: one segment only

    def row(i):  # protein 0, text segment i against protein segments 0..2
        dots = [sum(a * b for a, b in zip(t[0, i].tolist(), p[0, j].tolist())) for j in range(3)]
        return math.log(sum(math.exp(s * d) for d in dots)) - s * dots[i]

    expected = (row(0) + row(1) + row(2)) / 3
    got = segment_infonce(t, p, present, torch.tensor([s]))
    assert got.item() == pytest.approx(expected, rel=1e-6)

    # protein -> text direction: columns of the same logits
    def col(j):
        dots = [sum(a * b for a, b in zip(t[0, i].tolist(), p[0, j].tolist())) for i in range(3)]
        return math.log(sum(math.exp(s * d) for d in dots)) - s * dots[j]

    sym = segment_infonce(t, p, present, torch.tensor([s]), symmetric=True)
    assert sym.item() == pytest.approx(0.5 * (expected + (col(0) + col(1) + col(2)) / 3), rel=1e-6)
    # segment 2 masked out: rows and columns shrink to segments 0 and 1
    present2 = torch.tensor([[True, True, False], [False, False, False]])
    d = [[sum(a * b for a, b in zip(t[0, i].tolist(), p[0, j].tolist())) for j in range(2)] for i in range(2)]
    want = sum(math.log(math.exp(s * d[i][0]) + math.exp(s * d[i][1])) - s * d[i][i] for i in range(2)) / 2
    assert segment_infonce(t, p, present2, torch.tensor([s])).item() == pytest.approx(want, rel=1e-6)
    assert segment_infonce(t, p, torch.zeros_like(present), torch.tensor([s])).item() == 0.0


# ----------------------------------------------------------------------------- the whole objective


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from data_shards.demo_corpus import build_demo_corpus
    from data_shards.reader import iter_records
    from pretrain.config import load_config
    from pretrain.data.collate import BatchBuilder
    from pretrain.data.masking import protclip_inputs
    from pretrain.losses.false_negatives import group_ids
    from pretrain.models.trimodal import TriModalModel

    root = tmp_path_factory.mktemp("protclip_demo")
    build_demo_corpus(root, num_train=96, num_heldout=48, samples_per_shard=48)
    records = list(iter_records(sorted((root / "train").glob("*.tar"))[0]))[:8]
    records[3].text = None  # a protein without text: out of GC, BSR and PDA, still in MLM
    records[5].text = dict(records[2].text)  # a duplicate text: one class for GC
    cfg = load_config(overrides=TINY_OVERRIDES)
    builder = BatchBuilder(cfg)
    rng = np.random.default_rng(0)
    batch = builder.build(records, rng, train=True)
    fields = [r.text for r in records]
    extra = protclip_inputs(
        batch["seq_tokens"], fields, builder.alphabet, builder.tokenizer, rng, text_max_length=cfg.model.text.max_length
    )
    batch["text_ids"], batch["text_attn"] = extra.pop("text_ids"), extra.pop("text_attn")
    extra["text_group"] = group_ids(fields)
    batch["protclip"] = extra
    torch.manual_seed(0)
    model = TriModalModel(cfg.model)
    return model, batch


def test_protclip_loss_on_a_tiny_demo_batch(tiny):
    model, batch = tiny
    assert not batch["present"]["text"][3] and batch["protclip"]["text_group"][2] == batch["protclip"]["text_group"][5]
    heads = ProtCLIPHeads.for_model(TINY_LOSS, model)
    model.zero_grad()
    out = protclip_forward(model, heads, batch)
    terms = ProtCLIPLoss(TINY_LOSS, backend="torch").compute(out, batch["present"], batch["protclip"])
    assert set(terms) == {"loss", "loss_gc", "loss_mlm", "loss_bsr", "loss_pda", "loss_pda_nce", "loss_pda_vq"}
    assert all(torch.isfinite(v) for v in terms.values())
    w = TINY_LOSS
    want = terms["loss_gc"] + w.mlm * terms["loss_mlm"] + w.bsr * terms["loss_bsr"] + w.pda * terms["loss_pda"]
    torch.testing.assert_close(terms["loss"], want)
    terms["loss"].backward()
    grads = {
        "sequence encoder": model.sequence_encoder.esm.embed_tokens.weight.grad,
        "text encoder": model.text_encoder.bert.embeddings.word_embeddings.weight.grad,
        "bsr decoder": heads.bsr.query_in.weight.grad,
        "pda prototypes": heads.pda.prototypes.grad,
        "pda scale": heads.pda.log_logit_scale.grad,
        "logit scale": model.log_logit_scale.grad,
    }
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_deduplicated_gc_runs_on_the_ring_with_the_same_loss(tiny, monkeypatch):
    """loss.strategy=ring reaches the grouped GC term (rows 2 and 5 share a text): same loss on one process."""
    import kernels.ring

    model, batch = tiny
    heads = ProtCLIPHeads.for_model(TINY_LOSS, model)
    with torch.no_grad():
        out = protclip_forward(model, heads, batch)
    calls, ring = [], kernels.ring.ring_symmetric_infonce
    monkeypatch.setattr(kernels.ring, "ring_symmetric_infonce", lambda *a, **k: calls.append(k) or ring(*a, **k))
    want = ProtCLIPLoss(TINY_LOSS, backend="torch").compute(out, batch["present"], batch["protclip"])["loss_gc"]
    got = ProtCLIPLoss(TINY_LOSS, backend="torch", strategy="ring").compute(out, batch["present"], batch["protclip"])[
        "loss_gc"
    ]
    assert len(calls) == 1 and calls[0]["targets"] is not None  # the ring, with retargeted rows
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


def test_zero_weights_skip_their_passes(tiny):
    model, batch = tiny
    cfg = replace(TINY_LOSS, mlm=0.0, bsr=0.0, false_negatives="none")
    heads = ProtCLIPHeads.for_model(cfg, model)
    assert heads.bsr is None and heads.pda is not None
    with torch.no_grad():
        out = protclip_forward(model, heads, batch)
        terms = ProtCLIPLoss(cfg, backend="torch").compute(out, batch["present"], batch["protclip"])
    assert "mlm_logits" not in out and "bsr_logits" not in out
    assert set(terms) == {"loss", "loss_gc", "loss_pda", "loss_pda_nce", "loss_pda_vq"}


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"gc": 0.0, "mlm": 0.0, "bsr": 0.0, "pda": 0.0}, "at least one"),
        ({"bsr": -1.0}, "bsr=-1.0"),
        ({"bsr_min_span": 11}, "bsr_min_span"),
        ({"bsr_hidden": 30, "bsr_heads": 4}, "bsr_hidden"),
        ({"pda_quantize": "hard"}, "pda_quantize"),
        ({"false_negatives": "ec"}, "false_negatives"),
    ],
)
def test_config_validation_names_the_field(change, needle):
    with pytest.raises(ValueError, match=needle):
        validate_protclip_config(replace(ProtCLIPLossConfig(), **change))
