import numpy as np

from pretrain.data.text_augment import augment_text, canonical_text

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
