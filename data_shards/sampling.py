"""ProtCLIP property-driven sampling: how likely a sample is to be kept in an epoch.

ProtCLIP (Zhou et al., AAAI 2025, arXiv 2412.20014) builds ProtAnno-D by sampling noisy,
unreviewed UniProt entries with a probability that grows with the entry's *property coverage* and
falls with its *protein existence* level. Our reading, checked against the authors' released
script (``src/sampling.py`` in github.com/diaoshaoyou/ProtCLIP):

* ``e`` is UniProt's protein existence level: 1 evidence at protein level, 2 at transcript level,
  3 inferred from homology, 4 predicted, 5 uncertain.
* ``o`` counts the four text properties an entry has: the protein **name** (every UniProt entry
  has one, so the script starts the count at 1), **function** (``Function [CC]``), subcellular
  **location** (``Subcellular location [CC]``) and **similarity** / family
  (``Sequence similarities``); ``o`` is 1..4 for UniProt entries. We count a property only when
  the source gave free text for it (text we derive from GO terms does not count), and allow 0 for
  a sample without even a name.
* drop rules: entries with ``o < 3`` (fewer than three properties) or ``e > 3`` (predicted or
  uncertain) are never taken;
* otherwise ``p = sqrt(o / 4) / e**3``: 1.0 for a fully annotated protein-level entry, 0.866 with
  three properties, 0.125 / 0.108 at transcript level, 1/27 / 0.032 when inferred from homology.
* the curated Swiss-Prot part (ProtAnno-S, ProtST's training set) is taken whole: ``reviewed=True``
  gives 1.0.

Samples with no existence level (PDB chains without a UniProt entry, FASTA without ``PE=``) were
never subject to this filter in ProtCLIP; they are kept (1.0) rather than guessed at.
"""

from __future__ import annotations

import math

NUM_PROPERTIES = 4  # name, function, location, similarity
MIN_COVERAGE = 3  # o < 3 is dropped
MAX_EXISTENCE = 3  # e > 3 (predicted, uncertain) is dropped


def property_coverage(*, name: str = "", function: str = "", location: str = "", similarity: str = "") -> int:
    """ProtCLIP's ``o``: how many of name, function, location, similarity are non-empty (0..4)."""
    return sum(bool(value and value.strip()) for value in (name, function, location, similarity))


def keep_probability(existence_level: int | None, coverage: int, *, reviewed: bool = False) -> float:
    """Probability of keeping a sample under ProtCLIP's property-driven sampling.

    Args:
        existence_level: UniProt protein existence 1..5, or None when unknown.
        coverage: property coverage ``o`` in 0..4 (see :func:`property_coverage`).
        reviewed: Swiss-Prot entries are kept whole (ProtAnno-S).

    Returns:
        ``sqrt(o / 4) / e**3``, 0.0 when ``o < 3`` or ``e > 3``, 1.0 when reviewed or e is unknown.

    Raises:
        ValueError: existence_level outside 1..5 or coverage outside 0..4.
    """
    if isinstance(coverage, bool) or not isinstance(coverage, int) or not 0 <= coverage <= NUM_PROPERTIES:
        raise ValueError(f"coverage must be an int in 0..{NUM_PROPERTIES}, got {coverage!r}")
    if existence_level is not None and (
        isinstance(existence_level, bool) or not isinstance(existence_level, int) or not 1 <= existence_level <= 5
    ):
        raise ValueError(f"existence_level must be 1..5 or None, got {existence_level!r}")
    if reviewed or existence_level is None:
        return 1.0
    if coverage < MIN_COVERAGE or existence_level > MAX_EXISTENCE:
        return 0.0
    return math.sqrt(coverage / NUM_PROPERTIES) / existence_level**3
