"""pretrain.benchmark.go_annotations: a DeepFRI GO annotation file from a chain table and the OBO."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.benchmark.data import BenchmarkDataError, read_deepfri_annotations
from pretrain.benchmark.function import FunctionTaskConfig, run
from pretrain.benchmark.go_annotations import go_annotation_file, main
from pretrain.benchmark.suite import from_dict
from tests.conftest import SHARED_DATA
from tests.pretrain.benchmark.helpers import make_context

T = "\t"
# Roots: GO:0003674 (MF), GO:0008150 (BP), GO:0005575 (CC). MF chain 3 -is_a-> 2 -is_a-> 1 -> root,
# 92 is an alt id of 2, 4 is obsolete, 5 is obsolete with replaced_by 1. BP 12 -is_a-> 11 -part_of-> 10
# -> root; 13 is_a 10 and part_of the CC term 20 (a cross-namespace edge that must not carry CC terms
# into BP). CC 21 -part_of-> 20.
OBO = """format-version: 1.2
ontology: go

[Term]
id: GO:0003674
name: molecular_function
namespace: molecular_function

[Term]
id: GO:0008150
name: biological_process
namespace: biological_process

[Term]
id: GO:0005575
name: cellular_component
namespace: cellular_component

[Term]
id: GO:0000001
name: binding
namespace: molecular_function
is_a: GO:0003674 ! molecular_function

[Term]
id: GO:0000002
name: ion binding
namespace: molecular_function
alt_id: GO:0000092
is_a: GO:0000001 ! binding

[Term]
id: GO:0000003
name: zinc ion binding
namespace: molecular_function
is_a: GO:0000002 ! ion binding

[Term]
id: GO:0000004
name: obsolete old activity
namespace: molecular_function
is_obsolete: true

[Term]
id: GO:0000005
name: obsolete binding under its old id
namespace: molecular_function
is_obsolete: true
replaced_by: GO:0000001

[Term]
id: GO:0000010
name: process A
namespace: biological_process
is_a: GO:0008150 ! biological_process

[Term]
id: GO:0000011
name: process B
namespace: biological_process
relationship: part_of GO:0000010 ! process A

[Term]
id: GO:0000012
name: process C
namespace: biological_process
is_a: GO:0000011 ! process B

[Term]
id: GO:0000013
name: process D
namespace: biological_process
is_a: GO:0000010 ! process A
relationship: part_of GO:0000020 ! compartment

[Term]
id: GO:0000020
name: compartment
namespace: cellular_component
is_a: GO:0005575 ! cellular_component

[Term]
id: GO:0000021
name: sub compartment
namespace: cellular_component
relationship: part_of GO:0000020 ! compartment

[Typedef]
id: part_of
name: part of
"""

# pdb_chains.tsv layout: ids <PDB upper>-<chain>; a row without chain is skipped; a repeated id keeps
# its first row; 3DEF-C holds an obsolete id, an unknown id and a CC term under go_bp; 4GHI-D has no GO;
# 5JKL-E's MF term is given by an obsolete id whose replaced_by is binding (read as binding).
CHAINS = (
    f"structure_file{T}chain{T}pdb_id{T}go_mf{T}go_bp{T}go_cc{T}sequence\n"
    f"{T}A{T}1abc{T}GO:0000003{T}GO:0000012{T}GO:0000021{T}MKVL\n"
    f"{T}B{T}2XYZ{T}GO:0000092{T}GO:0000013{T}{T}MKAL\n"
    f"{T}C{T}3DEF{T}GO:0000004;GO:9999999{T}GO:0000020{T}{T}MKGL\n"
    f"{T}D{T}4GHI{T}{T}{T}{T}MKTL\n"
    f"{T}{T}6NOC{T}GO:0000001{T}{T}{T}MKPL\n"
    f"{T}A{T}1ABC{T}GO:0000001{T}GO:0000010{T}GO:0000020{T}MKVL\n"
    f"{T}E{T}5JKL{T}GO:0000005{T}GO:0000010{T}GO:0000020{T}MKWL\n"
)

# min_chains 2: MF 1 (3 chains), 2 (2); 3 (1) cut. BP 10 (3); 11, 12, 13 (1 each) cut. CC 20 (3); 21 cut.
EXPECTED_MIN2 = f"""### GO-terms (molecular_function)
GO:0000001{T}GO:0000002
### GO-names (molecular_function)
binding{T}ion binding
### GO-terms (biological_process)
GO:0000010
### GO-names (biological_process)
process A
### GO-terms (cellular_component)
GO:0000020
### GO-names (cellular_component)
compartment
### PDB-chain{T}GO-terms (molecular_function){T}GO-terms (biological_process){T}GO-terms (cellular_component)
1ABC-A{T}GO:0000001,GO:0000002{T}GO:0000010{T}GO:0000020
2XYZ-B{T}GO:0000001,GO:0000002{T}GO:0000010{T}
3DEF-C{T}{T}{T}GO:0000020
5JKL-E{T}GO:0000001{T}GO:0000010{T}GO:0000020
"""


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "go.obo").write_text(OBO)
    (tmp_path / "chains.tsv").write_text(CHAINS)
    return tmp_path / "chains.tsv", tmp_path / "go.obo"


def test_file_by_hand_propagation_roots_min_chains_and_counts(inputs, tmp_path):
    chains, obo = inputs
    out = tmp_path / "go_annot.tsv"
    summary = go_annotation_file(chains, obo, out, min_chains=2)
    assert out.read_text() == EXPECTED_MIN2
    assert (summary.chains, summary.skipped_rows, summary.chains_with_terms, summary.chains_listed) == (5, 1, 4, 4)
    # 11 ids read (the repeated 1ABC-A row is not); GO:0000092 mapped, GO:0000004 obsolete,
    # GO:0000005 replaced by GO:0000001, GO:9999999 unknown, GO:0000020 moved from go_bp to CC
    counts = (summary.annotations, summary.alt_ids, summary.replaced, summary.obsolete, summary.unknown, summary.moved)
    assert counts == (11, 1, 1, 1, 1, 1)
    assert summary.vocabulary == {"GO-MF": 2, "GO-BP": 1, "GO-CC": 1}
    assert summary.labelled == {"GO-MF": 3, "GO-BP": 3, "GO-CC": 3}


def test_min_chains_one_keeps_every_term_but_roots_and_namespaces_stay_apart(inputs, tmp_path):
    chains, obo = inputs
    go_annotation_file(chains, obo, tmp_path / "a.tsv", min_chains=1)
    files = read_deepfri_annotations(tmp_path / "a.tsv")
    mf, bp, cc = files["GO-MF"], files["GO-BP"], files["GO-CC"]
    assert mf.vocabulary == ["GO:0000001", "GO:0000002", "GO:0000003"]
    assert bp.vocabulary == ["GO:0000010", "GO:0000011", "GO:0000012", "GO:0000013"]
    assert cc.vocabulary == ["GO:0000020", "GO:0000021"]
    assert mf.labels["1ABC-A"] == {"GO:0000001", "GO:0000002", "GO:0000003"}  # is_a chain
    assert bp.labels["1ABC-A"] == {"GO:0000010", "GO:0000011", "GO:0000012"}  # through part_of
    assert cc.labels["1ABC-A"] == {"GO:0000020", "GO:0000021"}
    # 13's part_of edge into CC is not followed: 2XYZ-B gets no CC label
    assert bp.labels["2XYZ-B"] == {"GO:0000010", "GO:0000013"} and cc.labels["2XYZ-B"] == set()
    assert "4GHI-D" not in mf.labels and "6NOC-" not in mf.labels
    assert mf.names == {"GO:0000001": "binding", "GO:0000002": "ion binding", "GO:0000003": "zinc ion binding"}


def test_max_chains_cuts_common_terms(inputs, tmp_path):
    chains, obo = inputs
    summary = go_annotation_file(chains, obo, tmp_path / "a.tsv", min_chains=2, max_chains=2)
    files = read_deepfri_annotations(tmp_path / "a.tsv")
    assert files["GO-MF"].vocabulary == ["GO:0000002"] and files["GO-BP"].vocabulary == []
    assert summary.chains_listed == 2 and set(files["GO-MF"].labels) == {"1ABC-A", "2XYZ-B"}


def test_generated_file_drives_the_function_task_on_three_aspects(inputs, tmp_path):
    chains, obo = inputs
    go_annotation_file(chains, obo, tmp_path / "go_annot.tsv", min_chains=1)
    ids = ["1ABC-A", "2XYZ-B", "3DEF-C", "5JKL-E"]
    (tmp_path / "train.txt").write_text("1ABC-A\n3DEF-C\n")
    (tmp_path / "test.txt").write_text("2XYZ-B\n5JKL-E\n")
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])  # 2XYZ-B near 1ABC-A, 5JKL-E near 3DEF-C
    ctx = make_context(tmp_path, ids, ["MKVL", "MKAL", "MKGL", "MKWL"], {"sequence": x}, resamples=20)
    cfg = from_dict(
        FunctionTaskConfig,
        {
            "annotations": "go_annot.tsv",
            "split": {"method": "lists", "train": "train.txt", "test": "test.txt"},
            "k": 1,
            "features": ["sequence"],
            "baselines": [],
            "identity_cutoffs": [],
        },
        "task",
    )
    result = run(ctx, "GO", cfg)
    assert list(result["info"]) == ["GO-MF", "GO-BP", "GO-CC"]
    # MF: only 1ABC-A trains (3DEF-C has no MF label), so both test chains get its {1, 2, 3} at score 1:
    # precision (2/3 + 1/3) / 2 = 0.5, recall 1, Fmax = 2 * 0.5 / 1.5
    fmax = {r["aspect"]: r["value"] for r in result["rows"] if r["metric"] == "fmax"}
    assert result["info"]["GO-MF"]["n_train"] == 1 and result["info"]["GO-MF"]["n_test"] == 2
    assert fmax["GO-MF"] == pytest.approx(2 / 3)
    assert result["info"]["GO-CC"]["n_train"] == 2 and result["info"]["GO-CC"]["n_test"] == 1  # 2XYZ-B: no CC


def test_bad_inputs_name_the_file(inputs, tmp_path, capsys):
    chains, obo = inputs
    bad = tmp_path / "bad.tsv"
    bad.write_text(f"pdb_id{T}chain{T}sequence{T}go_mf{T}go_bp\n1ABC{T}A{T}MKV{T}{T}\n")
    with pytest.raises(BenchmarkDataError, match=rf"{bad}: no GO column\(s\) \['go_cc'\]"):
        go_annotation_file(bad, obo, tmp_path / "o.tsv")
    bad.write_text(f"pdb_id{T}chain{T}sequence{T}go_mf{T}go_bp{T}go_cc\n1ABC{T}A{T}MKV{T}binding{T}{T}\n")
    with pytest.raises(BenchmarkDataError, match=rf"{bad}: chain 1ABC-A: go_mf entry 'binding' is not a GO id"):
        go_annotation_file(bad, obo, tmp_path / "o.tsv")
    other = tmp_path / "other.obo"
    other.write_text("format-version: 1.2\n\n[Term]\nid: GO:1234567\nname: x\nnamespace: molecular_function\n")
    with pytest.raises(BenchmarkDataError, match=rf"{other}: none of the 11 GO ids of {chains}"):
        go_annotation_file(chains, other, tmp_path / "o.tsv")
    assert main(["--chains", str(chains), "--obo", str(tmp_path / "nope.obo"), "--out", str(tmp_path / "o.tsv")]) == 2
    assert f"{tmp_path / 'nope.obo'}: OBO file not found" in capsys.readouterr().err
    assert not (tmp_path / "o.tsv").exists()


def test_cli_writes_the_file_and_prints_the_counts(inputs, tmp_path, capsys):
    chains, obo = inputs
    out = tmp_path / "sub" / "go_annot.tsv"
    assert main(["--chains", str(chains), "--obo", str(obo), "--out", str(out), "--min-chains", "2"]) == 0
    assert out.read_text() == EXPECTED_MIN2
    printed = capsys.readouterr().out
    assert "4 chains listed (of 5 in the table" in printed and "GO-BP: 1 terms carried by >= 2 chains" in printed
    counts = "alt ids mapped: 1; obsolete replaced: 1; obsolete dropped: 1; unknown dropped: 1; moved to the OBO's"
    assert f"{counts} namespace: 1" in printed


def test_bundled_chains_give_three_nonempty_aspects(tmp_path):
    chains = SHARED_DATA / "annotations" / "pdb_chains.tsv"
    obo = SHARED_DATA / "annotations" / "go-basic_2021-12-15.obo.gz"
    if not (chains.is_file() and obo.is_file()):
        pytest.skip("../shared/data is absent")
    summary = go_annotation_file(chains, obo, tmp_path / "go.tsv", min_chains=5)
    files = read_deepfri_annotations(tmp_path / "go.tsv")
    assert summary.chains_listed > 500 and summary.unknown == 0 and summary.replaced == 2  # GO:1902188 twice
    for task, lf in files.items():
        assert summary.vocabulary[task] == len(lf.vocabulary) > 0
        assert summary.labelled[task] == sum(1 for s in lf.labels.values() if s) > 0
        assert not {"GO:0003674", "GO:0008150", "GO:0005575"} & set(lf.vocabulary)
    # 1ACB-E (chymotrypsin): serine-type endopeptidase activity, propagated to peptidase activity
    assert {"GO:0004252", "GO:0008233"} <= files["GO-MF"].labels["1ACB-E"]
