"""GO OBO reader (data_shards/readers/obo.py): fixed public API, alt ids, obsolete terms, ancestors."""

import gzip
from pathlib import Path

import pytest

from data_shards.readers.obo import GoTerm, Ontology, load_obo

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
GO_OBO = SHARED / "annotations" / "go-basic_2021-12-15.obo.gz"

TINY = """format-version: 1.2
ontology: go

[Term]
id: GO:0000001
name: root function
namespace: molecular_function
def: "The \\"root\\" of it all." [GOC:x]

[Term]
id: GO:0000002
name: child
namespace: molecular_function
alt_id: GO:0000099
is_a: GO:0000001 ! root function

[Term]
id: GO:0000003
name: part of child
namespace: biological_process
relationship: part_of GO:0000002 ! child
relationship: regulates GO:0000005 ! other

[Term]
id: GO:0000004
name: obsolete thing
namespace: cellular_component
is_obsolete: true

[Term]
id: GO:0000005
name: other
namespace: biological_process

[Typedef]
id: part_of
name: part of
"""


@pytest.fixture
def tiny(tmp_path) -> Ontology:
    path = tmp_path / "tiny.obo.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(TINY)
    return load_obo(path)


def test_tiny_ontology_api(tiny):
    assert set(tiny.terms) == {"GO:0000001", "GO:0000002", "GO:0000003", "GO:0000004", "GO:0000005"}
    term = tiny.terms["GO:0000002"]
    assert isinstance(term, GoTerm) and term.alt_ids == ("GO:0000099",) and term.parents == frozenset({"GO:0000001"})
    assert tiny.terms["GO:0000001"].definition == 'The "root" of it all.'
    assert tiny.canonical("GO:0000099") == "GO:0000002"  # alt id
    assert tiny.canonical("GO:0000004") is None  # obsolete
    assert tiny.canonical("GO:1234567") is None  # unknown
    assert [tiny.reading(t) for t in ("GO:0000002", "GO:0000099")] == ["current", "alt_id"]
    # part_of is followed, regulates is not; self is excluded
    assert tiny.ancestors("GO:0000003") == frozenset({"GO:0000002", "GO:0000001"})
    assert tiny.ancestors("GO:0000001") == frozenset()
    assert tiny.propagate(["GO:0000099", "GO:0000004", "GO:7777777"]) == {"GO:0000002", "GO:0000001"}
    assert [tiny.aspect(t) for t in ("GO:0000001", "GO:0000003", "GO:0000004", "GO:0000008")] == ["F", "P", "C", None]
    assert tiny.name("GO:0000099") == "child" and tiny.name("GO:0000008") == ""


def test_bad_obo_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.obo"):
        load_obo(tmp_path / "missing.obo")
    not_obo = tmp_path / "notes.obo"
    not_obo.write_text("just some text\nwithout terms\n")
    with pytest.raises(ValueError, match="notes.obo"):
        load_obo(not_obo)
    truncated = tmp_path / "cut.obo.gz"
    truncated.write_bytes(gzip.compress(TINY.encode())[:60])
    with pytest.raises(ValueError, match="cut.obo.gz"):
        load_obo(truncated)


@pytest.mark.skipif(not GO_OBO.exists(), reason="shared data not present")
def test_real_go_basic():
    onto = load_obo(GO_OBO)
    assert len(onto.terms) > 40000
    assert onto.canonical("GO:0019952") == "GO:0000003"  # alt id of reproduction
    assert onto.canonical("GO:0000005") is None  # obsolete ribosomal chaperone activity
    kinase = onto.ancestors("GO:0004672")  # protein kinase activity
    assert {"GO:0016301", "GO:0003824", "GO:0003674"} <= kinase and "GO:0004672" not in kinase
    # mitochondrion: part_of cytoplasm
    assert "GO:0005737" in onto.ancestors("GO:0005739")
    assert onto.aspect("GO:0005739") == "C" and onto.name("GO:0005739") == "mitochondrion"
    # the cached result is stable and matches a plain breadth-first search
    for go_id in ("GO:0006915", "GO:0005739", "GO:0004672"):
        seen, todo = set(), list(onto.terms[go_id].parents)
        while todo:
            parent = todo.pop()
            if parent not in seen:
                seen.add(parent)
                todo.extend(onto.terms[parent].parents)
        assert onto.ancestors(go_id) == seen


REPLACED = """format-version: 1.2

[Term]
id: GO:0000010
name: current
namespace: molecular_function

[Term]
id: GO:0000011
name: merged into current
namespace: molecular_function
is_obsolete: true
replaced_by: GO:0000012

[Term]
id: GO:0000012
name: merged again
namespace: molecular_function
is_obsolete: true
replaced_by: GO:0000010 ! current

[Term]
id: GO:0000013
name: split in two
namespace: molecular_function
is_obsolete: true
replaced_by: GO:0000010
replaced_by: GO:0000014

[Term]
id: GO:0000014
name: loop a
namespace: molecular_function
is_obsolete: true
replaced_by: GO:0000015

[Term]
id: GO:0000015
name: loop b
namespace: molecular_function
is_obsolete: true
replaced_by: GO:0000014

[Term]
id: GO:0000016
name: consider only
namespace: molecular_function
is_obsolete: true
consider: GO:0000010
"""


def test_current_follows_a_single_replaced_by_and_canonical_stays_strict(tmp_path):
    path = tmp_path / "replaced.obo"
    path.write_text(REPLACED)
    onto = load_obo(path)
    assert onto.terms["GO:0000011"].replaced_by == ("GO:0000012",)
    assert onto.current("GO:0000011") == "GO:0000010"  # two hops: 11 -> 12 -> 10
    assert onto.current("GO:0000010") == "GO:0000010" and onto.current(" GO:0000012 ") == "GO:0000010"
    assert onto.current("GO:0000013") is None  # two replacements: ambiguous
    assert onto.current("GO:0000014") is None  # a replacement cycle ends, unresolved
    assert onto.current("GO:0000016") is None and onto.current("GO:7654321") is None
    assert [onto.canonical(t) for t in ("GO:0000011", "GO:0000012", "GO:0000010")] == [None, None, "GO:0000010"]
    assert onto.propagate(["GO:0000011"]) == set()  # propagation keeps the strict reading
    readings = {t: onto.reading(t) for t in ("GO:0000010", " GO:0000011", "GO:0000013", "GO:0000014", "GO:7654321")}
    assert readings == {
        "GO:0000010": "current",
        " GO:0000011": "replaced",  # stripped, as current() strips
        "GO:0000013": "obsolete",  # two replacements
        "GO:0000014": "obsolete",  # a cycle
        "GO:7654321": "unknown",
    }


@pytest.mark.skipif(not GO_OBO.exists(), reason="shared data not present")
def test_real_go_basic_replaced_by():
    onto = load_obo(GO_OBO)
    replaced = [t for t in onto.terms.values() if t.is_obsolete and t.replaced_by]
    assert len(replaced) == 525  # replaced_by lines of go-basic 2021-12-15 (grep -c)
    assert onto.current("GO:1902188") == "GO:0019076"  # obsolete positive regulation of viral release from host cell
    assert onto.current("GO:0055114") is None  # oxidation-reduction process: obsolete, consider-only
