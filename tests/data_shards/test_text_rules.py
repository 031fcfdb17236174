import numpy as np

from data_shards.text_rules import augment_text, canonical_text

FIELDS = {
    "name": "Serine kinase X",
    "function": "Phosphorylates serine residues",
    "location": "Cytoplasm",
    "similarity": "Belongs to the protein kinase family",
    "go": [
        {"id": "GO:0004674", "aspect": "F", "name": "protein serine kinase activity"},
        {"id": "GO:0006468", "aspect": "P", "name": "protein phosphorylation"},
        {"id": "GO:0005737", "aspect": "C", "name": "cytoplasm"},
    ],
    "ec": ["2.7.11.1"],
}


def test_canonical_text_is_deterministic_and_complete():
    t = canonical_text(FIELDS)
    assert t == canonical_text(dict(FIELDS))
    for piece in ("Serine kinase X", "protein phosphorylation", "2.7.11.1", "Cytoplasm"):
        assert piece in t
    assert "Has protein serine kinase activity." in t  # MF names ending in "activity": not doubled
    other = {**FIELDS, "go": [{"id": "GO:0005515", "aspect": "F", "name": "protein binding"}]}
    assert "Has protein binding activity." in canonical_text(other)


def test_augmented_go_phrases_never_double_activity():
    texts = [augment_text(FIELDS, np.random.default_rng(s)) for s in range(200)]
    assert any("Has protein serine kinase activity." in t for t in texts)
    assert not any("activity activity" in t for t in texts)


def test_augment_is_seeded_and_varied():
    a = augment_text(FIELDS, np.random.default_rng(1))
    b = augment_text(FIELDS, np.random.default_rng(1))
    assert a == b
    variants = {augment_text(FIELDS, np.random.default_rng(s)) for s in range(20)}
    assert len(variants) > 5
    for v in variants:
        assert "Serine kinase X" in v  # the name is always kept


def test_empty_fields():
    assert canonical_text(None) == ""
    assert augment_text({}, np.random.default_rng(0)) == ""
    assert augment_text({"name": "X"}, np.random.default_rng(0)).count("X") == 1


# ----------------------------------------------------------------------------- definitions, rewrites

DEFINED = {
    **FIELDS,
    "go": [
        {**FIELDS["go"][0], "definition": "Catalysis of the reaction: ATP + a protein serine = ADP + a phosphoserine."},
        {**FIELDS["go"][1], "definition": "The process of introducing a phosphate group on to a protein."},
        {**FIELDS["go"][2], "definition": "The contents of a cell excluding the plasma membrane and nucleus."},
    ],
}


def test_options_off_or_absent_fields_change_nothing():
    """Records without definitions / rewrites give the same text and RNG state as before."""
    for kwargs in ({}, {"rewrite_prob": 1.0, "definition_prob": 1.0}):
        a, b = np.random.default_rng(5), np.random.default_rng(5)
        assert augment_text(FIELDS, a, **kwargs) == augment_text(FIELDS, b)
        assert a.random() == b.random()  # same number of draws
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert augment_text(DEFINED, a) == augment_text(FIELDS, b)  # definition_prob 0: ignored


def test_definition_paraphrase_uses_the_definition_and_is_seeded():
    texts = [augment_text(DEFINED, np.random.default_rng(s), keep_prob=1.0, definition_prob=1.0) for s in range(30)]
    assert texts == [
        augment_text(DEFINED, np.random.default_rng(s), keep_prob=1.0, definition_prob=1.0) for s in range(30)
    ]
    for text in texts:  # every term is phrased with its definition, mid-sentence lower-case
        assert "the process of introducing a phosphate group on to a protein." in text
        assert "the contents of a cell excluding the plasma membrane and nucleus." in text
        assert "catalysis of the reaction: ATP + a protein serine" in text
    assert any("Involved in protein phosphorylation, i.e. the process of" in t for t in texts)
    assert any("Plays a role in the process of introducing" in t for t in texts)
    assert len(set(texts)) > 10
    half = [augment_text(DEFINED, np.random.default_rng(s), keep_prob=1.0, definition_prob=0.5) for s in range(40)]
    with_def = sum("the process of introducing" in t for t in half)
    assert 5 < with_def < 35  # a coin per term, not all or nothing


def test_definition_already_in_function_is_not_repeated():
    fields = {**DEFINED, "function": "The process of introducing a phosphate group on to a protein."}
    for s in range(10):
        text = augment_text(fields, np.random.default_rng(s), keep_prob=1.0, definition_prob=1.0)
        assert text.lower().count("the process of introducing a phosphate group") == 1


def test_acronyms_keep_their_case():
    fields = {"go": [{"id": "GO:0003677", "aspect": "F", "name": "DNA binding", "definition": "DNA binding, any."}]}
    text = augment_text(fields, np.random.default_rng(0), definition_prob=1.0)
    assert "DNA binding, any." in text and "dNA" not in text


def test_stored_rewrites_are_picked_with_their_probability():
    rewrites = ["A serine kinase of the cytoplasm.", "Cytosolic enzyme phosphorylating serines."]
    fields = {**FIELDS, "rewrites": rewrites}
    always = {augment_text(fields, np.random.default_rng(s), rewrite_prob=1.0) for s in range(20)}
    assert always == set(rewrites)
    mixed = [augment_text(fields, np.random.default_rng(s), rewrite_prob=0.5) for s in range(60)]
    picked = sum(t in rewrites for t in mixed)
    assert 15 < picked < 45
    assert all(t not in rewrites for t in (augment_text(fields, np.random.default_rng(s)) for s in range(20)))
    assert canonical_text(fields) == canonical_text(FIELDS)  # evaluation text never uses rewrites
