"""GAF 2.x reader (data_shards/readers/gaf.py)."""

import gzip
from pathlib import Path

import pytest

from data_shards.readers.gaf import iter_gaf, load_gaf

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
GOA = SHARED / "annotations" / "GO.goa_human_2019.01.29.gz"


def gaf_line(acc, go, evidence="IDA", aspect="F", qualifier=""):
    cols = ["UniProtKB", acc, "SYM", qualifier, go, "PMID:1", evidence, "", aspect, "Some protein", "", "protein"]
    return "\t".join(cols + ["taxon:9606|taxon:10090", "20190101", "UniProt", "", ""])


def test_not_qualifier_dropped_evidence_kept(tmp_path):
    path = tmp_path / "x.gaf.gz"
    lines = ["!gaf-version: 2.1", gaf_line("P1", "GO:0000001"), gaf_line("P1", "GO:0000002", qualifier="NOT")]
    lines += [gaf_line("P1", "GO:0000001", "IEA"), gaf_line("P1", "GO:0000001", "IEA"), "broken\tline"]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    skipped = {}
    anns = list(iter_gaf(path, skipped))
    assert [(a.accession, a.go_id, a.evidence, a.aspect, a.taxon) for a in anns][0] == (
        "P1",
        "GO:0000001",
        "IDA",
        "F",
        "9606",
    )
    assert skipped == {"NOT qualifier": 1, "malformed GAF line": 1}
    proteins = load_gaf([path])
    assert proteins["P1"].terms == [("GO:0000001", "F", "IDA"), ("GO:0000001", "F", "IEA")]
    assert proteins["P1"].evidence_codes == ["IDA", "IEA"] and proteins["P1"].name == "Some protein"
    assert load_gaf([path], evidence={"IDA"})["P1"].terms == [("GO:0000001", "F", "IDA")]


@pytest.mark.skipif(not GOA.exists(), reason="shared data not present")
def test_real_goa_head():
    anns = []
    for ann in iter_gaf(GOA):
        anns.append(ann)
        if len(anns) == 2000:
            break
    assert all(a.go_id.startswith("GO:") and a.aspect in "FPC" and a.evidence for a in anns)
    assert all(a.taxon == "9606" for a in anns) and "NOT" not in {a.qualifier for a in anns}
