"""ProtCLIP's fidelity switches (loss.protclip): PDA assignment vq | gumbel and PDA text joint | per_segment,
against small hand-computed cases, then on the tiny demo batch of test_protclip.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, load_config
from pretrain.losses.protclip import ProtCLIPLoss, ProtCLIPLossConfig
from pretrain.models.protclip_modules import (
    PDAHead,
    ProtCLIPHeads,
    encode_segments_separately,
    protclip_forward,
    segment_token_rows,
)
from tests.pretrain.losses.test_protclip import TINY_LOSS, tiny  # noqa: F401 (the demo-batch fixture)


def _gumbel_head(**kw) -> PDAHead:
    """2-d prototypes e1, e2; text projection the identity, so z is the (normalised) segment mean."""
    head = PDAHead(4, 2, proj_dim=2, num_prototypes=2, num_segments=2, assign="gumbel", assign_temperature=0.5, **kw)
    with torch.no_grad():
        head.prototypes.copy_(torch.eye(2))
        head.text_proj.weight.copy_(torch.eye(2))
        head.text_proj.bias.zero_()
    return head


def test_gumbel_assignment_in_eval_mode_by_hand():
    head = _gumbel_head(gumbel_temperature=1.0, gumbel_min_temperature=1.0).eval()
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2): segment 0 = e1, segment 1 = e2
    present = torch.tensor([[True, False]])
    z_q, proto, codes, tau = head.gumbel_assign(z, present)
    # logits cos / 0.5 = [2, 0]; softmax at tau 1: e^2 / (e^2 + 1) = 0.880797, 1 / (e^2 + 1) = 0.119203
    torch.testing.assert_close(z_q[0, 0], torch.tensor([0.880797, 0.119203]), rtol=0, atol=1e-6)
    torch.testing.assert_close(z_q[0, 1], torch.tensor([0.119203, 0.880797]), rtol=0, atol=1e-6)
    # the public code's prototype loss, mean |q - z|, over present segments only: (0.119203 + 0.119203) / 2
    assert float(proto.detach()) == pytest.approx(0.119203, abs=1e-6)
    assert codes.tolist() == [[0, 1]] and tau == 1.0
    assert int(head.gumbel_step) == 0  # eval forwards do not advance the schedule


def test_gumbel_assignment_in_training_is_a_gumbel_softmax_sample():
    head = _gumbel_head(gumbel_temperature=0.5, gumbel_min_temperature=0.5).train()
    z = F.normalize(torch.tensor([[[1.0, 0.2], [0.3, 1.0]]]), dim=-1)
    torch.manual_seed(7)
    z_q, _, _, _ = head.gumbel_assign(z, torch.ones(1, 2, dtype=torch.bool))
    torch.manual_seed(7)
    g = -torch.empty(1, 2, 2).exponential_().log()  # Gumbel(0, 1) noise, as torch draws it
    w = torch.softmax((z @ torch.eye(2) / 0.5 + g) / 0.5, dim=-1)
    torch.testing.assert_close(z_q, w @ torch.eye(2))
    assert int(head.gumbel_step) == 1


def test_gumbel_temperature_schedule_and_its_state():
    head = _gumbel_head(gumbel_temperature=0.9, gumbel_min_temperature=0.3, gumbel_decay=0.5).train()
    z, present = F.normalize(torch.randn(2, 2, 2), dim=-1), torch.ones(2, 2, dtype=torch.bool)
    taus = []
    for _ in range(4):
        taus.append(head.gumbel_assign(z, present)[3])
    # 0.9 · e^{-0.5 t}: 0.9, 0.545878, 0.331091, then the floor 0.3 (0.200817 < 0.3)
    assert taus == pytest.approx([0.9, 0.545878, 0.331091, 0.3], abs=1e-6)
    with torch.no_grad():  # the finite-loss probe and validation do not advance it
        head.gumbel_assign(z, present)
    assert int(head.gumbel_step) == 4
    assert "gumbel_step" in head.state_dict()  # saved with the model: a resumed run continues the schedule
    assert "gumbel_step" not in PDAHead(4, 2, proj_dim=2, num_prototypes=2).state_dict()  # vq: unchanged
    fresh = _gumbel_head(gumbel_temperature=0.9, gumbel_min_temperature=0.3, gumbel_decay=0.5)
    fresh.load_state_dict(head.state_dict())
    assert fresh.gumbel_tau() == pytest.approx(0.3)


def test_gumbel_prototype_loss_is_logged_outside_the_total():
    torch.manual_seed(0)
    cfg = ProtCLIPLossConfig(gc=0.0, mlm=0.0, bsr=0.0, pda=1.0, pda_assign="gumbel", pda_proj_dim=8, pda_prototypes=4)
    head = PDAHead(6, 5, proj_dim=8, num_prototypes=4, num_segments=3, assign="gumbel")
    residues, mask = torch.randn(2, 7, 6), torch.ones(2, 7, dtype=torch.bool)
    text = torch.randn(2, 6, 5)
    seg = torch.tensor([[-1, 0, 0, 1, 2, -1], [-1, 0, 1, 1, -1, -1]])
    out = {f"pda_{k}": v for k, v in head(residues, mask, text, seg).items()}
    out["sequence"] = torch.zeros(2, 4)
    present = {"sequence": torch.ones(2, dtype=torch.bool), "text": torch.ones(2, dtype=torch.bool)}
    terms = ProtCLIPLoss(cfg, backend="torch").compute(out, present, {})
    assert set(terms) == {"loss", "loss_pda", "loss_pda_nce", "loss_pda_proto", "pda_gumbel_tau"}
    assert float(terms["loss_pda_proto"]) > 0 and not terms["loss_pda_proto"].requires_grad
    torch.testing.assert_close(terms["loss"], terms["loss_pda_nce"])  # no prototype loss in the total
    assert float(terms["pda_gumbel_tau"]) == pytest.approx(0.9)
    vq = replace(cfg, pda_assign="vq")
    vq_head = PDAHead(6, 5, proj_dim=8, num_prototypes=4, num_segments=3)
    vq_out = {f"pda_{k}": v for k, v in vq_head(residues, mask, text, seg).items()} | {"sequence": out["sequence"]}
    vq_terms = ProtCLIPLoss(vq, backend="torch").compute(vq_out, present, {})
    torch.testing.assert_close(vq_terms["loss"], vq_terms["loss_pda_nce"] + vq.pda_vq * vq_terms["loss_pda_vq"])


def test_segment_rows_by_hand():
    # text 0: [CLS] a a b(slot 2) b [SEP] pad; text 1: [CLS] c [SEP]; text 2: no text at all
    text_ids = torch.tensor([[101, 11, 12, 21, 22, 102, 0], [101, 31, 102, 0, 0, 0, 0], [101, 102, 0, 0, 0, 0, 0]])
    attn = (torch.arange(7) < torch.tensor([[6], [3], [2]])).long()
    seg = torch.tensor([[-1, 0, 0, 2, 2, -1, -1], [-1, 1, -1, -1, -1, -1, -1], [-1] * 7])
    ids, row_attn, pairs, counts = segment_token_rows(text_ids, attn, seg, num_segments=3)
    assert pairs.tolist() == [[0, 0], [0, 2], [1, 1]]
    assert counts.tolist() == [2, 2, 1]
    assert ids.tolist() == [[101, 11, 12, 102], [101, 21, 22, 102], [101, 31, 102, 0]]
    assert row_attn.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]


def test_per_segment_means_are_each_segment_encoded_alone():
    from pretrain.models.text_encoder import TextEncoder

    torch.manual_seed(0)
    enc = TextEncoder(load_config(overrides=["model.text.num_layers=1"]).model.text).eval()
    text_ids = torch.tensor([[101, 11, 12, 21, 22, 23, 102], [101, 31, 102, 0, 0, 0, 0]])
    attn = (torch.arange(7) < torch.tensor([[7], [3]])).long()
    seg = torch.tensor([[-1, 0, 0, 1, 1, 1, -1], [-1, 1, -1, -1, -1, -1, -1]])
    means, present = encode_segments_separately(enc, text_ids, attn, seg, num_segments=2)
    assert present.tolist() == [[True, True], [False, True]]
    alone = {  # [CLS] segment [SEP], encoded on its own; the mean over the segment's tokens
        (0, 0): torch.tensor([[101, 11, 12, 102]]),
        (0, 1): torch.tensor([[101, 21, 22, 23, 102]]),
        (1, 1): torch.tensor([[101, 31, 102]]),
    }
    for (b, s), ids in alone.items():
        want = enc.token_representations(ids, torch.ones_like(ids))[0, 1:-1].mean(0)
        torch.testing.assert_close(means[b, s], want, rtol=1e-5, atol=1e-5, msg=str((b, s)))
    joint = enc.token_representations(text_ids, attn)[0, 3:6].mean(0)  # the same tokens with context
    assert not torch.allclose(means[0, 1], joint, atol=1e-3)
    assert torch.all(means[1, 0] == 0)


def test_switches_on_the_tiny_demo_batch(tiny):  # noqa: F811 (the imported fixture)
    model, batch = tiny
    cfg = replace(
        TINY_LOSS, gc=0.0, mlm=0.0, bsr=0.0, pda_assign="gumbel", pda_text="per_segment", false_negatives="none"
    )
    torch.manual_seed(0)
    heads = ProtCLIPHeads.for_model(cfg, model).train()
    model.zero_grad()
    out = protclip_forward(model, heads, batch)
    terms = ProtCLIPLoss(cfg, backend="torch").compute(out, batch["present"], batch["protclip"])
    assert all(torch.isfinite(v) for v in terms.values()) and "loss_pda_proto" in terms
    terms["loss"].backward()  # PDA alone trains the text encoder through the per-segment pass
    assert model.text_encoder.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert heads.pda.prototypes.grad.abs().sum() > 0
    with torch.no_grad():  # the segment texts differ from the jointly encoded ones
        joint = protclip_forward(model, ProtCLIPHeads.for_model(replace(cfg, pda_text="joint"), model), batch)
    assert joint["pda_text"].shape == out["pda_text"].shape
    torch.testing.assert_close(joint["pda_present"], out["pda_present"])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("loss.protclip.pda_assign=hard", "loss.protclip.pda_assign='hard'"),
        ("loss.protclip.pda_text=both", "loss.protclip.pda_text='both'"),
        ("loss.protclip.pda_gumbel_temperature=0", "loss.protclip.pda_gumbel_temperature=0.0"),
        ("loss.protclip.pda_gumbel_min_temperature=2.0", "pda_gumbel_min_temperature=2.0 >"),
        ("loss.protclip.pda_gumbel_decay=-1", "loss.protclip.pda_gumbel_decay=-1.0"),
    ],
)
def test_switch_values_are_config_errors_naming_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=["loss.objective=protclip", override])


def test_defaults_are_today_s_behaviour():
    cfg = ProtCLIPLossConfig()
    assert (cfg.pda_assign, cfg.pda_text) == ("vq", "joint")
    assert math.isclose(cfg.pda_gumbel_temperature, 0.9) and cfg.pda_gumbel_decay == 0.0
