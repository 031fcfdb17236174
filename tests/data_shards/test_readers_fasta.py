"""FASTA reader (data_shards/readers/fasta.py)."""

from pathlib import Path

import pytest

from data_shards.readers.fasta import iter_fasta

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
MULTI = SHARED / "uniprot" / "swissprot_entries" / "multi_ex.fasta"


@pytest.mark.skipif(not MULTI.exists(), reason="shared data not present")
def test_uniprot_headers():
    records = list(iter_fasta(MULTI))
    assert len(records) == 8
    first = records[0]
    assert (first.accession, first.entry_name, first.name) == (
        "P00750",
        "TPA_HUMAN",
        "Tissue-type plasminogen activator",
    )
    assert first.organism == "Homo sapiens" and first.existence == 1 and first.reviewed is True
    assert len(first.sequence) == 562 and first.sequence.isalpha()


def test_plain_headers_gaps_and_errors(tmp_path):
    path = tmp_path / "x.fa"
    path.write_text(
        ">seq1 some protein\nMKV-LA*\n\n>tr|A0A000|A_B Name OS=Mus musculus OX=10090 PE=4 SV=1\nacgt\n>empty\n"
    )
    records = list(iter_fasta(path))
    assert [(r.id, r.sequence) for r in records] == [("seq1", "MKVLA"), ("A0A000", "ACGT"), ("empty", "")]
    assert records[0].description == "some protein" and records[0].accession == ""
    assert records[1].reviewed is False and records[1].taxon == "10090" and records[1].existence == 4
    bad = tmp_path / "bad.fa"
    bad.write_text("MKV\n>x\nMKV\n")
    with pytest.raises(ValueError, match="bad.fa:1"):
        list(iter_fasta(bad))


def test_only_a_trailing_stop_is_stripped(tmp_path):
    """An internal ``*`` is a stop between two fragments: deleting it spliced them into one sequence.
    It stays, and the build skips the record with that reason (test_build.py)."""
    path = tmp_path / "stops.fa"
    path.write_text(">whole\nMKVLA*\n>spliced\nMKV*\nLAGG*\n>twice\nMK**\n")
    assert [(r.id, r.sequence) for r in iter_fasta(path)] == [
        ("whole", "MKVLA"),
        ("spliced", "MKV*LAGG"),
        ("twice", "MK"),
    ]
