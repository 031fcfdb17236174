"""ProtCLIP's task types through ``python -m pretrain.benchmark``: PPI from complexes, GO semantic similarity
and zero-shot mutation effect on a tiny export, against the module functions run directly; bad entries fail
clearly; the shipped suites' new entries are valid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from data_shards.readers.obo import load_obo
from pretrain.api import load_model
from pretrain.benchmark import go_similarity as gs
from pretrain.benchmark import mutation as mut
from pretrain.benchmark import ppi
from pretrain.benchmark.__main__ import main, run_benchmark
from pretrain.benchmark.data import BenchmarkDataError, read_proteins
from pretrain.benchmark.embedding import load_base
from pretrain.benchmark.registry import TASKS
from pretrain.benchmark.suite import from_dict, load_suite
from pretrain.errors import ConfigError
from tests.conftest import SHARED_DATA
from tests.pretrain.eval.tiny import build_corpus, build_export

REPO = Path(__file__).resolve().parents[3]
SUITES = REPO / "configs" / "benchmarks"
TABLE = SHARED_DATA / "annotations" / "pdb_chains.tsv"
OBO = SHARED_DATA / "annotations" / "go-basic_2021-12-15.obo.gz"
GAF = SHARED_DATA / "annotations" / "GO.goa_mouse_2019.01.29.gz"
needs_shared = pytest.mark.skipif(not TABLE.is_file(), reason="../shared/data is absent")

# Complexes of ../shared/data: 9QFW's files hold the same PDB code and chain ids as 1QFW's (ids 1QFW-A / -B
# name the 1QFW rows, so 9QFW_l_b's chains are added under their own ids); 1a95 and 2aqp are homodimers.
COMPLEX_FILES = [
    "db5.5/1QFW_r_b.pdb.gz", "db5.5/1QFW_l_b.pdb.gz", "db5.5/9QFW_r_b.pdb.gz", "db5.5/9QFW_l_b.pdb.gz",
    "db5.5/BAAD_r_b.pdb.gz", "db5.5/BAAD_l_b.pdb.gz", "db5.5/1CGI_r_b.pdb.gz", "db5.5/1CGI_l_b.pdb.gz",
    "dips_test/a9_1a95.pdb1_3.dill_l_b_COMPLEX.pdb.gz", "dips_test/a9_1a95.pdb1_3.dill_r_b_COMPLEX.pdb.gz",
    "dips_test/aq_2aqp.pdb1_0.dill_l_b_COMPLEX.pdb.gz", "dips_test/aq_2aqp.pdb1_0.dill_r_b_COMPLEX.pdb.gz",
    "dips_test/a9_3a98.pdb1_0.dill_l_b_COMPLEX.pdb.gz", "dips_test/a9_3a98.pdb1_0.dill_r_b_COMPLEX.pdb.gz",
]  # fmt: skip
WT = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
DMS = [("K2R", 0.3), ("A4G", -1.2), ("K2R:Q9E", 0.1), ("Y5W", -0.4), ("S13A:F14L", -2.0), ("R21K", 0.8),
       ("L23P", -1.5), ("E25D", 0.2), ("I30V", 0.5)]  # fmt: skip


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("protclip")
    return build_export(build_corpus(root / "corpus"), root / "run" / "export", seed=2)


def _suite(path: Path, data_root: Path, tasks: list[dict], proteins: str, resamples: int = 100) -> Path:
    suite = {"name": "small", "data_root": str(data_root), "proteins": proteins,
             "bootstrap": {"resamples": resamples, "seed": 0}, "tasks": tasks}  # fmt: skip
    path.write_text(yaml.safe_dump(suite))
    return path


def _complex_data(root: Path) -> Path:
    """root/structures/<source>/<file> copies and root/annotations/chains.tsv: their rows of pdb_chains.tsv."""
    lines = TABLE.read_text().splitlines()
    keep = [lines[0]] + [ln for ln in lines[1:] if ln.split("\t")[0].split("structures/")[-1] in COMPLEX_FILES]
    for f in COMPLEX_FILES:
        (root / "structures" / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHARED_DATA / "structures" / f, root / "structures" / f)
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "chains.tsv").write_text("\n".join(keep) + "\n")
    return root / "annotations" / "chains.tsv"


@needs_shared
def test_ppi_task_matches_the_module_functions(export, tmp_path):
    table = _complex_data(tmp_path / "data")
    tasks = [{"name": "PPI", "type": "ppi", "features": ["structure", "sequence"], "seed": 3}]
    result = run_benchmark(export, _suite(tmp_path / "s.yaml", tmp_path / "data", tasks, "annotations/chains.tsv"),
                           tmp_path / "out")  # fmt: skip
    assert result["proteins"]["added_by_tasks"] == 2  # 9QFW_l_b chains A and B
    assert result["proteins"]["trained_structure_failures"] == 0
    out = result["models"]["trained"]["PPI"]
    got = {(r["method"], r["subset"]): r for r in out["rows"]}
    assert set(got) == {(f"cosine/{f}", s) for f in ("structure", "sequence") for s in ("all", "no homodimers")}

    chains = ppi.complex_chains(table)
    assert len(chains) == 18 and out["info"]["n_chains"] == 18
    model = load_model(export)
    vec = {
        "structure": model.embed_structures([(c.path, c.chain) for c in chains]),
        "sequence": model.embed_sequences([c.sequence for c in chains]),
    }
    for subset, drop in (("all", False), ("no homodimers", True)):
        pairs = ppi.interaction_pairs(chains, drop_identical=drop, seed=3)
        for feat, x in vec.items():
            want = ppi.ppi_benchmark(dict(zip([c.id for c in chains], x)), pairs, resamples=100, seed=0)
            row = got[(f"cosine/{feat}", subset)]
            assert row["value"] == pytest.approx(want["auroc"]["value"], abs=1e-9)
            assert row["low"] == pytest.approx(want["auroc"]["low"], abs=1e-9)
            assert row["n"] == len(pairs) and row["n_positive"] == want["n_positive"]
    assert out["info"]["all"]["identical_sequence_positive"] == 2  # the two homodimers
    assert got[("cosine/sequence", "no homodimers")]["n"] == got[("cosine/sequence", "all")]["n"] - 4
    pairs_file = tmp_path / "out" / "trained" / "PPI" / "pairs_all.tsv"
    assert len(pairs_file.read_text().splitlines()) == 1 + got[("cosine/sequence", "all")]["n"]


@needs_shared
def test_go_similarity_task_matches_the_module_functions(export, tmp_path):
    # 40 annotated chains of pdb_chains.tsv, sequence only (no structure column), IC from one GOA file
    lines = TABLE.read_text().splitlines()
    head = lines[0].split("\t")
    cols = [head.index(c) for c in ("pdb_id", "chain", "go_mf", "go_bp", "go_cc", "sequence")]
    rows = [ln.split("\t") for ln in lines[1:]]
    rows = [r for r in rows if r[head.index("pdb_id")] and r[head.index("chain")] and r[head.index("go_mf")]][:40]
    (tmp_path / "p.tsv").write_text("\n".join("\t".join(r[i] for i in cols) for r in [head, *rows]) + "\n")
    tasks = [{"name": "GO", "type": "go_similarity", "obo": str(OBO), "gaf": [str(GAF)], "n_pairs": 300,
              "measures": ["lin", "resnik"], "features": ["sequence"], "seed": 1}]  # fmt: skip
    result = run_benchmark(export, _suite(tmp_path / "s.yaml", tmp_path, tasks, "p.tsv"), tmp_path / "out")
    got = {(r["aspect"], r["metric"]): r for r in result["models"]["trained"]["GO"]["rows"]}

    proteins = read_proteins(tmp_path / "p.tsv")
    terms = gs.table_terms(proteins, ["go_mf", "go_bp", "go_cc"], "test")
    assert len(terms) == 40
    pairs = gs.sample_pairs(sorted(terms), 300, seed=1)
    assert result["proteins"]["embedded"] == len({i for p in pairs for i in p})
    onto = load_obo(OBO)
    corpus = gs.gaf_term_sets([GAF])
    ic = gs.information_content(onto, corpus)
    # the 2019 GOA ids against the 2021 OBO: a few read as their replacements, the rest of the obsolete dropped
    go_ids = result["models"]["trained"]["GO"]["info"]["go_ids"]
    assert go_ids == {"ic_corpus": gs.current_id_counts(onto, corpus), "proteins": gs.current_id_counts(onto, terms)}
    assert go_ids["ic_corpus"]["replaced"] > 0 and go_ids["ic_corpus"]["obsolete"] > 0
    index = proteins.index()
    ids = sorted({i for p in pairs for i in p})
    x = load_model(export).embed_sequences([proteins.sequences[index[i]] for i in ids])
    lookup = dict(zip(ids, x))
    for measure in ("lin", "resnik"):
        want = gs.go_similarity_benchmark(lookup, pairs, terms, onto, ic, measure=measure, resamples=100, seed=0)
        for aspect, entry in want["aspects"].items():
            row = got[(aspect, f"spearman_{measure}")]
            assert row["method"] == "cosine/sequence" and row["n"] == entry["n_pairs"] > 100
            assert row["value"] == pytest.approx(entry["spearman"]["value"], abs=1e-9)
            assert row["high"] == pytest.approx(entry["spearman"]["high"], abs=1e-9)


def test_mutation_task_trained_and_base_rows(export, tmp_path):
    (tmp_path / "p.tsv").write_text(f"id\tsequence\nwt\t{WT}\n")
    (tmp_path / "dms.csv").write_text("mutant,DMS_score\n" + "".join(f"{m},{s}\n" for m, s in DMS))
    tasks = [{"name": "DMS", "type": "mutation", "dms": "dms.csv", "wild_type_id": "wt", "batch_size": 4}]
    out = tmp_path / "out"
    assert main(["--export", str(export), "--suite", str(_suite(tmp_path / "s.yaml", tmp_path, tasks, "p.tsv", 200)),
                 "--out", str(out), "--base"]) == 0  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    for row, model in (("trained", load_model(export)), ("base", load_base(export).sequence_model)):
        want = mut.mutation_benchmark(model, WT, tmp_path / "dms.csv", resamples=200, seed=0)
        (got,) = result["models"][row]["DMS"]["rows"]
        assert got["metric"] == "spearman" and got["n"] == len(DMS)
        assert got["value"] == pytest.approx(want["spearman"]["value"], abs=1e-9)
        assert got["low"] == pytest.approx(want["spearman"]["low"], abs=1e-9)
        assert result["models"][row]["DMS"]["info"]["n_multi_mutants"] == 2
    trained = result["models"]["trained"]["DMS"]["rows"][0]["value"]
    assert trained != result["models"]["base"]["DMS"]["rows"][0]["value"]  # two different ESM-2s
    assert "masked_marginals/esm2" in (out / "results.md").read_text()


def test_bad_entries_name_the_suite_and_key(export, tmp_path, capsys):
    (tmp_path / "p.tsv").write_text(f"id\tsequence\nwt\t{WT}\n")
    (tmp_path / "dms.csv").write_text("mutant,DMS_score\nK2R,0.1\nA4W,0.2\nQ3A,0.3\n")  # position 3 is T
    no_export = tmp_path / "no-export"  # the suite is checked before the model is loaded

    def fails(tasks, match, exc=ConfigError):
        with pytest.raises(exc, match=match):
            run_benchmark(no_export, _suite(tmp_path / "bad.yaml", tmp_path, tasks, "p.tsv"), tmp_path / "o")

    fails([{"name": "P", "type": "ppi", "chain": "x.tsv"}], r"bad.yaml: tasks\[0\] \(P\): unknown key\(s\) \['chain'\]")
    fails([{"name": "P", "type": "ppi", "chains": "x.tsv"}], r"bad.yaml: P.chains: file .*x.tsv not found")
    fails([{"name": "P", "type": "ppi", "sources": ["dips"]}], r"\(P\).sources: \['dips'\]; expected")
    fails([{"name": "P", "type": "ppi"}], r"bad.yaml: P: .*p.tsv: chain table lacks", BenchmarkDataError)
    fails([{"name": "G", "type": "go_similarity", "obo": "go.obo"}], r"bad.yaml: G.obo: file .*go.obo not found")
    fails([{"name": "G", "type": "go_similarity"}], r"\(G\).obo: the GO OBO file is required")
    fails([{"name": "G", "type": "go_similarity", "obo": "dms.csv", "measures": ["jaccard"]}], r"\(G\).measures")
    fails([{"name": "G", "type": "go_similarity", "obo": "dms.csv"}], r"G.term_columns: proteins table .*no column")
    fails([{"name": "M", "type": "mutation", "dms": "nope.csv", "wild_type": WT}], r"bad.yaml: M.dms: file .*nope.csv")
    fails([{"name": "M", "type": "mutation", "dms": "dms.csv"}], r"\(M\): give exactly one of wild_type")
    fails([{"name": "M", "type": "mutation", "dms": "dms.csv", "wild_type_id": "x"}], r"M.wild_type_id: 'x' is not in")
    fails([{"name": "M", "type": "mutation", "dms": "dms.csv", "wild_type": "MK1"}], r"M.wild_type: .*outside the 20")
    # a bad CSV row is found when the task runs: the CLI names the file, the row and both letters
    bad_row = _suite(tmp_path / "row.yaml", tmp_path, [{"name": "M", "type": "mutation", "dms": "dms.csv",
                                                         "wild_type_id": "wt"}], "p.tsv")  # fmt: skip
    assert main(["--export", str(export), "--suite", str(bad_row), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "row.yaml: M:" in err and "dms.csv row 4: mutant 'Q3A'" in err and "sequence has T there" in err


@needs_shared
def test_shipped_suites_hold_the_new_tasks():
    suite = load_suite(SUITES / "shared_data.yaml", set(TASKS))
    kinds = {t.type for t in suite.tasks}
    assert {"ppi", "go_similarity"} <= kinds
    proteins = read_proteins(suite.proteins)
    for i, t in enumerate(suite.tasks):
        if t.type in ("ppi", "go_similarity"):
            cfg = from_dict(TASKS[t.type].config, t.options, f"tasks[{i}]")
            assert TASKS[t.type].needs(suite, cfg, proteins, t.name)  # its files are found, proteins drawn
