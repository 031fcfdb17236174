"""Function text rules shared by the shard tools and training: a canonical description, and augmented
rewrites of terse annotations.

Annotations arrive as fields (protein name, free-text function, location, similarity,
GO terms with aspects, EC numbers). Align-Pro's augmentation turns terse GO lists into
varied natural-language descriptions: each rewrite picks a phrasing per GO aspect, a
subset and an order of the fields, so two views of one protein say the same thing in
different words. All randomness comes from the ``numpy.random.Generator`` passed in, so
a batch's texts are a pure function of (seed, epoch, batch index): resumes replay them.

Two optional sources of variety, each off at probability 0 and each drawing from the generator
only when the record carries what it needs (so records without them give exactly the texts, and
consume exactly the random numbers, that they always did):

* ``definition_prob``: a GO term whose entry carries its OBO ``definition`` (shards built with
  ``--go-obo``) is phrased with the definition ("Involved in X, i.e. <definition>") instead of the
  name alone, unless the definition already appears in the function text.
* ``rewrite_prob``: a record whose text carries ``rewrites`` (descriptions written offline by a
  language model, ``python -m data_shards rewrite``) returns one of them, picked uniformly.
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
_GO_DEFINITION_PHRASES = {
    "F": (
        "Has {name}, i.e. {definition}.",
        "Enables {name}: {definition}.",
        "Capable of {definition}.",
        "Molecular function: {name}, defined as {definition}.",
    ),
    "P": (
        "Involved in {name}, i.e. {definition}.",
        "Participates in {name}, that is, {definition}.",
        "Plays a role in {definition}.",
        "Biological process: {name}, defined as {definition}.",
    ),
    "C": (
        "Located in the {name}, i.e. {definition}.",
        "Found in the {name}, which is {definition}.",
        "Cellular component: {name}, defined as {definition}.",
    ),
}


def _sentence(text: str) -> str:
    text = (text or "").strip()
    if not text:
        return ""
    return text if text.endswith(".") else text + "."


def _go_name(term: dict) -> str:
    return (term.get("name") or term.get("id") or "").strip()


def _go_phrase(phrase: str, name: str) -> str:
    """``phrase`` filled with a GO term name, without doubling the "activity" that most molecular
    function names already end with ("Has protein kinase activity.", not "... activity activity.")."""
    if phrase.endswith(" activity.") and name.endswith("activity"):
        phrase = phrase[: -len(" activity.")] + "."
    return phrase.format(name)


def _definition_clause(definition: str) -> str:
    """A GO definition made fit for the middle of a sentence: no final period, lower-case start.

    The first letter stays upper-case when the first word looks like a symbol or an acronym
    ("ATP", "mRNA", "DNA-binding"): any other capital or digit in that word keeps it as it is.
    """
    clause = " ".join(definition.split()).rstrip(" .")
    if not clause:
        return ""
    first = clause.split(" ", 1)[0]
    if any(c.isupper() or c.isdigit() for c in first[1:]):
        return clause
    return clause[0].lower() + clause[1:]


def _go_sentence(term: dict, rng: np.random.Generator, function: str, definition_prob: float) -> str:
    """One sentence for a named GO term; a definition paraphrase with ``definition_prob``."""
    aspect = term.get("aspect", "")
    definition = (term.get("definition") or "").strip()
    if definition_prob > 0 and definition and definition.rstrip(" .") not in function:
        if rng.random() < definition_prob:
            phrases = _GO_DEFINITION_PHRASES.get(aspect, _GO_DEFINITION_PHRASES["F"])
            phrase = phrases[int(rng.integers(len(phrases)))]
            return phrase.format(name=_go_name(term), definition=_definition_clause(definition))
    phrases = _GO_PHRASES.get(aspect, _GO_PHRASES["F"])
    return _go_phrase(phrases[int(rng.integers(len(phrases)))], _go_name(term))


def stored_rewrites(fields: dict | None) -> list[str]:
    """The offline rewrites a record's text carries (``text["rewrites"]``), non-empty ones only."""
    if not fields:
        return []
    return [r for r in fields.get("rewrites") or [] if isinstance(r, str) and r.strip()]


def canonical_text(fields: dict | None) -> str:
    """The deterministic description used for evaluation and when augmentation is off."""
    if not fields:
        return ""
    parts = [_sentence(fields.get("name", ""))]
    parts.append(_sentence(fields.get("function", "")))
    for aspect in ("F", "P", "C"):
        for term in fields.get("go") or []:
            if term.get("aspect") == aspect and _go_name(term):
                parts.append(_go_phrase(_GO_PHRASES[aspect][0], _go_name(term)))
    if fields.get("location"):
        parts.append(_sentence("Subcellular location: " + fields["location"]))
    for ec in fields.get("ec") or []:
        parts.append(_EC_PHRASES[0].format(ec))
    parts.append(_sentence(fields.get("similarity", "")))
    return " ".join(p for p in parts if p)


def augment_text(
    fields: dict | None,
    rng: np.random.Generator,
    keep_prob: float = 0.8,
    *,
    rewrite_prob: float = 0.0,
    definition_prob: float = 0.0,
) -> str:
    """A random rewrite of the annotation fields.

    Each non-name field is kept with probability ``keep_prob`` (at least one is kept when any
    exists), GO terms get a randomly chosen phrasing for their aspect, and the kept sentences
    are shuffled after the name.

    Args:
        fields: the record's text dict (schema of ``data_shards.schema``), or None.
        rng: the only source of randomness.
        keep_prob: probability of keeping each non-name sentence.
        rewrite_prob: probability of returning one of the stored ``rewrites`` instead (only
            drawn when the record has any).
        definition_prob: per GO term with a stored ``definition``, probability of phrasing it
            with the definition (only drawn for such terms).
    """
    if not fields:
        return ""
    rewrites = stored_rewrites(fields) if rewrite_prob > 0 else []
    if rewrites and rng.random() < rewrite_prob:
        return rewrites[int(rng.integers(len(rewrites)))].strip()
    function = fields.get("function") or ""
    sentences: list[str] = []
    if function:
        sentences.append(_sentence(function))
    for term in fields.get("go") or []:
        if _go_name(term):
            sentences.append(_go_sentence(term, rng, function, definition_prob))
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
