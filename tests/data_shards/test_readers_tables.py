"""Annotation tables (data_shards/readers/tables.py): chain table, UniProt TSV, DeepFRI, SIFTS."""

import gzip
from pathlib import Path

import pytest

from data_shards.readers.tables import (
    detect_table_format,
    iter_chain_table,
    iter_deepfri,
    iter_uniprot_tsv,
    load_sifts_uniprot,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
ANN = SHARED / "annotations"
needs_data = pytest.mark.skipif(not ANN.exists(), reason="shared data not present")

UNIPROT_TSV = (
    "Entry\tEntry Name\tProtein names\tSequence\tFunction [CC]\tSubcellular location [CC]\tSequence similarities\t"
    "Gene Ontology IDs\tEC number\tProtein existence\tAnnotation\tOrganism\n"
    "P00766\tCTRA_BOVIN\tChymotrypsinogen A (EC 3.4.21.1) [Cleaved into: Chymotrypsin A chain A]\tCGVPAIQ\t"
    "FUNCTION: Serine protease {ECO:0000269|PubMed:1}.\tSUBCELLULAR LOCATION: Secreted.\t"
    "SIMILARITY: Belongs to the peptidase S1 family. {ECO:0000255}.\tGO:0004252; GO:0005615\t3.4.21.1\t"
    "Evidence at protein level\t5.0\tBos taurus (Bovine)\n"
)


def test_uniprot_rest_tsv(tmp_path):
    path = tmp_path / "uniprot.tsv"
    path.write_text(UNIPROT_TSV)
    assert detect_table_format(path) == "uniprot_tsv"
    (entry,) = iter_uniprot_tsv(path)
    assert (entry.accession, entry.entry_name, entry.name) == ("P00766", "CTRA_BOVIN", "Chymotrypsinogen A")
    assert entry.function == "Serine protease." and entry.location == "Secreted."
    assert entry.similarity == "Belongs to the peptidase S1 family."
    assert [g.id for g in entry.go] == ["GO:0004252", "GO:0005615"] and entry.ec == ["3.4.21.1"]
    assert entry.existence == 1 and entry.annotation_score == 5.0 and entry.organism == "Bos taurus"


def test_chain_table_paths_stay_inside(tmp_path):
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "a.pdb").write_text("x")
    table = tmp_path / "inside" / "t.tsv"
    table.write_text(
        "structure_file\tchain\tpdb_id\tgo_mf\tgo_cc\tec\tsequence\n"
        "a.pdb\tA\t1abc\tGO:0000001;GO:0000002\tGO:0000003\t1.1.1.1\tmkv\n"
        "../outside.pdb\tB\t\t\t\t\t\n"
        "/etc/passwd\tC\t\t\t\t\t\n"
    )
    assert detect_table_format(table) == "chains"
    rows = list(iter_chain_table(table))
    assert rows[0].path == (tmp_path / "inside" / "a.pdb").resolve() and rows[0].path_error is None
    assert rows[0].pdb_id == "1ABC" and rows[0].sequence == "MKV" and rows[0].ec == ["1.1.1.1"]
    assert rows[0].go == [("GO:0000001", "F"), ("GO:0000002", "F"), ("GO:0000003", "C")]
    assert rows[1].path is None and "escapes" in rows[1].path_error
    assert rows[2].path is None and "escapes" in rows[2].path_error
    allowed = list(iter_chain_table(table, allowed_roots=[tmp_path]))
    assert allowed[1].path == (tmp_path / "outside.pdb").resolve() and allowed[2].path is None


@needs_data
def test_real_tables():
    rows = list(iter_chain_table(ANN / "pdb_chains.tsv", allowed_roots=[SHARED / "structures"]))
    assert len(rows) == 1839 and all(row.path is not None and row.path.is_file() for row in rows)
    assert sum(bool(row.uniprot) for row in rows) == 1374
    assert detect_table_format(ANN / "nrPDB-EC_2020.04_annot.tsv") == "deepfri"
    deepfri = list(iter_deepfri(ANN / "nrPDB-EC_2020.04_annot.tsv"))
    assert len(deepfri) == 19201 and (deepfri[0].pdb_id, deepfri[0].chain) == ("4PR3", "A")
    assert deepfri[0].ec == ["3.2.2.9", "3.2.2.-"]
    assert detect_table_format(ANN / "GO.goa_mouse_2019.01.29.gz") == "gaf"
    assert detect_table_format(ANN / "pdb_chain_uniprot.tsv.gz") == "sifts_uniprot"
    assert detect_table_format(ANN / "pdb_chain_enzyme.tsv.gz") == "sifts_enzyme"
    assert detect_table_format(SHARED / "uniprot" / "function_text.tsv") == "uniprot_tsv"
    entries = list(iter_uniprot_tsv(SHARED / "uniprot" / "function_text.tsv"))
    assert len(entries) == 128 and entries[0].accession == "P15455" and entries[0].entry_name == "CRU4_ARATH"


def test_sifts_chimeric_chain_takes_the_accession_covering_most_residues(tmp_path):
    """Residues are summed over an accession's segments: 49 + 31 of P0A7Y4 beat one 76-residue
    segment of P29253 (real case: 1jl2 A-D)."""
    table = tmp_path / "sifts.tsv"
    header = "# excerpt\nPDB\tCHAIN\tSP_PRIMARY\tRES_BEG\tRES_END\tPDB_BEG\tPDB_END\tSP_BEG\tSP_END\n"
    rows = [
        ("1jl2", "A", "P0A7Y4", 1, 49),
        ("1jl2", "A", "P29253", 50, 125),
        ("1jl2", "A", "P0A7Y4", 126, 156),
        ("2tie", "A", "Q11111", 1, 10),  # a tie goes to the accession listed first
        ("2tie", "A", "Q22222", 1, 10),
    ]
    table.write_text(header + "".join(f"{p}\t{c}\t{a}\t1\t2\t1\t2\t{b}\t{e}\n" for p, c, a, b, e in rows))
    assert load_sifts_uniprot(table) == {("1jl2", "A"): "P0A7Y4", ("2tie", "A"): "Q11111"}


@needs_data
def test_sifts_uniprot_excerpt(tmp_path):
    with gzip.open(ANN / "pdb_chain_uniprot.tsv.gz", "rt") as handle:
        head = [next(handle) for _ in range(300)]
    excerpt = tmp_path / "sifts.tsv.gz"
    excerpt.write_bytes(gzip.compress("".join(head).encode()))
    assert detect_table_format(excerpt) == "sifts_uniprot"
    mapping = load_sifts_uniprot(excerpt)
    assert mapping[("101m", "A")] == "P02185" and 100 < len(mapping) < 300
