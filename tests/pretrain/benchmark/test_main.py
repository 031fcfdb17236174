"""python -m pretrain.benchmark end to end: a tiny export on the demo data (trained and base rows) and on
the chains of ../shared/data that DeepFRI's EC file covers; the shipped suites load; bad suites fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pretrain.benchmark.__main__ import main, run_benchmark
from pretrain.benchmark.demo_data import write_demo_benchmark
from pretrain.benchmark.registry import TASKS
from pretrain.benchmark.suite import load_suite
from pretrain.errors import ConfigError
from tests.conftest import SHARED_DATA
from tests.pretrain.eval.tiny import build_corpus, build_export

REPO = Path(__file__).resolve().parents[3]
SUITES = REPO / "configs" / "benchmarks"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_demo")
    corpus = build_corpus(root / "corpus")
    export = build_export(corpus, root / "run" / "export", seed=2)
    counts = write_demo_benchmark(corpus / "train", corpus / "heldout", root / "data")
    return root, export, counts


def _small_suite(path: Path, data_root: Path, tasks: list[dict], proteins: str = "proteins.tsv") -> Path:
    suite = {
        "name": "small",
        "data_root": str(data_root),
        "proteins": proteins,
        "text_column": "text",
        "bootstrap": {"resamples": 100, "seed": 0},
        "tasks": tasks,
    }
    path.write_text(yaml.safe_dump(suite))
    return path


def test_demo_suite_trained_and_base_rows(demo, tmp_path):
    root, export, counts = demo
    assert counts["proteins"] == 144 and counts["ec_annotated"] > 40
    load_suite(SUITES / "demo.yaml", set(TASKS), root / "data")  # the shipped demo suite is valid
    tasks = [
        {"name": "EC", "type": "function", "annotations": "ec_annot.tsv", "features": ["sequence", "structure"],
         "split": {"method": "lists", "train": "train.txt", "test": "test.txt"}},
        {"name": "family", "type": "classification", "labels": "classes.tsv", "levels": ["family"]},
        {"name": "retrieval", "type": "retrieval", "ks": [1, 10]},
    ]  # fmt: skip
    suite = _small_suite(tmp_path / "suite.yaml", root / "data", tasks)
    out = tmp_path / "out"
    assert main(["--export", str(export), "--suite", str(suite), "--out", str(out), "--base"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["models"]) == {"trained", "base"}
    assert result["proteins"]["embedded"] == 144 and result["proteins"]["trained_structure_failures"] == 0
    for row in ("trained", "base"):
        ec = result["models"][row]["EC"]
        assert ec["info"]["EC"]["label_space"] == counts["ec_labels"]
        methods = {r["method"] for r in ec["rows"]}
        assert methods == {"knn/sequence", "knn/structure", "baseline/mmseqs"}
        fam = {r["method"]: r for r in result["models"][row]["family"]["rows"]}
        assert fam["baseline/mmseqs"]["value"] > 0.5  # demo families share motifs: homology finds them
        for r in ec["rows"] + list(fam.values()):
            assert r["low"] <= r["value"] <= r["high"] and r["n"] > 0
    assert result["models"]["trained"]["retrieval"]["rows"]
    assert "not_applicable" in result["models"]["base"]["retrieval"]["info"]
    # the base row's sequence features are the pooled encoder outputs (encoder width, not the shared space)
    md = (out / "results.md").read_text()
    assert "encoders before alignment (base row)" in md and "baseline/mmseqs" in md and "[" in md
    assert (out / "results.png").stat().st_size > 10_000
    assert (out / "trained" / "EC" / "EC" / "cafa" / "predictions" / "baseline_mmseqs.tsv").is_file()


def test_shared_data_ec_chains(demo, tmp_path):
    if not (SHARED_DATA / "annotations" / "nrPDB-EC_2020.04_annot.tsv").is_file():
        pytest.skip("../shared/data is absent")
    _, export, _ = demo
    load_suite(SUITES / "shared_data.yaml", set(TASKS))  # the shipped suite finds its files
    tasks = [
        {"name": "EC", "type": "function", "annotations": "annotations/nrPDB-EC_2020.04_annot.tsv",
         "features": ["sequence"], "split": {"method": "random", "test_fraction": 0.3, "seed": 0}},
    ]  # fmt: skip
    suite = _small_suite(tmp_path / "suite.yaml", SHARED_DATA, tasks, "annotations/pdb_chains.tsv")
    result = run_benchmark(export, suite, tmp_path / "out")
    info = result["models"]["trained"]["EC"]["info"]["EC"]
    assert info["annotated_chains_in_proteins_table"] == 107 and info["label_space"] == 538
    assert info["n_train"] + info["n_test"] == 107 and info["n_test"] == 32
    rows = {(r["method"], r["subset"], r["metric"]): r for r in result["models"]["trained"]["EC"]["rows"]}
    base = rows[("baseline/mmseqs", "all", "fmax")]
    assert 0.3 < base["value"] <= 1.0 and base["n"] == 32  # many bundled chains have close homologues
    assert result["proteins"]["embedded"] == 107


def test_bad_suites_name_the_file_and_key(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "proteins.tsv").write_text("id\tsequence\nA\tMKT\n")
    export = tmp_path / "no-export"  # the suite is checked before the model is loaded
    bad = _small_suite(tmp_path / "bad.yaml", data, [{"name": "x", "type": "function", "annotatons": "a"}])
    assert main(["--export", str(export), "--suite", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: tasks[0] (x): unknown key(s) ['annotatons']" in err
    missing = _small_suite(
        tmp_path / "missing.yaml", data, [{"name": "x", "type": "function", "annotations": "nope.tsv"}]
    )
    with pytest.raises(ConfigError, match=r"missing.yaml: x.annotations: file .*nope.tsv not found"):
        run_benchmark(export, missing, tmp_path / "o")
    typo = _small_suite(tmp_path / "typo.yaml", data, [{"name": "x", "type": "fnction"}])
    with pytest.raises(ConfigError, match=r"typo.yaml: tasks\[0\]: unknown task type 'fnction'"):
        run_benchmark(export, typo, tmp_path / "o")
    with pytest.raises(ConfigError, match=r"proteins file .*absent.tsv not found"):
        run_benchmark(export, _small_suite(tmp_path / "p.yaml", data, [], "absent.tsv"), tmp_path / "o")
