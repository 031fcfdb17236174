"""GO term canonicalisation (data_shards/annotations.py): merged by primary id, drops counted once."""

from data_shards.annotations import canonical_terms
from data_shards.readers.obo import load_obo

OBO = """format-version: 1.2

[Term]
id: GO:0003674
name: molecular_function
namespace: molecular_function

[Term]
id: GO:0004672
name: protein kinase activity
namespace: molecular_function
alt_id: GO:0004673
is_a: GO:0003674

[Term]
id: GO:0000001
name: an old term
namespace: molecular_function
is_obsolete: true

[Term]
id: GO:0000002
name: an old kinase term
namespace: molecular_function
is_obsolete: true
replaced_by: GO:0004672
"""


def test_terms_merge_by_primary_id_and_each_drop_is_counted_once_per_record(tmp_path):
    path = tmp_path / "tiny.obo"
    path.write_text(OBO)
    ontology = load_obo(path)
    skipped = []
    # the same protein's terms from a chain table and a GAF: the obsolete and the unknown id twice each
    terms = [
        ("GO:0004673", "F", {"IEA"}, ""),
        ("GO:0000001", "F", set(), ""),
        ("GO:9999999", "F", set(), ""),
        ("GO:0004672", "F", {"EXP"}, ""),
        ("GO:0000001", "F", {"IDA"}, ""),
        ("GO:9999999", "F", {"IDA"}, ""),
        ("GO:0000002", "F", {"TAS"}, ""),  # obsolete, replaced_by the kinase term: merged into it
    ]
    out = canonical_terms(terms, ontology, lambda reason, where: skipped.append((reason, where)), "1ABC_A")
    assert out == [("GO:0004672", "F", {"IEA", "EXP", "TAS"}, "protein kinase activity")]
    assert skipped == [("obsolete GO id", "1ABC_A:GO:0000001"), ("unknown GO id", "1ABC_A:GO:9999999")]
