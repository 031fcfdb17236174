"""pretrain.benchmark.data: DeepFRI EC / GO annotation files, proteins tables, id lists, class tables."""

from __future__ import annotations

import pytest

from pretrain.benchmark.data import (
    BenchmarkDataError,
    read_class_table,
    read_deepfri_annotations,
    read_id_list,
    read_proteins,
)
from tests.conftest import SHARED_DATA

T = "\t"
# DeepFRI's nrPDB-GO_*_annot.tsv layout, three terms per namespace
GO_FILE = f"""### GO-terms (molecular_function)
GO:0003824{T}GO:0005488{T}GO:0008270
### GO-names (molecular_function)
catalytic activity{T}binding{T}zinc ion binding
### GO-terms (biological_process)
GO:0006508{T}GO:0008152
### GO-names (biological_process)
proteolysis{T}metabolic process
### GO-terms (cellular_component)
GO:0005737
### GO-names (cellular_component)
cytoplasm
### PDB-chain{T}GO-terms (molecular_function){T}GO-terms (biological_process){T}GO-terms (cellular_component)
1ABC-A{T}GO:0003824,GO:0005488{T}GO:0006508{T}
2XYZ-B{T}{T}GO:0008152,GO:0006508{T}GO:0005737
3DEF-C{T}GO:0008270{T}{T}
"""

EC_FILE = f"""### EC-numbers
3.4.21.4{T}3.4.21.-{T}2.7.11.1
### PDB-chain{T}EC-numbers
1ABC-A{T}3.4.21.4,3.4.21.-
2XYZ-B{T}2.7.11.1
"""


def test_go_file_gives_three_aspects_with_vocabulary_names_and_labels(tmp_path):
    path = tmp_path / "nrPDB-GO_test_annot.tsv"
    path.write_text(GO_FILE)
    files = read_deepfri_annotations(path)
    assert list(files) == ["GO-MF", "GO-BP", "GO-CC"]
    mf, bp, cc = files["GO-MF"], files["GO-BP"], files["GO-CC"]
    assert mf.vocabulary == ["GO:0003824", "GO:0005488", "GO:0008270"]
    assert mf.names["GO:0008270"] == "zinc ion binding"
    assert mf.labels == {"1ABC-A": {"GO:0003824", "GO:0005488"}, "2XYZ-B": set(), "3DEF-C": {"GO:0008270"}}
    assert bp.labels["2XYZ-B"] == {"GO:0008152", "GO:0006508"} and bp.labels["3DEF-C"] == set()
    assert cc.vocabulary == ["GO:0005737"] and cc.labels["2XYZ-B"] == {"GO:0005737"}


def test_ec_file_and_errors(tmp_path):
    path = tmp_path / "ec.tsv"
    path.write_text(EC_FILE)
    ec = read_deepfri_annotations(path)["EC"]
    assert ec.vocabulary == ["3.4.21.4", "3.4.21.-", "2.7.11.1"]
    assert ec.labels == {"1ABC-A": {"3.4.21.4", "3.4.21.-"}, "2XYZ-B": {"2.7.11.1"}}
    path.write_text(EC_FILE + f"9ZZZ-A{T}1.1.1.1\n")
    with pytest.raises(BenchmarkDataError, match=r"ec.tsv: chain 9ZZZ-A: EC labels not in the vocabulary"):
        read_deepfri_annotations(path)
    path.write_text("1ABC-A\t1.1.1.1\n")
    with pytest.raises(BenchmarkDataError, match="not a DeepFRI annotation file"):
        read_deepfri_annotations(path)
    with pytest.raises(BenchmarkDataError, match="missing.tsv: file not found"):
        read_deepfri_annotations(tmp_path / "missing.tsv")


def test_proteins_table_ids_and_structure_paths(tmp_path):
    (tmp_path / "t.tsv").write_text(
        "structure_file\tchain\tpdb_id\tsequence\n"
        "s/1abc.pdb.gz\tA\t1abc\tmk ta\n"
        "s/1abc.pdb.gz\t\t1abc\tMKT\n"  # blank chain id: skipped
        "s/2xyz.pdb.gz\tB\t2XYZ\tGGG\n"
    )
    p = read_proteins(tmp_path / "t.tsv")
    assert p.ids == ["1ABC-A", "2XYZ-B"] and p.sequences == ["MKTA", "GGG"] and p.skipped == 1
    assert p.structures[0] == ((tmp_path / "s/1abc.pdb.gz").resolve(), "A")
    (tmp_path / "bad.tsv").write_text("id\tseq\nA\tMKT\n")
    with pytest.raises(BenchmarkDataError, match="bad.tsv: no 'sequence' column"):
        read_proteins(tmp_path / "bad.tsv")


def test_id_lists_and_class_tables(tmp_path):
    (tmp_path / "ids.txt").write_text("# train\n1ABC-A\n2XYZ-B,extra\n\n")
    assert read_id_list(tmp_path / "ids.txt") == ["1ABC-A", "2XYZ-B"]
    (tmp_path / "c.tsv").write_text("id\tfold\tfamily\nP1\ta\tf1\nP2\t\tf2\n")
    assert read_class_table(tmp_path / "c.tsv", ["fold", "family"]) == {
        "P1": {"fold": "a", "family": "f1"},
        "P2": {"family": "f2"},
    }
    with pytest.raises(BenchmarkDataError, match="missing column"):
        read_class_table(tmp_path / "c.tsv", ["superfamily"])


def test_bundled_deepfri_ec_file():
    path = SHARED_DATA / "annotations" / "nrPDB-EC_2020.04_annot.tsv"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    ec = read_deepfri_annotations(path)["EC"]
    assert len(ec.vocabulary) == 538 and len(ec.labels) == 19201
    assert ec.labels["4PR3-A"] == {"3.2.2.9", "3.2.2.-"}
    chains = read_proteins(SHARED_DATA / "annotations" / "pdb_chains.tsv")
    covered = [c for c in chains.ids if ec.labels.get(c)]
    assert len(covered) == 107  # the bundled chains DeepFRI's EC file annotates
