"""Zero-shot mutation effect from ESM-2's masked marginals (ProtCLIP's task type, ProteinGym format).

**Input.** A ProteinGym DMS substitution file (CSV) with a ``mutant`` column (``A23G``, or several
substitutions joined by ``:``, ``A23G:K40R``; positions 1-based on the wild-type sequence unless
``first_position`` says otherwise) and a ``DMS_score`` column (higher = fitter); a
``mutated_sequence`` column, when present, is checked against the substitutions. Every
substitution's wild-type letter must be the wild-type sequence's residue at that position: a
mismatch is an error naming the file, the row and both letters (a wrong offset or sequence shows
up at once instead of as a low correlation).

**Score.** The masked-marginal score of Meier et al. (2021): for each mutated position i, mask i
in the wild-type sequence, run ESM-2 with its language-model head, and take
``log p(mut_i) - log p(wt_i)`` from the log-softmax at i; a variant's score is the sum over its
positions (one forward pass per distinct position, shared by every variant). A sequence longer
than the encoder's ``max_length`` is scored in a window of ``max_length`` residues centred on the
position (clipped to the sequence). The metric is Spearman between score and ``DMS_score`` with a
95 % bootstrap interval over variants.

    from pretrain.api import load_model
    result = mutation_benchmark(load_model("runs/demo"), wild_type, "BLAT_ECOLX_Stiffler_2015.csv")
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.benchmark.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, Interval, bootstrap
from pretrain.benchmark.context import BenchmarkContext, metric_row
from pretrain.benchmark.data import BenchmarkDataError, Proteins
from pretrain.benchmark.stats import spearman
from pretrain.benchmark.suite import Suite, check_file
from pretrain.errors import ConfigError
from pretrain.models.sequence_encoder import SequenceEncoder

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
_SUBSTITUTION = re.compile(r"^([A-Z])(-?\d+)([A-Z])$")


@dataclass(frozen=True)
class Substitution:
    """One substitution: wild-type letter, 1-based position on the wild-type sequence, new letter."""

    wt: str
    position: int
    mt: str


def parse_mutant(text: str, wild_type: str, first_position: int = 1, where: str = "") -> list[Substitution]:
    """``"A23G:K40R"`` -> substitutions, checked against ``wild_type``.

    Args:
        text: the ``mutant`` cell.
        wild_type: the wild-type sequence (one-letter, upper case).
        first_position: the number the file gives the wild type's first residue.
        where: prefix of error messages (file and row).

    Raises:
        ValueError: malformed text, a letter outside the 20 amino acids, a position outside the
            sequence or given twice, or a wild-type letter that is not the sequence's residue.
    """
    subs = []
    seen = set()
    for part in text.strip().split(":"):
        m = _SUBSTITUTION.match(part.strip())
        if m is None:
            raise ValueError(f"{where}mutant {text!r}: {part!r} is not a substitution like A23G")
        wt, pos_text, mt = m.groups()
        for letter in (wt, mt):
            if letter not in AMINO_ACIDS:
                raise ValueError(f"{where}mutant {text!r}: {letter!r} is not one of the 20 amino acids")
        position = int(pos_text) - first_position + 1
        if not 1 <= position <= len(wild_type):
            raise ValueError(
                f"{where}mutant {text!r}: position {pos_text} is outside the wild-type sequence "
                f"(numbered {first_position}..{first_position + len(wild_type) - 1})"
            )
        if wild_type[position - 1] != wt:
            raise ValueError(
                f"{where}mutant {text!r}: says position {pos_text} is {wt} but the wild-type sequence has "
                f"{wild_type[position - 1]} there (wrong sequence or numbering offset?)"
            )
        if position in seen:
            raise ValueError(f"{where}mutant {text!r}: position {pos_text} is mutated twice")
        seen.add(position)
        subs.append(Substitution(wt, position, mt))
    return subs


def apply(wild_type: str, subs: list[Substitution]) -> str:
    """The mutated sequence."""
    seq = list(wild_type)
    for s in subs:
        seq[s.position - 1] = s.mt
    return "".join(seq)


def read_dms_csv(
    path: str | Path, wild_type: str, first_position: int = 1
) -> tuple[list[str], list[list[Substitution]], np.ndarray]:
    """Read a ProteinGym-format CSV: (mutant texts, their substitutions, (N,) DMS scores).

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing ``mutant`` / ``DMS_score`` columns, a non-numeric score, a bad mutant
            (:func:`parse_mutant`), a ``mutated_sequence`` that disagrees, or no rows; the message
            names the file and the row (1-based, header = row 1).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DMS file")
    wild_type = _clean_sequence(wild_type)
    texts, variants, scores = [], [], []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("mutant", "DMS_score") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} (a ProteinGym file has mutant and DMS_score)")
        for row_no, row in enumerate(reader, 2):
            where = f"{path} row {row_no}: "
            try:
                score = float(row["DMS_score"])
            except (TypeError, ValueError):
                raise ValueError(f"{where}DMS_score {row['DMS_score']!r} is not a number") from None
            if not math.isfinite(score):
                raise ValueError(f"{where}DMS_score {row['DMS_score']!r} is not finite")
            subs = parse_mutant(row["mutant"] or "", wild_type, first_position, where)
            given = (row.get("mutated_sequence") or "").strip().upper()
            if given and given != apply(wild_type, subs):
                raise ValueError(f"{where}mutated_sequence differs from the wild type with {row['mutant']} applied")
            texts.append(row["mutant"].strip())
            variants.append(subs)
            scores.append(score)
    if not variants:
        raise ValueError(f"{path}: no variant rows")
    return texts, variants, np.asarray(scores, np.float64)


def _clean_sequence(seq: str) -> str:
    seq = "".join(seq.split()).upper()
    bad = sorted(set(seq) - set(AMINO_ACIDS))
    if not seq or bad:
        raise ValueError(f"wild-type sequence is empty or has letters outside the 20 amino acids: {bad}")
    return seq


def sequence_encoder_of(model) -> SequenceEncoder:
    """The :class:`SequenceEncoder` of an encoder, a ``TriModalModel`` or a ``pretrain.api.EmbeddingModel``."""
    for candidate in (
        model,
        getattr(model, "sequence_encoder", None),
        getattr(getattr(model, "model", None), "sequence_encoder", None),
    ):
        if isinstance(candidate, SequenceEncoder):
            return candidate
    raise TypeError(f"no ESM-2 sequence encoder in {type(model).__name__}")


def _window(length: int, position: int, width: int) -> int:
    """0-based start of the ``width``-residue window scoring ``position`` (1-based)."""
    if length <= width:
        return 0
    return min(max(position - 1 - width // 2, 0), length - width)


@torch.inference_mode()
def masked_log_probs(model, wild_type: str, positions: list[int], batch_size: int = 8) -> dict[int, np.ndarray]:
    """Log-softmax of ESM-2's LM head at each position with that position masked.

    Args:
        model: see :func:`sequence_encoder_of`.
        wild_type: the sequence.
        positions: 1-based positions.
        batch_size: masked copies per forward pass.

    Returns:
        position -> (V,) float64 log-probabilities over the ESM alphabet.
    """
    encoder = sequence_encoder_of(model)
    wild_type = _clean_sequence(wild_type)
    alphabet, width = encoder.alphabet, encoder.cfg.max_length
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out: dict[int, np.ndarray] = {}
    todo = sorted(set(positions))
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            rows, slots = [], []
            for pos in chunk:
                begin = _window(len(wild_type), pos, width)
                window = wild_type[begin : begin + width]
                ids = [alphabet.cls_idx, *(alphabet.get_idx(a) for a in window), alphabet.eos_idx]
                slot = pos - begin  # token index: BOS at 0
                ids[slot] = alphabet.mask_idx
                rows.append(ids)
                slots.append(slot)
            tokens = torch.full((len(rows), max(map(len, rows))), alphabet.padding_idx, dtype=torch.long)
            for r, ids in enumerate(rows):
                tokens[r, : len(ids)] = torch.tensor(ids)
            logits = encoder.mlm_forward(tokens.to(device))[1]  # (B, L, V)
            picked = logits[torch.arange(len(rows)), torch.tensor(slots)]  # (B, V)
            logp = torch.log_softmax(picked.double(), dim=-1).cpu().numpy()
            for pos, lp in zip(chunk, logp):
                out[pos] = lp
    finally:
        encoder.train(was_training)
    return out


def masked_marginal_scores(
    model, wild_type: str, variants: list[list[Substitution]], batch_size: int = 8
) -> np.ndarray:
    """(N,) sum over each variant's positions of log p(mut) - log p(wt), the position masked."""
    encoder = sequence_encoder_of(model)
    logp = masked_log_probs(encoder, wild_type, [s.position for v in variants for s in v], batch_size)
    idx = encoder.alphabet.get_idx
    return np.array([sum(logp[s.position][idx(s.mt)] - logp[s.position][idx(s.wt)] for s in v) for v in variants])


def mutation_benchmark(
    model,
    wild_type: str,
    dms_csv: str | Path,
    *,
    first_position: int = 1,
    batch_size: int = 8,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict:
    """Spearman of masked-marginal scores with ``DMS_score`` on one ProteinGym-format file.

    Args:
        model: an ESM-2 :class:`SequenceEncoder`, a ``TriModalModel`` or a loaded export
            (:func:`pretrain.api.load_model`); its LM head scores the substitutions.
        wild_type: the assay's target sequence.
        dms_csv: the CSV (:func:`read_dms_csv`).
        first_position: number of the wild type's first residue in ``mutant``.
        batch_size: masked sequences per forward pass.
        resamples, level, seed: the bootstrap over variants.

    Returns:
        ``{"spearman": Interval dict, "n_variants", "n_multi_mutants", "n_positions",
        "scoring": "masked marginals"}``.
    """
    wild_type = _clean_sequence(wild_type)
    _, variants, dms = read_dms_csv(dms_csv, wild_type, first_position)
    if len(variants) < 3:
        raise ValueError(f"{dms_csv}: {len(variants)} variant(s); Spearman needs at least 3")
    scores = masked_marginal_scores(model, wild_type, variants, batch_size)
    interval = bootstrap(
        lambda i: spearman(scores[i], dms[i]), len(variants), resamples=resamples, level=level, seed=seed
    )
    return {
        "spearman": interval.to_dict(),
        "n_variants": len(variants),
        "n_multi_mutants": sum(len(v) > 1 for v in variants),
        "n_positions": len({s.position for v in variants for s in v}),
        "scoring": "masked marginals",
    }


# --- the suite task (``type: mutation`` in pretrain.benchmark.registry) ---------------------------------


@dataclass
class MutationTaskConfig:
    """Suite keys of a ``mutation`` task: one ProteinGym-format CSV and its wild type.

    The wild type is given as a sequence (``wild_type``) or as the id of a proteins-table row
    (``wild_type_id``). The trained row scores with the export's ESM-2 (its LM head as aligned), the
    base row with the ESM-2 as loaded before alignment. No embedding is needed.
    """

    dms: str = ""  # the CSV (mutant, DMS_score[, mutated_sequence])
    wild_type: str | None = None
    wild_type_id: str | None = None
    first_position: int = 1  # number of the wild type's first residue in the mutant column
    batch_size: int = 8  # masked copies per forward pass

    def validate(self, where: str) -> None:
        if not self.dms:
            raise ConfigError(f"{where}.dms: the ProteinGym-format CSV is required")
        if (self.wild_type is None) == (self.wild_type_id is None):
            raise ConfigError(f"{where}: give exactly one of wild_type (a sequence) and wild_type_id (a protein id)")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size must be >= 1, got {self.batch_size}")


def _wild_type(suite: Suite, cfg: MutationTaskConfig, proteins: Proteins, name: str) -> str:
    if cfg.wild_type_id is None:
        try:
            return _clean_sequence(cfg.wild_type or "")
        except ValueError as e:
            raise ConfigError(f"{suite.path}: {name}.wild_type: {e}") from None
    index = proteins.index()
    if cfg.wild_type_id not in index:
        raise ConfigError(f"{suite.path}: {name}.wild_type_id: {cfg.wild_type_id!r} is not in {proteins.source}")
    return proteins.sequences[index[cfg.wild_type_id]]


def needs(suite: Suite, cfg: MutationTaskConfig, proteins: Proteins, name: str = "mutation") -> set[str]:
    """Nothing to embed (the LM head scores the variants); checks the CSV and the wild type."""
    check_file(suite, cfg.dms, f"{name}.dms")
    _wild_type(suite, cfg, proteins, name)
    return set()


def run(ctx: BenchmarkContext, name: str, cfg: MutationTaskConfig) -> dict:
    """Spearman of masked-marginal scores with DMS_score (``ctx.sequence_model``'s ESM-2)."""
    path = check_file(ctx.suite, cfg.dms, f"{name}.dms")
    wild_type = _wild_type(ctx.suite, cfg, ctx.embeddings.proteins, name)
    if ctx.sequence_model is None:
        return {"rows": [], "info": {"skipped": "no sequence model in the benchmark context"}}
    try:
        res = mutation_benchmark(
            ctx.sequence_model,
            wild_type,
            path,
            first_position=cfg.first_position,
            batch_size=cfg.batch_size,
            **ctx.bootstrap_kwargs,
        )
    except ValueError as e:
        raise BenchmarkDataError(f"{ctx.suite.path}: {name}: {e}") from None
    row = metric_row("masked_marginals/esm2", "all", "spearman", Interval(**res.pop("spearman")), res["n_variants"])
    return {"rows": [row], "info": {"dms": str(path), "wild_type_length": len(wild_type), **res}}
