"""Embed a suite's proteins once: the aligned model of an export, or its encoders before alignment.

* **trained** (:func:`load_trained`): the export as :func:`pretrain.api.load_model` loads it; every
  feature is a unit row of the shared space (the projection heads' output).
* **base** (:func:`load_base`): the encoders of the export's recipe as they were *before*
  alignment, built with :func:`pretrain.engine.builder.build_model` from the recipe's pretrained
  weights (``model.sequence.weights``: the loaded ESM-2; ``model.text.pretrained_dir``: the loaded
  BERT) and seeded with ``train.seed`` for the parts without pretrained weights (the bundled demo
  recipe has none: its base row is the randomly initialised encoders). The projection heads do not
  exist before alignment, so base features are each encoder's pooled output, L2-normalised (plain
  ESM-2 mean-pooled embeddings for a real recipe, as in the seeds' tables); the modalities then share
  no space and cross-modal tasks report ``not applicable``.

Structures that cannot be read or featurised leave their protein without a structure feature (it
is counted); a sequence is always embedded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pretrain.api import EmbeddingModel, load_model
from pretrain.benchmark.data import Proteins
from pretrain.config import load_run_config
from pretrain.engine.builder import build_model
from pretrain.eval.embed import resolve_device

log = logging.getLogger(__name__)

FEATURES = ("sequence", "structure", "concat")


@dataclass
class Embeddings:
    """Row i is ``proteins.ids[i]``; rows not embedded hold zeros and ``present`` False."""

    proteins: Proteins
    vectors: dict[str, np.ndarray]  # "sequence" / "structure" / "text" -> (N, E_m) float32
    present: dict[str, np.ndarray]  # same keys -> (N,) bool
    shared_space: bool  # True when modalities share one space (cross-modal tasks apply)
    failures: dict[str, str] = field(default_factory=dict)  # protein id -> why its structure is missing

    def feature(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, E') unit-row features and (N,) availability for sequence, structure or concat.

        ``concat`` joins the two unit rows and rescales by 1/sqrt(2) (unit rows again).
        """
        if name == "concat":
            x = np.concatenate([self.vectors["sequence"], self.vectors["structure"]], 1) / np.sqrt(2.0)
            return x.astype(np.float32), self.present["sequence"] & self.present["structure"]
        if name not in self.vectors:
            raise ValueError(f"unknown feature {name!r}; expected one of {FEATURES} or text")
        return self.vectors[name], self.present[name]


class Embedder:
    """Embeds proteins with one model; ``kind`` is "trained" or "base"."""

    def __init__(self, kind: str, sequence: EmbeddingModel, structure: EmbeddingModel, text: EmbeddingModel | None):
        self.kind = kind
        self._seq, self._struct, self._text = sequence, structure, text

    @property
    def sequence_model(self) -> EmbeddingModel:
        """The model that embeds sequences (its ESM-2 also scores mutations: the ``mutation`` task)."""
        return self._seq

    @property
    def shared_space(self) -> bool:
        return self.kind == "trained"

    def embed(
        self, proteins: Proteins, rows: np.ndarray, text_column: str | None = None, batch_size: int = 16
    ) -> Embeddings:
        """Embed ``proteins`` rows ``rows`` (sequence, structure where a file is named, text when asked)."""
        n = len(proteins.ids)
        rows = np.asarray(sorted(set(int(r) for r in rows)), dtype=np.int64)
        vectors: dict[str, np.ndarray] = {}
        present: dict[str, np.ndarray] = {}
        seq = self._seq.embed_sequences([proteins.sequences[i] for i in rows], batch_size=batch_size)
        vectors["sequence"] = _scatter(seq, rows, n)
        present["sequence"] = _mask(rows, n)
        struct_rows = [int(i) for i in rows if proteins.structures[i] is not None]
        failures: dict[str, str] = {}
        done, vecs = _embed_structures(self._struct, proteins, struct_rows, batch_size, failures)
        dim = self._struct.embed_dim
        vectors["structure"] = _scatter(vecs.reshape(-1, dim), np.asarray(done, np.int64), n, dim)
        present["structure"] = _mask(np.asarray(done, np.int64), n)
        if text_column is not None and self._text is not None:
            if text_column not in proteins.columns:
                raise ValueError(f"{proteins.source}: no text column {text_column!r}")
            texts = proteins.columns[text_column]
            text_rows = np.asarray([i for i in rows if texts[i].strip()], np.int64)
            emb = self._text.embed_texts([texts[i] for i in text_rows])
            vectors["text"] = _scatter(emb, text_rows, n, self._text.embed_dim)
            present["text"] = _mask(text_rows, n)
        if failures:
            log.warning("%d structures could not be embedded, e.g. %s", len(failures), next(iter(failures.items())))
        return Embeddings(proteins, vectors, present, self.shared_space, failures)


def _scatter(x: np.ndarray, rows: np.ndarray, n: int, dim: int | None = None) -> np.ndarray:
    out = np.zeros((n, dim if dim is not None else x.shape[1]), np.float32)
    if len(rows):
        out[rows] = x
    return out


def _mask(rows: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros(n, bool)
    m[rows] = True
    return m


def _embed_structures(model: EmbeddingModel, proteins: Proteins, rows: list[int], batch_size: int, failures):
    """Batches of structures; a batch that fails is retried one file at a time (bad files recorded)."""
    done: list[int] = []
    chunks: list[np.ndarray] = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        items = [_item(proteins.structures[i]) for i in part]
        try:
            chunks.append(model.embed_structures(items, batch_size=batch_size))
            done.extend(part)
            continue
        except (OSError, ValueError) as e:  # StructureError is a ValueError
            log.debug("structure batch failed (%s); retrying one by one", e)
        for i, item in zip(part, items):
            try:
                chunks.append(model.embed_structures([item]))
                done.append(i)
            except (OSError, ValueError) as e:
                failures[proteins.ids[i]] = " ".join(str(e).split())[:200]
    dim = model.embed_dim
    return done, (np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32))


def _item(structure: tuple[Path, str | None]):
    path, chain = structure
    return (path, chain) if chain is not None else path


def load_trained(export: str | Path, device: str = "cpu") -> Embedder:
    """The aligned model of an export (a run directory stands for its ``export/``)."""
    model = load_model(export, device=device)
    return Embedder("trained", model, model, model)


class _Pooled(nn.Module):
    """Stands in for a projection head: the encoder's pooled output passes unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def load_base(export: str | Path, device: str = "cpu") -> Embedder:
    """The export's recipe's encoders before alignment (see the module docstring).

    Raises:
        FileNotFoundError / OSError: the recipe's pretrained weights are not readable here (their
            paths are the recipe's, relative to where training ran).
    """
    export_dir = Path(export)
    if not (export_dir / "config.yaml").is_file() and (export_dir / "export" / "config.yaml").is_file():
        export_dir = export_dir / "export"  # a run directory stands for its export
    if not (export_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"no config.yaml in {export_dir}: not an export (or run) directory")
    cfg, _ = load_run_config(export_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, load_pretrained=True)
    for name in list(model.heads.keys()):
        model.heads[name] = _Pooled()
    model = model.to(resolve_device(device)).eval()
    views = []
    for enc in (model.sequence_encoder, model.structure_encoder, model.text_encoder):
        view = EmbeddingModel(model, cfg)
        view.embed_dim = enc.output_dim  # pooled width of that encoder
        views.append(view)
    return Embedder("base", views[0], views[1], views[2])
