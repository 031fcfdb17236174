"""UniProt flat-file and XML reader (data_shards/readers/uniprot.py)."""

import gzip
from pathlib import Path

import pytest

from data_shards.readers.uniprot import UniProtFormatError, clean_text, existence_level, iter_uniprot

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
ENTRIES = SHARED / "uniprot" / "swissprot_entries"
needs_data = pytest.mark.skipif(not ENTRIES.exists(), reason="shared data not present")


@needs_data
def test_flat_file_fields():
    (entry,) = iter_uniprot(ENTRIES / "P04439.txt")
    assert entry.accession == "P04439" and "B1PKZ3" in entry.accessions and entry.entry_name == "HLAA_HUMAN"
    assert entry.name == "HLA class I histocompatibility antigen, A alpha chain"
    assert entry.existence == 1 and entry.reviewed is True
    assert entry.organism == "Homo sapiens" and entry.taxon == "9606"
    assert len(entry.sequence) == 365 and entry.sequence.startswith("MAVMAPRTLL")
    assert entry.function.startswith("Antigen-presenting major histocompatibility complex class I (MHCI) molecule.")
    assert "ECO:" not in entry.function and "PubMed" not in entry.function
    assert entry.location.startswith("Cell membrane; Single-pass type I membrane protein.")
    assert entry.similarity == "Belongs to the MHC class I family."
    go = {ref.id: ref for ref in entry.go}
    assert (
        go["GO:0009986"].aspect == "C"
        and go["GO:0009986"].name == "cell surface"
        and go["GO:0009986"].evidence == "IDA"
    )


@needs_data
def test_xml_and_flat_agree():
    (flat,) = iter_uniprot(ENTRIES / "Q13639.txt")
    (xml,) = iter_uniprot(ENTRIES / "Q13639.xml")
    for name in ("accession", "name", "sequence", "existence", "organism", "taxon", "reviewed"):
        assert getattr(flat, name) == getattr(xml, name), name
    assert xml.function.startswith("This is one of the several different receptors for 5-hydroxytryptamine")
    assert xml.similarity == "Belongs to the G-protein coupled receptor 1 family."
    assert xml.location and {ref.id for ref in xml.go} == {ref.id for ref in flat.go}


@needs_data
def test_many_entries_per_file_ec_and_gzip(tmp_path):
    entries = list(iter_uniprot(SHARED / "uniprot" / "emboss_seq.dat"))
    assert len(entries) == 100 and len({e.accession for e in entries}) == 100
    assert all(e.sequence and e.existence in (1, 2, 3, 4, 5) for e in entries)
    multi = {e.accession: e for e in iter_uniprot(ENTRIES / "multi_ex.xml")}
    assert multi["P00750"].ec == ["3.4.21.68"]
    gz = tmp_path / "multi.dat.gz"
    gz.write_bytes(gzip.compress((ENTRIES / "multi_ex.txt").read_bytes()))
    assert [e.accession for e in iter_uniprot(gz)] == list(multi)
    assert list(iter_uniprot(ENTRIES / "keywlist.txt")) == []  # ID/AC lines, but not protein entries


def test_truncated_flat_file(tmp_path):
    path = tmp_path / "cut.dat"
    path.write_text("ID   X_HUMAN   Reviewed;   5 AA.\nAC   P12345;\nOS   Homo sapiens.\nSQ   SEQUENCE\n     MKV\n")
    with pytest.raises(UniProtFormatError, match="cut.dat"):
        list(iter_uniprot(path))
    broken = tmp_path / "broken.xml"
    broken.write_text('<uniprot xmlns="http://uniprot.org/uniprot"><entry><accession>P1</accession>')
    with pytest.raises(UniProtFormatError, match="broken.xml"):
        list(iter_uniprot(broken))


def test_helpers():
    assert existence_level("1: Evidence at protein level;") == 1
    assert existence_level("Inferred from homology") == 3 and existence_level("nonsense") is None
    assert clean_text("Binds ATP {ECO:0000269|PubMed:1}. Part of X (PubMed:2, PubMed:3).") == "Binds ATP. Part of X."
