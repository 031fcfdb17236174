"""Zero-shot function prediction (ProtST style): proteins scored against one text prompt per label.

Every GO term / EC class of the label space becomes a prompt ("A protein with ATP binding
activity.", "A protein involved in DNA repair.", ...), embedded with the text encoder; a
protein's score for a label is the cosine similarity of its (sequence or structure) embedding
with the prompt's. Fmax needs scores in [0, 1] on a common scale, so each protein's scores are
min-max scaled over the label space (its best label gets 1.0), then made consistent with the
hierarchy by the caller.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

GO_PROMPTS = {
    "F": "A protein with {name} activity.",
    "P": "A protein involved in {name}.",
    "C": "A protein located in the {name}.",
}
EC_PROMPT = "A protein with {name} activity. Enzyme class EC {ec}."
EC_PROMPT_NO_NAME = "A protein of enzyme class EC {ec}."


def go_prompt(name: str, aspect: str) -> str:
    """The prompt of a GO term; MF names that already end in "activity" are not doubled."""
    name = name.strip()
    if aspect == "F" and name.endswith("activity"):
        return f"A protein with {name}."
    return GO_PROMPTS[aspect].format(name=name)


def ec_dashed(label: str) -> str:
    """ "2.7." -> "2.7.-.-"; "2.7.11.1" unchanged."""
    parts = [p for p in label.split(".") if p]
    return ".".join(parts + ["-"] * (4 - len(parts)))


def ec_prompt(label: str, name: str = "") -> str:
    name = name.strip().rstrip(".")
    ec = ec_dashed(label)
    return EC_PROMPT.format(name=name, ec=ec) if name else EC_PROMPT_NO_NAME.format(ec=ec)


def load_ec_names(path: str | Path) -> dict[str, str]:
    """EC label -> name from a ProtST-style ``ec_descriptions.tsv`` (columns EC_number, hier1..3, name).

    Prefix labels ("2.", "2.7.", "2.7.11.") take their names from the hier1..3 columns.
    """
    names: dict[str, str] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            ec = (row.get("EC_number") or "").strip()
            parts = ec.split(".")
            if len(parts) != 4:
                continue
            if row.get("name"):
                names.setdefault(ec, row["name"].strip())
            for level, col in enumerate(("hier1", "hier2", "hier3"), 1):
                if row.get(col) and "-" not in parts[:level]:
                    names.setdefault(".".join(parts[:level]) + ".", row[col].strip())
    return names


def zero_shot_scores(proteins: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Per-protein min-max scaled cosine similarities.

    Shapes:
        proteins (N, E), prompts (L, E), both unit norm -> (N, L) float32 in [0, 1]
    """
    sims = np.asarray(proteins, dtype=np.float32) @ np.asarray(prompts, dtype=np.float32).T
    lo = sims.min(1, keepdims=True)
    span = sims.max(1, keepdims=True) - lo
    return np.where(span > 0, (sims - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)
