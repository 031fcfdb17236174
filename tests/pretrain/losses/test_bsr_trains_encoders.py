"""BSR alone trains both encoders: one optimizer step on the BSR loss changes ESM-2 and BERT weights.

ProtCLIP's public code computes the BSR encoder passes under ``torch.no_grad()``, so there BSR only
trains its decoder. Here every other ProtCLIP weight is 0, so any change to the encoders can only
come from the BSR gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.data.collate import BatchBuilder
from pretrain.engine.builder import build_model
from pretrain.losses.protclip import ProtCLIPLoss
from tests.conftest import TINY_OVERRIDES

BSR_ONLY = TINY_OVERRIDES + [
    "loss.objective=protclip",
    "loss.protclip.gc=0.0",
    "loss.protclip.mlm=0.0",
    "loss.protclip.pda=0.0",
    "loss.protclip.bsr=0.7",
    "loss.protclip.bsr_hidden=32",
    "loss.protclip.bsr_heads=4",
    "loss.protclip.bsr_dropout=0.0",
    "loss.protclip.false_negatives=none",
]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from data_shards.demo_corpus import build_demo_corpus
    from data_shards.reader import iter_records

    root = tmp_path_factory.mktemp("bsr_demo")
    build_demo_corpus(root, num_train=48, num_heldout=48, samples_per_shard=48)
    return list(iter_records(sorted((root / "train").glob("*.tar"))[0]))[:6]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(p.detach(), before[name])}


def test_one_step_of_bsr_alone_changes_both_encoders(records):
    cfg = load_config(overrides=BSR_ONLY)
    batch = BatchBuilder(cfg).build(records, np.random.default_rng(0), train=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    assert model.protclip.bsr is not None and model.protclip.pda is None
    parts = {
        "sequence": model.sequence_encoder,
        "text": model.text_encoder,
        "structure": model.structure_encoder,
        "structure head": model.heads["structure"],
    }
    before = {name: _snapshot(m) for name, m in parts.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # no weight decay, no momentum: moves iff grad != 0

    out = model(batch)
    terms = ProtCLIPLoss(cfg.loss.protclip, backend="torch").compute(out, batch["present"], batch["protclip"])
    assert set(terms) == {"loss", "loss_bsr"} and terms["loss"].requires_grad
    terms["loss"].backward()
    optimizer.step()

    seq = _changed(model.sequence_encoder, before["sequence"])
    text = _changed(model.text_encoder, before["text"])
    # The deepest layers are the ones no_grad would freeze first; embeddings show the gradient went all the way.
    last = cfg.model.sequence.num_layers - 1
    assert f"esm.layers.{last}.fc2.weight" in seq and "esm.embed_tokens.weight" in seq, sorted(seq)[:5]
    assert "bert.embeddings.word_embeddings.weight" in text, sorted(text)[:5]
    assert any(name.startswith(f"bert.encoder.layer.{cfg.model.text.num_layers - 1}.") for name in text)
    # Nothing reaches what BSR does not use: the structure encoder and the structure head stay put.
    assert not _changed(model.structure_encoder, before["structure"])
    assert not _changed(model.heads["structure"], before["structure head"])
