"""BatchBuilder (pretrain/data/collate.py): the text-augmentation switches reach the batch."""

import numpy as np
import pytest
import torch

from data_shards.schema import ProteinRecord
from pretrain.config import ConfigError, load_config
from pretrain.data.collate import BatchBuilder
from data_shards.text_rules import canonical_text
from pretrain.models.text_encoder import tokenize_texts
from tests.conftest import TINY_OVERRIDES


def _records() -> list[ProteinRecord]:
    out = []
    for i in range(4):
        text = {
            "name": f"Kinase {i}",
            "go": [
                {
                    "id": "GO:0006468",
                    "aspect": "P",
                    "name": "protein phosphorylation",
                    "definition": "The process of introducing a phosphate group on to a protein.",
                }
            ],
            "rewrites": [f"rewritten description number {i} of a protein kinase"],
        }
        out.append(ProteinRecord(f"P{i}", "MKVLA", None, text, {"source": "test"}))
    return out


def test_stored_rewrites_and_definitions_follow_the_config():
    records = _records()
    cfg = load_config(overrides=TINY_OVERRIDES + ["data.text_rewrite_prob=1.0"])
    builder = BatchBuilder(cfg, views={"text": True})
    batch = builder.build(records, np.random.default_rng(0), train=True)
    want, _ = tokenize_texts(builder.tokenizer, [r.text["rewrites"][0] for r in records], cfg.model.text.max_length)
    torch.testing.assert_close(batch["text_ids"], want)
    torch.testing.assert_close(batch["views"]["text_ids"], want)
    evaluation = builder.build(records, np.random.default_rng(0), train=False)  # never rewrites
    want_eval, _ = tokenize_texts(
        builder.tokenizer, [canonical_text(r.text) for r in records], cfg.model.text.max_length
    )
    torch.testing.assert_close(evaluation["text_ids"], want_eval)

    cfg = load_config(overrides=TINY_OVERRIDES + ["data.text_rewrite_prob=0.0", "data.text_definition_prob=1.0"])
    builder = BatchBuilder(cfg)
    batch = builder.build(records, np.random.default_rng(0), train=True)
    decoded = builder.tokenizer.batch_decode(batch["text_ids"], skip_special_tokens=True)
    assert all("phosphate group" in text and "rewritten" not in text for text in decoded)


def test_protclip_batches_do_not_augment_the_text_they_replace(monkeypatch):
    cfg = load_config(overrides=TINY_OVERRIDES + ["loss.objective=protclip", "data.text_augment=true"])
    builder = BatchBuilder(cfg)
    monkeypatch.setattr(builder, "_augment", lambda *a: pytest.fail("augmented a text protclip discards"))
    batch = builder.build(_records(), np.random.default_rng(0), train=True)
    assert "protclip" in batch and batch["text_ids"].shape[0] == 4


@pytest.mark.parametrize("name", ["text_rewrite_prob", "text_definition_prob"])
def test_probabilities_are_checked(name):
    with pytest.raises(ConfigError, match=f"data.{name}"):
        load_config(overrides=TINY_OVERRIDES + [f"data.{name}=1.5"])


def test_second_structure_view_keeps_nodes_of_a_chain_with_few_complete_residues():
    """Residue dropping in the second view keeps two nodes: counted over the residues that become
    nodes (N, CA and C present), not over all residues, or a mostly CA-only chain could lose every
    node while present["structure"] stays True (the empty graph's embedding as positive)."""
    from data_shards.schema import Backbone

    length = 30
    coords = np.random.default_rng(0).normal(size=(length, 4, 3)).astype(np.float32) * 5
    mask = np.zeros((length, 4), bool)
    mask[:, 1] = True  # CA-only chain ...
    mask[[3, 17], :] = True  # ... with two complete residues
    record = ProteinRecord("P1", "A" * length, Backbone(coords, mask), {"name": "x"}, {"source": "test"})
    cfg = load_config(overrides=TINY_OVERRIDES + ["data.residue_drop_prob=0.5"])
    builder = BatchBuilder(cfg, views={"structure": True})
    for seed in range(50):
        batch = builder.build([record], np.random.default_rng(seed), train=True)
        assert batch["present"]["structure"].tolist() == [True]
        assert batch["views"]["graph"]["node_s"].shape[0] == 2


def test_min_plddt_drops_low_confidence_residues_from_the_structure_graph():
    """Predicted models: residues under data.min_plddt leave the graph (sequence untouched); an
    experimental structure (no pLDDT) keeps every residue."""
    from data_shards.schema import Backbone

    length = 8
    t = np.arange(4 * length, dtype=np.float32) * 0.9
    coords = np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 0.5 * t], -1).reshape(length, 4, 3).astype(np.float32)
    mask = np.ones((length, 4), bool)
    plddt = np.array([90, 50, 95, 69.9, 70, 88, 30, 91], np.float32)
    predicted = ProteinRecord("AF1", "MKVLAGSK", Backbone(coords, mask, plddt), {"name": "x"}, {"source": "alphafold"})
    experimental = ProteinRecord("PDB1", "MKVLAGSK", Backbone(coords, mask), {"name": "x"}, {"source": "pdb"})
    for min_plddt, kept in ((None, list(range(length))), (70, [0, 2, 4, 5, 7])):
        cfg = load_config(overrides=[*TINY_OVERRIDES, f"data.min_plddt={'null' if min_plddt is None else min_plddt}"])
        batch = BatchBuilder(cfg).build([predicted, experimental], np.random.default_rng(0), train=False)
        graph = batch["graph"]
        assert graph["residue_index"][graph["batch"] == 0].tolist() == kept
        assert graph["residue_index"][graph["batch"] == 1].tolist() == list(range(length))
        assert (batch["seq_tokens"][0] != BatchBuilder(cfg).alphabet.padding_idx).sum() == length + 2
    with pytest.raises(ConfigError, match="data.min_plddt"):
        load_config(overrides=[*TINY_OVERRIDES, "data.min_plddt=170"])


def test_stored_residue_numbers_reach_the_edge_offsets_of_both_structure_views():
    """A chain break whose gap the author numbering sizes: the batch's graphs (main and second
    view) carry the offsets backbone_graph computes from those numbers, cropped with the window."""
    from data_shards.schema import Backbone
    from pretrain.data.featurize import backbone_graph

    length = 12
    t = np.arange(4 * length, dtype=np.float32) * 0.9
    coords = np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 0.5 * t], -1).reshape(length, 4, 3).astype(np.float32)
    coords[6:] += np.array([6.0, 0.0, 0.0], np.float32)  # a break after residue 5
    mask = np.ones((length, 4), bool)
    numbers = np.array([1, 2, 3, 4, 5, 6, 30, 31, 32, 33, 34, 35], np.int32)
    record = ProteinRecord("P1", "A" * length, Backbone(coords, mask, None, numbers), {"name": "x"}, {"source": "t"})
    cfg = load_config(overrides=[*TINY_OVERRIDES, "data.coord_noise=0.0", "data.residue_drop_prob=0.0"])
    s = cfg.model.structure
    want = backbone_graph(
        coords, mask, s.k_neighbors, s.num_rbf, s.num_positional, numbers=torch.from_numpy(numbers).long()
    )
    batch = BatchBuilder(cfg, views={"structure": True}).build([record], np.random.default_rng(0), train=True)
    for graph in (batch["graph"], batch["views"]["graph"]):
        torch.testing.assert_close(graph["edge_s"], want["edge_s"])
    cfg = load_config(overrides=[*TINY_OVERRIDES, "model.sequence.max_length=8"])  # the window [0, 8) at eval
    cropped = BatchBuilder(cfg).build([record], np.random.default_rng(0), train=False)["graph"]
    want = backbone_graph(
        coords[:8], mask[:8], s.k_neighbors, s.num_rbf, s.num_positional, numbers=torch.from_numpy(numbers[:8]).long()
    )
    torch.testing.assert_close(cropped["edge_s"], want["edge_s"])
