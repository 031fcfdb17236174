"""Helpers shared by the evaluation tests: a tiny demo corpus and an untrained tiny export."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_MODEL = [
    "model.sequence.num_layers=1",
    "model.structure.num_layers=1",
    "model.text.num_layers=1",
    "eval.batch_size=48",
]

# A hand-written OBO: MF root <- binding <- ion binding <- zinc ion binding (alt id GO:0000009),
# catalytic activity (child of the root) with an obsolete term, and a CC part_of chain.
TINY_OBO = """format-version: 1.2

[Term]
id: GO:0003674
name: molecular_function
namespace: molecular_function

[Term]
id: GO:0005488
name: binding
namespace: molecular_function
is_a: GO:0003674 ! molecular_function

[Term]
id: GO:0043167
name: ion binding
namespace: molecular_function
is_a: GO:0005488 ! binding

[Term]
id: GO:0008270
name: zinc ion binding
namespace: molecular_function
alt_id: GO:0000009
is_a: GO:0043167 ! ion binding

[Term]
id: GO:0003824
name: catalytic activity
namespace: molecular_function
is_a: GO:0003674

[Term]
id: GO:0000001
name: obsolete thing
namespace: molecular_function
is_obsolete: true

[Term]
id: GO:0005575
name: cellular_component
namespace: cellular_component

[Term]
id: GO:0005737
name: cytoplasm
namespace: cellular_component
is_a: GO:0005575

[Term]
id: GO:0005829
name: cytosol
namespace: cellular_component
relationship: part_of GO:0005737 ! cytoplasm

[Typedef]
id: part_of
name: part of
"""


def build_corpus(out: Path) -> Path:
    """96 train / 48 held-out demo proteins (shards of 48) under ``out``."""
    from data_shards.demo_corpus import build_demo_corpus

    build_demo_corpus(out, num_train=96, num_heldout=48, samples_per_shard=48, seed=0)
    return out


def build_export(corpus: Path, out: Path, seed: int = 0) -> Path:
    """An untrained tiny TriModalModel of the demo recipe (1-layer encoders) exported to ``out``."""
    from pretrain.config import load_config
    from pretrain.engine.export import write_export
    from pretrain.models.trimodal import TriModalModel

    cfg = load_config(
        None,
        TINY_MODEL + [f"data.train_shards={corpus / 'train'}", f"data.eval_shards={corpus / 'heldout'}"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TriModalModel(cfg.model)
    return write_export(model.state_dict(), cfg, out)
