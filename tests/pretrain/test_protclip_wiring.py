"""``loss.objective: protclip`` wired through collate, model, trainer loss and export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.data.collate import BatchBuilder
from pretrain.data.masking import NUM_SEGMENTS
from pretrain.engine.builder import build_model
from pretrain.engine.export import load_exported, write_export
from pretrain.losses.protclip import ProtCLIPLoss
from pretrain.models.trimodal import TriModalModel
from tests.conftest import TINY_OVERRIDES

PROTCLIP_OVERRIDES = TINY_OVERRIDES + [
    "loss.objective=protclip",
    "loss.protclip.bsr_hidden=32",
    "loss.protclip.bsr_heads=4",
    "loss.protclip.bsr_dropout=0.0",
    "loss.protclip.pda_proj_dim=16",
    "loss.protclip.pda_prototypes=8",
    "loss.protclip.false_negatives=text",
]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from data_shards.demo_corpus import build_demo_corpus
    from data_shards.reader import iter_records

    root = tmp_path_factory.mktemp("protclip_wiring_demo")
    build_demo_corpus(root, num_train=96, num_heldout=48, samples_per_shard=48)
    recs = list(iter_records(sorted((root / "train").glob("*.tar"))[0]))[:8]
    recs[3].text = None  # no text: out of GC, BSR and PDA
    return recs


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=PROTCLIP_OVERRIDES)


@pytest.fixture(scope="module")
def batch(cfg, records):
    return BatchBuilder(cfg, views={"sequence": True, "structure": True, "text": True}).build(
        records, np.random.default_rng(0), train=True
    )


def test_batch_builder_adds_protclip_targets(cfg, records, batch):
    pc = batch["protclip"]
    assert set(pc) == {
        "mlm_tokens",
        "mlm_labels",
        "bsr_tokens",
        "bsr_labels",
        "segment_ids",
        "segment_present",
        "text_group",
    }
    b, ls = batch["seq_tokens"].shape
    lt = batch["text_ids"].shape[1]
    for key in ("mlm_tokens", "mlm_labels", "bsr_tokens", "bsr_labels"):
        assert pc[key].shape == (b, ls) and pc[key].dtype == torch.long, key
    assert pc["segment_ids"].shape == (b, lt) == batch["text_attn"].shape
    assert pc["segment_present"].shape == (b, NUM_SEGMENTS) and pc["segment_present"].dtype == torch.bool
    assert pc["text_group"].shape == (b,) and pc["text_group"].dtype == torch.int64
    # The main text is the segmented one: every attended non-special token belongs to a segment.
    inner = batch["text_attn"].bool() & (pc["segment_ids"] >= 0)
    assert inner.sum() > 0 and not pc["segment_present"][3].any()
    assert batch["views"] == {}  # no second views in protclip mode
    # Evaluation batches are the same in both modes.
    ev = BatchBuilder(cfg).build(records, np.random.default_rng(0), train=False)
    base = BatchBuilder(load_config(overrides=TINY_OVERRIDES)).build(records, np.random.default_rng(0), train=False)
    assert "protclip" not in ev
    torch.testing.assert_close(ev["text_ids"], base["text_ids"])


def test_align_pro_batches_have_no_protclip_targets(records):
    plain = BatchBuilder(load_config(overrides=TINY_OVERRIDES), views={"sequence": True}).build(
        records, np.random.default_rng(0), train=True
    )
    assert "protclip" not in plain and "seq_tokens" in plain["views"]


def test_tiny_model_forward_loss_backward(cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.protclip is not None and not hasattr(TriModalModel(cfg.model), "protclip")
    heads = {id(p) for name, ps in model.parameter_groups().items() if name.startswith("heads") for p in ps}
    assert all(id(p) in heads for p in model.protclip.parameters())
    grouped = sum(len(ps) for ps in model.parameter_groups().values())
    assert grouped == len(list(model.parameters()))  # every parameter in exactly one group
    out = model(batch)
    lo = cfg.loss
    terms = ProtCLIPLoss(lo.protclip, backend="torch", strategy=lo.strategy).compute(
        out, batch["present"], batch["protclip"]
    )
    for key in ("loss", "loss_gc", "loss_mlm", "loss_bsr", "loss_pda"):
        assert torch.isfinite(terms[key]), key
    terms["loss"].backward()
    grads = {
        "sequence encoder": model.sequence_encoder.esm.embed_tokens.weight.grad,
        "text encoder": model.text_encoder.bert.embeddings.word_embeddings.weight.grad,
        "bsr decoder": model.protclip.bsr.query_in.weight.grad,
        "pda prototypes": model.protclip.pda.prototypes.grad,
        "pda scale": model.protclip.pda.log_logit_scale.grad,
    }
    for name, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    # Without protclip targets (an evaluation batch) the model embeds all three modalities.
    with torch.no_grad():
        plain = model({k: v for k, v in batch.items() if k != "protclip"})
    assert {"sequence", "structure", "text", "logit_scale"} <= set(plain)


def test_export_round_trip_of_a_protclip_model(cfg, tmp_path):
    torch.manual_seed(1)
    model = build_model(cfg)
    out = write_export(model.state_dict(), cfg, tmp_path / "export")
    loaded, loaded_cfg = load_exported(out)
    assert loaded_cfg.loss.objective == "protclip" and loaded_cfg.loss.protclip == cfg.loss.protclip
    assert loaded.protclip is not None
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and any(k.startswith("protclip.") for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_protclip_650M_recipe_selects_the_protclip_objective():
    from pretrain.config import CONFIGS_DIR, config_from_dict

    cfg = load_config(CONFIGS_DIR / "recipes" / "protclip_650M.yaml")
    lo = cfg.loss
    assert lo.objective == "protclip"
    assert (lo.protclip.gc, lo.protclip.mlm, lo.protclip.bsr, lo.protclip.pda) == (1.0, 0.3, 0.7, 1.0)
    assert (lo.protclip.bsr_min_span, lo.protclip.bsr_max_span, lo.protclip.bsr_ratio) == (5, 10, 0.15)
    assert lo.protclip.false_negatives == "text"
    assert config_from_dict(cfg.to_dict()) == cfg
