"""Function text: a canonical description, and augmented rewrites of terse annotations.

Annotations arrive as fields (protein name, free-text function, location, similarity,
GO terms with aspects, EC numbers). Align-Pro's augmentation turns terse GO lists into
varied natural-language descriptions: each rewrite picks a phrasing per GO aspect, a
subset and an order of the fields, so two views of one protein say the same thing in
different words. All randomness comes from the ``numpy.random.Generator`` passed in, so
a batch's texts are a pure function of (seed, epoch, batch index): resumes replay them.
"""

from __future__ import annotations

import numpy as np

_GO_PHRASES = {
    "F": ("Has {} activity.", "Enables {}.", "Molecular function: {}.", "Capable of {}."),
    "P": ("Involved in {}.", "Participates in {}.", "Biological process: {}.", "Plays a role in {}."),
    "C": ("Located in the {}.", "Found in the {}.", "Cellular component: {}.", "Localizes to the {}."),
}
_EC_PHRASES = ("Enzyme class EC {}.", "Catalytic activity classified as EC {}.", "EC number {}.")
_NAME_PHRASES = ("{}.", "Protein: {}.", "This protein is {}.", "Name: {}.")


def _sentence(text: str) -> str:
    text = (text or "").strip()
    if not text:
        return ""
    return text if text.endswith(".") else text + "."


def _go_name(term: dict) -> str:
    return (term.get("name") or term.get("id") or "").strip()


def canonical_text(fields: dict | None) -> str:
    """The deterministic description used for evaluation and when augmentation is off."""
    if not fields:
        return ""
    parts = [_sentence(fields.get("name", ""))]
    parts.append(_sentence(fields.get("function", "")))
    for aspect in ("F", "P", "C"):
        for term in fields.get("go") or []:
            if term.get("aspect") == aspect and _go_name(term):
                parts.append(_GO_PHRASES[aspect][0].format(_go_name(term)))
    if fields.get("location"):
        parts.append(_sentence("Subcellular location: " + fields["location"]))
    for ec in fields.get("ec") or []:
        parts.append(_EC_PHRASES[0].format(ec))
    parts.append(_sentence(fields.get("similarity", "")))
    return " ".join(p for p in parts if p)


def augment_text(fields: dict | None, rng: np.random.Generator, keep_prob: float = 0.8) -> str:
    """A random rewrite of the annotation fields.

    Each non-name field is kept with probability ``keep_prob`` (at least one is kept when any
    exists), GO terms get a randomly chosen phrasing for their aspect, and the kept sentences
    are shuffled after the name.
    """
    if not fields:
        return ""
    sentences: list[str] = []
    if fields.get("function"):
        sentences.append(_sentence(fields["function"]))
    for term in fields.get("go") or []:
        phrases = _GO_PHRASES.get(term.get("aspect", ""), _GO_PHRASES["F"])
        if _go_name(term):
            sentences.append(phrases[int(rng.integers(len(phrases)))].format(_go_name(term)))
    if fields.get("location"):
        sentences.append(_sentence("Subcellular location: " + fields["location"]))
    for ec in fields.get("ec") or []:
        sentences.append(_EC_PHRASES[int(rng.integers(len(_EC_PHRASES)))].format(ec))
    if fields.get("similarity"):
        sentences.append(_sentence(fields["similarity"]))
    if sentences:
        keep = rng.random(len(sentences)) < keep_prob
        if not keep.any():
            keep[int(rng.integers(len(sentences)))] = True
        sentences = [s for s, k in zip(sentences, keep) if k]
        sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    name = (fields.get("name") or "").strip()
    head = _NAME_PHRASES[int(rng.integers(len(_NAME_PHRASES)))].format(name) if name else ""
    return " ".join(s for s in [head, *sentences] if s)
