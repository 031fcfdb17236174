"""Every after-run command, given bad input of each kind it reads, prints one line naming it and exits 2.

The project rule (README): bad input gets one clear line naming the file or field, exit code 2, never
a traceback. Each case runs the command as a user does (``python -m ...`` in a subprocess) and
checks the exit code, that stderr holds no traceback, and that stderr's last non-empty line names
the offending file, option or field.

Not errors (documented here, not tested as failures): a run directory without ``metrics.jsonl`` or
``eval.json`` (``report`` writes "Nothing to report yet", ``summary`` prints what there is: a run
that has logged nothing yet), and a ``metrics.jsonl`` whose last line is cut (a live run) or with an
unparseable line among good ones (a line cut by a crash before a resume).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pretrain.engine.export import MODEL_FILE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Bad inputs of every kind, built once: damaged exports, run directories, indexes, checkpoints."""
    from data_shards.demo_corpus import build_demo_corpus
    from tests.pretrain.eval.tiny import build_export

    root = tmp_path_factory.mktemp("bad_input")
    p: dict[str, Path] = {"root": root}
    build_demo_corpus(root / "corpus", num_train=8, num_heldout=8, samples_per_shard=8, seed=0)
    p["shards"] = root / "corpus" / "heldout"
    good = p["export"] = build_export(root / "corpus", root / "export")

    def variant(name: str, edit) -> Path:
        d = root / name
        shutil.copytree(good, d)
        edit(d)
        return d

    weights = (good / MODEL_FILE).read_bytes()
    config = yaml.safe_load((good / "config.yaml").read_text())
    p["truncated"] = variant("truncated", lambda d: (d / MODEL_FILE).write_bytes(weights[: len(weights) // 2]))
    p["textfile"] = variant("textfile", lambda d: (d / MODEL_FILE).write_text("weights: not really\n"))
    p["empty_weights"] = variant("empty_weights", lambda d: (d / MODEL_FILE).write_bytes(b""))
    p["no_weights"] = variant("no_weights", lambda d: (d / MODEL_FILE).unlink())
    p["no_config"] = variant("no_config", lambda d: (d / "config.yaml").unlink())
    p["list_config"] = variant("list_config", lambda d: (d / "config.yaml").write_text("- model\n- data\n"))
    p["bad_yaml"] = variant("bad_yaml", lambda d: (d / "config.yaml").write_text("model: [unclosed\n  x: {\n"))
    p["binary_config"] = variant("binary_config", lambda d: (d / "config.yaml").write_bytes(b"\xff\xfe\x00garbage"))
    p["unknown_key"] = variant(
        "unknown_key", lambda d: (d / "config.yaml").write_text(yaml.safe_dump({**config, "trainer": {"steps": 3}}))
    )
    nan_config = {**config, "optim": {**config["optim"], "lr": float("nan")}}
    p["nan_config"] = variant("nan_config", lambda d: (d / "config.yaml").write_text(yaml.safe_dump(nan_config)))
    wide = {**config, "model": {**config["model"], "embed_dim": config["model"]["embed_dim"] * 2}}
    p["mismatch"] = variant("mismatch", lambda d: (d / "config.yaml").write_text(yaml.safe_dump(wide)))
    (root / "empty").mkdir()
    p["empty"] = root / "empty"
    p["file"] = root / "a_file.txt"
    p["file"].write_text("not a directory\n")

    # Run directories: no export; an export with damaged weights.
    p["run_no_export"] = root / "run_no_export"
    p["run_no_export"].mkdir()
    p["run_bad_export"] = root / "run_bad_export"
    shutil.copytree(p["truncated"], p["run_bad_export"] / "export")

    # Embedding indexes (what pretrain.eval.export_embeddings writes), hand-made.
    def index(name: str, n: int = 4, ids=None, npy=None, parquet_rows=None) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        d = root / name
        d.mkdir()
        rng = np.random.default_rng(0)
        for m in ("sequence", "text"):
            np.save(d / f"{m}.npy", rng.normal(size=(n, 8)).astype(np.float32))
        (d / "ids.json").write_text(json.dumps([f"P{i}" for i in range(n)] if ids is None else ids))
        rows = n if parquet_rows is None else parquet_rows
        table = {"row": list(range(rows)), "id": [f"P{i}" for i in range(rows)], "present_sequence": [True] * rows}
        pq.write_table(
            pa.table({**table, "present_text": [True] * rows, "text": ["kinase"] * rows}), d / "index.parquet"
        )
        if npy is not None:
            npy(d)
        return d

    p["index"] = index("index")
    p["index_bad_ids"] = index("index_bad_ids", npy=lambda d: (d / "ids.json").write_text("{not json"))
    p["index_ids_dict"] = index("index_ids_dict", ids={"P0": 0})
    p["index_ids_short"] = index("index_ids_short", ids=["P0"])
    p["index_bad_npy"] = index("index_bad_npy", npy=lambda d: (d / "sequence.npy").write_text("not numpy\n"))
    p["index_1d_npy"] = index("index_1d_npy", npy=lambda d: np.save(d / "sequence.npy", np.zeros(4, np.float32)))
    p["index_bad_parquet"] = index(
        "index_bad_parquet", npy=lambda d: (d / "index.parquet").write_bytes(b"PAR1 not really parquet")
    )
    p["index_parquet_rows"] = index("index_parquet_rows", parquet_rows=3)
    p["index_no_ids"] = index("index_no_ids", npy=lambda d: (d / "ids.json").unlink())

    # Run directories for report / summary.
    def run(name: str, metrics: bytes | str | None = None, ev: str | None = None) -> Path:
        d = root / name
        d.mkdir()
        if metrics is not None:
            (d / "metrics.jsonl").write_bytes(metrics if isinstance(metrics, bytes) else metrics.encode())
        if ev is not None:
            (d / "eval.json").write_text(ev)
        return d

    good_row = json.dumps({"step": 10, "loss": 3.0, "lr": 1e-3, "samples_per_s": 20.0}) + "\n"
    p["metrics_binary"] = run("metrics_binary", metrics=b"\x00\xff\xfe\x01" * 64)
    p["metrics_text"] = run("metrics_text", metrics="this is\nnot a\nmetrics log\n")
    p["metrics_array"] = run("metrics_array", metrics=good_row + "[1, 2, 3]\n")
    p["metrics_loss_str"] = run("metrics_loss_str", metrics=good_row + '{"step": 20, "loss": "low"}\n')
    p["metrics_no_step"] = run("metrics_no_step", metrics='{"loss": 2.0}\n')
    p["eval_garbage"] = run("eval_garbage", metrics=good_row, ev="{not json")
    p["eval_list"] = run("eval_list", metrics=good_row, ev="[1, 2]")
    p["eval_shape"] = run(
        "eval_shape", metrics=good_row, ev=json.dumps({"retrieval": {"directions": {"seq->text": 3}}})
    )
    p["report_out_file"] = root / "report_out_file"
    p["report_out_file"].write_text("x")

    # Recipes and files for ablate.
    p["recipe_bad_yaml"] = root / "bad.yaml"
    p["recipe_bad_yaml"].write_text("train: [unclosed\n")
    p["recipe_unknown"] = root / "unknown.yaml"
    p["recipe_unknown"].write_text("train:\n  max_stepz: 3\n")
    p["recipe_binary"] = root / "binary.yaml"
    p["recipe_binary"].write_bytes(b"\xff\xfe\x00\x01")
    p["readme_no_end"] = root / "README_no_end.md"
    p["readme_no_end"].write_text(
        "# x\n<!-- ablation-table:begin (python -m pretrain.ablate writes this; do not edit by hand) -->\n"
    )

    # Runs with checkpoints for export / convert_checkpoint.
    p["run_no_ckpt"] = root / "run_no_ckpt"
    p["run_no_ckpt"].mkdir()
    shutil.copy(good / "config.yaml", p["run_no_ckpt"] / "config.yaml")
    p["run_no_config"] = root / "run_no_config"
    p["run_bad_config"] = root / "run_bad_config"
    p["run_bad_ckpt"] = root / "run_bad_ckpt"
    for d in (p["run_no_config"], p["run_bad_config"], p["run_bad_ckpt"]):
        tag = d / "checkpoints" / "step00000002"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a torch file")
        (tag / "rank_0.pt").write_bytes(b"not a torch file")
        (tag / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 1}))
        (d / "checkpoints" / "latest").write_text("step00000002")
    (p["run_bad_config"] / "config.yaml").write_text("model:\n  embed_dim: -4\n")
    shutil.copy(good / "config.yaml", p["run_bad_ckpt"] / "config.yaml")
    return p


def _m(module: str, *args: str):
    return (module, args)


# (id, module and argument templates ({name} is a path of ``inputs``), what the last stderr line names)
CASES = [
    # --- python -m pretrain.eval
    ("eval-missing-model", _m("pretrain.eval", "--model", "{root}/nope"), "nope"),
    ("eval-model-is-a-file", _m("pretrain.eval", "--model", "{file}"), "a_file.txt"),
    ("eval-empty-export", _m("pretrain.eval", "--model", "{empty}"), "model.safetensors"),
    ("eval-truncated-weights", _m("pretrain.eval", "--model", "{truncated}"), "truncated/model.safetensors"),
    ("eval-text-as-weights", _m("pretrain.eval", "--model", "{textfile}"), "textfile/model.safetensors"),
    ("eval-empty-weights", _m("pretrain.eval", "--model", "{empty_weights}"), "empty_weights/model.safetensors"),
    ("eval-no-weights", _m("pretrain.eval", "--model", "{no_weights}"), "model.safetensors"),
    ("eval-no-config", _m("pretrain.eval", "--model", "{no_config}"), "config.yaml"),
    ("eval-config-is-a-list", _m("pretrain.eval", "--model", "{list_config}"), "list_config/config.yaml"),
    ("eval-config-not-yaml", _m("pretrain.eval", "--model", "{bad_yaml}"), "bad_yaml/config.yaml"),
    ("eval-config-binary", _m("pretrain.eval", "--model", "{binary_config}"), "binary_config/config.yaml"),
    ("eval-config-unknown-key", _m("pretrain.eval", "--model", "{unknown_key}"), "trainer"),
    ("eval-config-nan", _m("pretrain.eval", "--model", "{nan_config}"), "optim.lr"),
    ("eval-weights-mismatch", _m("pretrain.eval", "--model", "{mismatch}"), "mismatch/model.safetensors"),
    ("eval-missing-run-dir", _m("pretrain.eval", "--run-dir", "{root}/norun"), "norun"),
    ("eval-run-without-export", _m("pretrain.eval", "--run-dir", "{run_no_export}"), "run_no_export"),
    ("eval-run-bad-export", _m("pretrain.eval", "--run-dir", "{run_bad_export}"), "model.safetensors"),
    ("eval-missing-shards", _m("pretrain.eval", "--model", "{export}", "--shards", "{root}/noshards"), "noshards"),
    ("eval-bad-task", _m("pretrain.eval", "--model", "{export}", "--tasks", "retrieval,nope"), "nope"),
    ("eval-max-samples-0", _m("pretrain.eval", "--model", "{export}", "--max-samples", "0"), "--max-samples"),
    ("eval-batch-size-neg", _m("pretrain.eval", "--model", "{export}", "--batch-size", "-3"), "--batch-size"),
    ("eval-probe-steps-text", _m("pretrain.eval", "--model", "{export}", "--probe-steps", "many"), "--probe-steps"),
    ("eval-missing-obo", _m("pretrain.eval", "--model", "{export}", "--go-obo", "{root}/go.obo"), "go.obo"),
    ("eval-garbage-obo", _m("pretrain.eval", "--model", "{export}", "--go-obo", "{file}"), "a_file.txt"),
    (
        "eval-binary-ec-names",
        _m("pretrain.eval", "--model", "{export}", "--ec-names", "{metrics_binary}/metrics.jsonl"),
        "metrics.jsonl",
    ),
    ("eval-empty-ec-names", _m("pretrain.eval", "--model", "{export}", "--ec-names", "{file}"), "a_file.txt"),
    ("eval-bad-device", _m("pretrain.eval", "--model", "{export}", "--device", "warp9"), "warp9"),
    ("eval-out-is-a-dir", _m("pretrain.eval", "--model", "{export}", "--out", "{empty}"), "--out"),
    # --- python -m pretrain.eval.export_embeddings
    (
        "embed-truncated-weights",
        _m("pretrain.eval.export_embeddings", "--model", "{truncated}", "--shards", "{shards}", "--out", "{root}/emb1"),
        "model.safetensors",
    ),
    (
        "embed-no-config",
        _m("pretrain.eval.export_embeddings", "--model", "{no_config}", "--shards", "{shards}", "--out", "{root}/emb2"),
        "config.yaml",
    ),
    (
        "embed-missing-shards",
        _m(
            "pretrain.eval.export_embeddings",
            "--model",
            "{export}",
            "--shards",
            "{root}/noshards",
            "--out",
            "{root}/emb3",
        ),
        "noshards",
    ),
    (
        "embed-out-is-a-file",
        _m("pretrain.eval.export_embeddings", "--model", "{export}", "--shards", "{shards}", "--out", "{file}"),
        "a_file.txt",
    ),
    (
        "embed-batch-size-0",
        _m(
            "pretrain.eval.export_embeddings",
            "--model",
            "{export}",
            "--shards",
            "{shards}",
            "--out",
            "{root}/emb4",
            "--batch-size",
            "0",
        ),
        "--batch-size",
    ),
    (
        "embed-bad-device",
        _m(
            "pretrain.eval.export_embeddings",
            "--model",
            "{export}",
            "--shards",
            "{shards}",
            "--out",
            "{root}/emb5",
            "--device",
            "cuda:9",
        ),
        "cuda:9",
    ),
    # --- python -m pretrain.search
    ("search-missing-index", _m("pretrain.search", "--protein-id", "P0", "--index", "{root}/noindex"), "noindex"),
    (
        "search-text-missing-index",
        _m("pretrain.search", "kinase", "--index", "{root}/noindex", "--model", "{export}"),
        "noindex",
    ),
    (
        "search-text-truncated-model",
        _m("pretrain.search", "kinase", "--index", "{index}", "--model", "{truncated}"),
        "model.safetensors",
    ),
    (
        "search-text-no-config",
        _m("pretrain.search", "kinase", "--index", "{index}", "--model", "{no_config}"),
        "config.yaml",
    ),
    ("search-ids-not-json", _m("pretrain.search", "--protein-id", "P0", "--index", "{index_bad_ids}"), "ids.json"),
    ("search-ids-not-a-list", _m("pretrain.search", "--protein-id", "P0", "--index", "{index_ids_dict}"), "ids.json"),
    ("search-ids-count", _m("pretrain.search", "--protein-id", "P0", "--index", "{index_ids_short}"), "ids.json"),
    ("search-no-ids", _m("pretrain.search", "--protein-id", "P0", "--index", "{index_no_ids}"), "ids.json"),
    ("search-npy-garbage", _m("pretrain.search", "--protein-id", "P0", "--index", "{index_bad_npy}"), "sequence.npy"),
    ("search-npy-1d", _m("pretrain.search", "--protein-id", "P0", "--index", "{index_1d_npy}"), "sequence.npy"),
    (
        "search-parquet-garbage",
        _m("pretrain.search", "--protein-id", "P0", "--index", "{index_bad_parquet}"),
        "index.parquet",
    ),
    (
        "search-parquet-rows",
        _m("pretrain.search", "--protein-id", "P0", "--index", "{index_parquet_rows}"),
        "index.parquet",
    ),
    ("search-unknown-protein", _m("pretrain.search", "--protein-id", "Q9", "--index", "{index}"), "Q9"),
    ("search-k-0", _m("pretrain.search", "--protein-id", "P0", "--index", "{index}", "-k", "0"), "-k"),
    (
        "search-text-index-missing",
        _m("pretrain.search", "--protein-id", "P0", "--index", "{index}", "--text-index", "{root}/notext"),
        "notext",
    ),
    # --- python -m pretrain.report / pretrain.summary
    *[
        (f"{tool}-{name}", _m(f"pretrain.{tool}", "--run-dir", "{" + name + "}"), needle)
        for tool in ("report", "summary")
        for name, needle in (
            ("metrics_binary", "metrics.jsonl"),
            ("metrics_text", "metrics.jsonl"),
            ("metrics_array", "metrics.jsonl line 2"),
            ("metrics_loss_str", "metrics.jsonl line 2"),
            ("metrics_no_step", "metrics.jsonl line 1"),
            ("eval_garbage", "eval.json"),
            ("eval_list", "eval.json"),
            ("eval_shape", "eval.json"),
        )
    ],
    ("report-missing-run", _m("pretrain.report", "--run-dir", "{root}/norun"), "norun"),
    (
        "report-out-is-a-file",
        _m("pretrain.report", "--run-dir", "{run_no_export}", "--out", "{report_out_file}"),
        "report_out_file",
    ),
    ("summary-missing-run", _m("pretrain.summary", "--run-dir", "{root}/norun"), "norun"),
    # --- python -m pretrain.ablate (every check runs before any variant trains)
    (
        "ablate-missing-recipe",
        _m("pretrain.ablate", "--run-root", "{root}/abl", "--recipes", "{root}/none.yaml"),
        "none.yaml",
    ),
    (
        "ablate-recipe-not-yaml",
        _m("pretrain.ablate", "--run-root", "{root}/abl", "--recipes", "{recipe_bad_yaml}"),
        "bad.yaml",
    ),
    (
        "ablate-recipe-binary",
        _m("pretrain.ablate", "--run-root", "{root}/abl", "--recipes", "{recipe_binary}"),
        "binary.yaml",
    ),
    (
        "ablate-recipe-unknown-key",
        _m("pretrain.ablate", "--run-root", "{root}/abl", "--recipes", "{recipe_unknown}"),
        "train.max_stepz",
    ),
    (
        "ablate-set-unknown-key",
        _m(
            "pretrain.ablate",
            "--run-root",
            "{root}/abl",
            "--recipes",
            "configs/recipes/demo.yaml",
            "--set",
            "train.nope=1",
        ),
        "train.nope",
    ),
    (
        "ablate-set-nan",
        _m(
            "pretrain.ablate",
            "--run-root",
            "{root}/abl",
            "--recipes",
            "configs/recipes/demo.yaml",
            "--set",
            "optim.lr=.nan",
        ),
        "optim.lr",
    ),
    (
        "ablate-set-inf",
        _m(
            "pretrain.ablate",
            "--run-root",
            "{root}/abl",
            "--recipes",
            "configs/recipes/demo.yaml",
            "--set",
            "data.coord_noise=.inf",
        ),
        "data.coord_noise",
    ),
    (
        "ablate-set-negative",
        _m(
            "pretrain.ablate",
            "--run-root",
            "{root}/abl",
            "--recipes",
            "configs/recipes/demo.yaml",
            "--set",
            "model.structure.k_neighbors=-2",
        ),
        "model.structure.k_neighbors",
    ),
    (
        "ablate-set-no-equals",
        _m(
            "pretrain.ablate",
            "--run-root",
            "{root}/abl",
            "--recipes",
            "configs/recipes/demo.yaml",
            "--set",
            "train.max_steps",
        ),
        "train.max_steps",
    ),
    (
        "ablate-ranks-0",
        _m("pretrain.ablate", "--run-root", "{root}/abl", "--recipes", "configs/recipes/demo.yaml", "--ranks", "0"),
        "--ranks",
    ),
    (
        "ablate-missing-ds-config",
        _m(
            "pretrain.ablate",
            "--run-root",
            "{root}/abl",
            "--recipes",
            "configs/recipes/demo.yaml",
            "--config",
            "zero9.json",
        ),
        "zero9.json",
    ),
    (
        "ablate-ds-config-not-json",
        _m(
            "pretrain.ablate",
            "--run-root",
            "{root}/abl",
            "--recipes",
            "configs/recipes/demo.yaml",
            "--config",
            "{recipe_unknown}",
        ),
        "unknown.yaml",
    ),
    (
        "ablate-run-root-is-a-file",
        _m("pretrain.ablate", "--run-root", "{file}", "--recipes", "configs/recipes/demo.yaml"),
        "a_file.txt",
    ),
    (
        "ablate-missing-readme",
        _m(
            "pretrain.ablate",
            "--run-root",
            "{root}/abl",
            "--recipes",
            "configs/recipes/demo.yaml",
            "--readme",
            "{root}/NOPE.md",
        ),
        "NOPE.md",
    ),
    (
        "ablate-readme-without-end",
        _m(
            "pretrain.ablate",
            "--run-root",
            "{root}/abl",
            "--recipes",
            "configs/recipes/demo.yaml",
            "--readme",
            "{readme_no_end}",
        ),
        "README_no_end.md",
    ),
    # --- python -m pretrain.export
    ("export-missing-run", _m("pretrain.export", "--run-dir", "{root}/norun"), "norun"),
    ("export-run-without-config", _m("pretrain.export", "--run-dir", "{run_no_config}"), "config.yaml"),
    ("export-run-bad-config", _m("pretrain.export", "--run-dir", "{run_bad_config}"), "model.embed_dim"),
    ("export-no-checkpoint", _m("pretrain.export", "--run-dir", "{run_no_ckpt}"), "checkpoints"),
    ("export-unknown-tag", _m("pretrain.export", "--run-dir", "{run_bad_ckpt}", "--tag", "step9"), "step9"),
    ("export-tag-path", _m("pretrain.export", "--run-dir", "{run_bad_ckpt}", "--tag", "../x"), "--tag"),
    ("export-garbage-checkpoint", _m("pretrain.export", "--run-dir", "{run_bad_ckpt}"), "step00000002"),
    ("export-out-is-a-file", _m("pretrain.export", "--run-dir", "{run_bad_ckpt}", "--out", "{file}"), "--out"),
    # --- python -m pretrain.convert_checkpoint
    ("convert-missing-run", _m("pretrain.convert_checkpoint", "{root}/norun"), "norun"),
    ("convert-no-checkpoint", _m("pretrain.convert_checkpoint", "{run_no_ckpt}"), "checkpoints"),
    ("convert-unknown-tag", _m("pretrain.convert_checkpoint", "{run_bad_ckpt}", "--tag", "step9"), "step9"),
    ("convert-tag-path", _m("pretrain.convert_checkpoint", "{run_bad_ckpt}", "--tag", "../x"), "--tag"),
    ("convert-workers-0", _m("pretrain.convert_checkpoint", "{run_bad_ckpt}", "--workers", "0"), "--workers"),
    ("convert-workers-text", _m("pretrain.convert_checkpoint", "{run_bad_ckpt}", "--workers", "four"), "--workers"),
    ("convert-garbage-checkpoint", _m("pretrain.convert_checkpoint", "{run_bad_ckpt}"), "step00000002"),
]


# Each command's cases run in one child process (a cold start of torch costs seconds; a hundred of them
# would cost minutes on a 2-core machine): the child runs the module exactly as ``python -m`` does
# (``runpy.run_module(..., run_name="__main__", alter_sys=True)``) once per case, with fresh
# stdout / stderr buffers, and reports each case's exit code and stderr; an exception that escapes is
# printed as Python prints it (a "Traceback") and counts as exit 1. ``test_a_real_process_per_command``
# runs one case of each command as a real ``python -m`` process as well.
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
module, cases = sys.argv[1], json.loads(sys.argv[2])
results = {}
for case_id, args in cases:
    err = io.StringIO()
    sys.argv = [module, *args]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            rc = 1
    results[case_id] = {"rc": rc, "stderr": err.getvalue()}
print(json.dumps(results))
"""
MODULES = sorted({command[0] for _, command, _ in CASES})


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _args(inputs: dict[str, Path], templates) -> list[str]:
    return [t.format(**{k: str(v) for k, v in inputs.items()}) for t in templates]


def _problem(rc: int, stderr: str, needle: str) -> str | None:
    """Why a result breaks the rule, or None."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback" in stderr:
        return f"traceback:\n{stderr[-2500:]}"
    if rc != 2:
        return f"exit {rc}, stderr: {stderr[-1500:]!r}"
    if not lines or needle not in lines[-1]:
        return f"last stderr line does not name {needle!r}: {lines[-3:]}"
    return None


def test_every_command_has_cases():
    assert MODULES == [
        "pretrain.ablate",
        "pretrain.convert_checkpoint",
        "pretrain.eval",
        "pretrain.eval.export_embeddings",
        "pretrain.export",
        "pretrain.report",
        "pretrain.search",
        "pretrain.summary",
    ]
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("module", MODULES)
def test_bad_input_is_one_line_naming_it_and_exit_2(inputs, module):
    cases = [(case_id, _args(inputs, templates), needle) for case_id, (m, templates), needle in CASES if m == module]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, module, json.dumps([(c, a) for c, a, _ in cases])],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = {c: _problem(results[c]["rc"], results[c]["stderr"], needle) for c, _, needle in cases}
    problems = {c: p for c, p in problems.items() if p}
    assert not problems, "\n\n".join(f"{c}: {p}" for c, p in problems.items())


@pytest.mark.parametrize(
    "case_id",
    [
        "eval-truncated-weights",
        "embed-no-config",
        "search-ids-not-json",
        "report-metrics_array",
        "summary-eval_garbage",
        "ablate-set-nan",
        "export-run-bad-config",
        "convert-missing-run",
    ],
)
def test_a_real_process_per_command(inputs, case_id):
    (module, templates), needle = next((command, needle) for c, command, needle in CASES if c == case_id)
    proc = subprocess.run(
        [sys.executable, "-m", module, *_args(inputs, templates)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert _problem(proc.returncode, proc.stderr, needle) is None, _problem(proc.returncode, proc.stderr, needle)
