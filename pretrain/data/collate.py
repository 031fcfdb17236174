"""Turn decoded protein records into one model-ready batch (tokenise, featurise, augment).

This is the CPU-heavy part of the input pipeline; it runs inside the Ray reader actors
(or in-process for evaluation). The batch layout is:

    ids            list[str]           protein ids ("" for an unreadable sample)
    seq_tokens     (B, Ls) long         ESM alphabet, BOS/EOS, padded
    graph          dict                 GVP graph of the B backbones (``collate_graphs``)
    text_ids       (B, Lt) long         BERT WordPiece ids
    text_attn      (B, Lt) long
    present        dict[str, (B,) bool] which modalities each protein has
    views          dict                 second stochastic views (seq_tokens, graph, text_ids, text_attn)
    num_bad        int                  unreadable samples in this batch (their rows are all-absent)
    protclip       dict                 only with ``loss.objective: protclip`` and ``train``: the
                                        ``pretrain.data.masking.protclip_inputs`` targets
                                        (mlm_tokens, mlm_labels, bsr_tokens, bsr_labels (B, Ls);
                                        segment_ids (B, Lt); segment_present (B, S); with
                                        ``false_negatives`` also text_group (B,))
    text_group     (B,) long            only with ``loss.false_negatives`` (align_pro) and ``train``:
                                        false-negative group ids (``losses.false_negatives.group_ids``)

In protclip mode a training batch's ``text_ids`` / ``text_attn`` are the segmented text of
``protclip_inputs`` (one text pass serves GC, BSR and PDA) and there are no second views; an
evaluation batch is the same in both modes (canonical text, no ``protclip``).

A missing modality still gets a placeholder row (so every rank has B rows, as the gathered
loss needs) and ``present`` False, which removes it from every loss term.
"""

from __future__ import annotations

from dataclasses import dataclass

import esm
import numpy as np
import torch

from data_shards.schema import ProteinRecord
from data_shards.text_rules import augment_text, canonical_text
from pretrain.config import Config
from pretrain.data.featurize import backbone_graph, collate_graphs, edge_s_dim, graph_residues, peptide_bonds
from pretrain.data.masking import protclip_inputs
from pretrain.losses.false_negatives import group_ids
from pretrain.models.sequence_encoder import tokenize_sequences
from pretrain.models.text_encoder import build_tokenizer, tokenize_texts


def batch_to_device(obj, device):
    """Move every tensor of a (nested) batch dict to ``device``; other values are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: batch_to_device(v, device) for k, v in obj.items()}
    return obj


_PLACEHOLDER_SEQUENCE = "A"  # tokenised for rows without a sequence; masked out of the loss


@dataclass
class _Views:
    seq: bool
    struct: bool
    text: bool


class BatchBuilder:
    """Collates records into a batch; owns the tokenizers. One per process (actor)."""

    def __init__(self, cfg: Config, views: dict[str, bool] | None = None):
        self.cfg = cfg
        self.alphabet = esm.Alphabet.from_architecture("ESM-1b")
        self.tokenizer = build_tokenizer(cfg.model.text)
        v = views or {}
        self.views = _Views(v.get("sequence", False), v.get("structure", False), v.get("text", False))

    # ------------------------------------------------------------------ public
    def build(self, records: list[ProteinRecord | None], rng: np.random.Generator, train: bool) -> dict:
        """Collate ``records`` (None = unreadable sample) into a batch.

        ``rng`` drives every random choice (crop, augmentation, second views); ``train`` False
        gives the deterministic evaluation batch (canonical text, start crop, no views).
        """
        ids, seqs, backbones, texts = [], [], [], []
        present = {m: [] for m in ("sequence", "structure", "text")}
        for rec in records:
            seq, bb, fields = self._crop(rec, rng, train)
            ids.append(rec.id if rec is not None else "")
            present["sequence"].append(seq is not None)
            present["structure"].append(bb is not None)
            present["text"].append(bool(fields))
            seqs.append(seq)
            backbones.append(bb)
            texts.append(fields)
        text_max = self.cfg.model.text.max_length
        protclip = train and self.cfg.loss.objective == "protclip"
        augment = train and self.cfg.data.text_augment and not protclip  # protclip replaces this text
        main_texts = [(self._augment(f, rng) if augment else canonical_text(f)) for f in texts]
        text_ids, text_attn = tokenize_texts(self.tokenizer, main_texts, text_max)
        batch = {
            "ids": ids,
            "seq_tokens": self._tokens(seqs),
            "graph": collate_graphs([self._graph(bb) for bb in backbones], edge_dim=self._edge_dim),
            "text_ids": text_ids,
            "text_attn": text_attn,
            "present": {m: torch.tensor(v, dtype=torch.bool) for m, v in present.items()},
            "num_bad": sum(r is None for r in records),
            "views": {},
        }
        # A backbone with no residue that has N, CA and C is as good as no structure.
        batch["present"]["structure"] &= batch["graph"]["present"]
        if protclip:
            batch["protclip"] = self._protclip(batch, texts, rng)
        elif train:
            batch["views"] = self._second_views(seqs, backbones, texts, rng)
            if self.cfg.loss.false_negatives != "none":  # Align-Pro false-negative groups (loss.false_negatives)
                batch["text_group"] = group_ids(texts, self.cfg.loss.false_negatives)
        return batch

    # ------------------------------------------------------------------ helpers
    def _crop(self, rec: ProteinRecord | None, rng: np.random.Generator, train: bool):
        """Apply one residue window to sequence and backbone (they stay aligned)."""
        if rec is None:
            return None, None, None
        seq = rec.sequence or None
        bb = rec.backbone
        limit = self.cfg.model.sequence.max_length
        length = len(seq) if seq else (bb.coords.shape[0] if bb is not None else 0)
        start = 0
        if length > limit:
            start = int(rng.integers(0, length - limit + 1)) if train else 0
        stop = start + limit
        if seq:
            seq = seq[start:stop]
        if bb is None:
            return seq, None, rec.text
        coords = torch.from_numpy(np.asarray(bb.coords[start:stop], dtype=np.float32))
        mask = torch.from_numpy(np.asarray(bb.atom_mask[start:stop], dtype=bool))
        min_plddt = self.cfg.data.min_plddt
        if min_plddt is not None and bb.plddt is not None:  # low-confidence residues: as if unobserved
            mask = mask & torch.from_numpy(np.asarray(bb.plddt[start:stop]) >= min_plddt).unsqueeze(-1)
        numbers = (
            None if bb.residue_number is None else torch.from_numpy(bb.residue_number[start:stop].astype(np.int64))
        )
        return seq, (coords, mask, numbers), rec.text

    def _augment(self, fields: dict | None, rng: np.random.Generator) -> str:
        """One augmented description (stored rewrites and GO definitions as the config says)."""
        d = self.cfg.data
        return augment_text(fields, rng, rewrite_prob=d.text_rewrite_prob, definition_prob=d.text_definition_prob)

    def _tokens(self, seqs: list[str | None]) -> torch.Tensor:
        filled = [s if s else _PLACEHOLDER_SEQUENCE for s in seqs]
        return tokenize_sequences(self.alphabet, filled, self.cfg.model.sequence.max_length)

    def _graph(self, bb, drop: torch.Tensor | None = None, bonded: torch.Tensor | None = None):
        """GVP graph of one (coords, atom_mask, residue numbers or None); residues in ``drop`` are
        marked missing.

        Dropping by mask (not by slicing) keeps dihedrals and sequence offsets honest: nothing
        is measured across a dropped residue.
        """
        if bb is None:
            return None
        coords, mask, numbers = bb
        if drop is not None:
            mask = mask & ~drop[:, None]
        s = self.cfg.model.structure
        return backbone_graph(
            coords,
            mask,
            k_neighbors=s.k_neighbors,
            num_rbf=s.num_rbf,
            num_positional=s.num_positional,
            bonded=bonded,
            numbers=numbers,
        )

    @property
    def _edge_dim(self) -> int:
        s = self.cfg.model.structure
        return edge_s_dim(s.num_rbf, s.num_positional)

    def _protclip(self, batch: dict, texts: list[dict | None], rng: np.random.Generator) -> dict:
        """ProtCLIP targets; replaces the batch's main text with the segmented one."""
        pc = self.cfg.loss.protclip
        extra = protclip_inputs(
            batch["seq_tokens"],
            texts,
            self.alphabet,
            self.tokenizer,
            rng,
            text_max_length=self.cfg.model.text.max_length,
            mlm_prob=pc.mlm_prob,
            min_span=pc.bsr_min_span,
            max_span=pc.bsr_max_span,
            span_ratio=pc.bsr_ratio,
            shuffle_segments=pc.shuffle_segments,
        )
        batch["text_ids"], batch["text_attn"] = extra.pop("text_ids"), extra.pop("text_attn")
        if pc.false_negatives != "none":
            extra["text_group"] = group_ids(texts, pc.false_negatives)
        return extra

    def _second_views(self, seqs, backbones, texts, rng: np.random.Generator) -> dict:
        d = self.cfg.data
        views: dict = {}
        if self.views.seq:
            tokens = self._tokens(seqs)
            special = torch.tensor(
                [self.alphabet.cls_idx, self.alphabet.eos_idx, self.alphabet.padding_idx], dtype=torch.long
            )
            maskable = ~torch.isin(tokens, special)
            drop = torch.from_numpy(rng.random(tokens.shape) < d.seq_mask_prob) & maskable
            views["seq_tokens"] = tokens.masked_fill(drop, self.alphabet.mask_idx)
        if self.views.struct:
            graphs = []
            for bb in backbones:
                if bb is None:
                    graphs.append(None)
                    continue
                coords, mask, numbers = bb
                noise = torch.from_numpy(rng.normal(0.0, d.coord_noise, coords.shape).astype(np.float32))
                drop = torch.from_numpy(rng.random(coords.shape[0]) < d.residue_drop_prob)
                # keep at least two nodes (or all there are): count the residues that become nodes
                complete = graph_residues(coords, mask)
                if (complete & ~drop).sum() < min(2, int(complete.sum())):
                    drop[:] = False
                # chain breaks from the clean coordinates: noise must not open or close them
                graphs.append(self._graph((coords + noise, mask, numbers), drop, peptide_bonds(coords, mask)))
            views["graph"] = collate_graphs(graphs, edge_dim=self._edge_dim)
        if self.views.text:
            rewrites = [self._augment(f, rng) for f in texts]
            views["text_ids"], views["text_attn"] = tokenize_texts(
                self.tokenizer, rewrites, self.cfg.model.text.max_length
            )
        return views
