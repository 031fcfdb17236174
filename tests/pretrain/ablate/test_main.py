"""``python -m pretrain.ablate``: argument errors, the weights cell, and a real seeded run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pretrain.ablate.__main__ import main
from pretrain.ablate.outcomes import COLUMNS, column_parts, run_metrics
from pretrain.ablate.runs import load_outcomes, recipe_description
from pretrain.ablate.table import README_BEGIN, README_END
from pretrain.config import CONFIGS_DIR
from tests.conftest import REPO, TINY_OVERRIDES, cpu_env


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  alhpa: 1\n")
    assert main(["--recipes", str(bad), "--run-root", str(tmp_path / "runs")]) == 2
    assert "unknown config key 'loss.alhpa'" in capsys.readouterr().err
    demo = str(CONFIGS_DIR / "recipes" / "demo.yaml")
    assert main(["--recipes", demo, "--run-root", str(tmp_path / "r"), "--reference", "nope"]) == 2
    assert "--reference 'nope' is not one of the variants ['demo']" in capsys.readouterr().err
    assert main(["--recipes", demo, "--run-root", str(tmp_path / "r"), "--tasks", "retrieval,gogo"]) == 2
    assert "unknown eval task(s) ['gogo']" in capsys.readouterr().err
    assert main(["--recipes", demo, "--run-root", str(tmp_path / "r"), "--bootstrap", "1"]) == 2
    assert "--bootstrap must be at least 2 draws, got 1" in capsys.readouterr().err
    assert recipe_description(str(CONFIGS_DIR / "recipes" / "ablations" / "demo_seq_text.yaml"), []) == (
        "0/1/0; 0.1/0/0.1; yes",
        150,
    )
    # overlays that differ only in an objective switch are told apart in the table
    ablations = CONFIGS_DIR / "recipes" / "ablations"
    assert recipe_description(str(ablations / "demo_per_term_temperature.yaml"), [])[0].endswith(
        "; temperature per_term"
    )
    assert recipe_description(str(ablations / "demo_text_lr_0p1.yaml"), [])[0].endswith("; lr × text 0.1")
    assert recipe_description(str(ablations / "demo_sigmoid.yaml"), [])[0].endswith("; loss sigmoid")
    assert recipe_description(str(ablations / "demo_protclip_pda_gumbel.yaml"), [])[0].endswith(
        "; objective protclip; PDA gumbel"
    )
    assert recipe_description(str(ablations / "demo_sigmoid_fn_text.yaml"), [])[0].endswith(
        "; loss sigmoid; false negatives text"
    )
    assert recipe_description(str(ablations / "demo_sigmoid_groups_positive.yaml"), [])[0].endswith(
        "; loss sigmoid; false negatives text; same-group pairs positive"
    )
    assert recipe_description(str(ablations / "demo_hard_negatives_previous_epoch.yaml"), [])[0].endswith(
        "; hard negatives previous epoch × 0.5"
    )


@pytest.mark.slow
def test_seeds_base_row_and_statistics_from_real_runs(tmp_path, small_demo):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\n{README_END}\n")
    over = [
        *TINY_OVERRIDES,
        f"data.train_shards={small_demo / 'train'}",
        f"data.eval_shards={small_demo / 'heldout'}",
        "data.loader=local",
        "train.max_steps=2",
        "train.stage1_steps=1",
        "train.validate_every=0",
    ]
    cmd = [sys.executable, "-m", "pretrain.ablate", "--run-root", str(tmp_path / "runs"), "--readme", str(readme)]
    cmd += ["--recipes", str(CONFIGS_DIR / "recipes" / "demo.yaml"), "--seeds", "2", "--probe-steps", "5"]
    cmd += ["--max-train-samples", "96", "--bootstrap", "200"]
    for o in over:
        cmd += ["--set", o]
    p = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = readme.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`demo`", "`base`", "`base`"]  # the table, the differences
    assert (
        "| 1/1/1; 0.1/0.1/0.1; yes | 2 | 2 |" in rows[0] and "| untrained: 1/1/1; 0.1/0.1/0.1; yes | 0 | 2 |" in rows[1]
    )
    assert "seed × protein paired test" in text and "| Δ vs `demo` (p, 95 % interval) |" in text
    payload = json.loads((tmp_path / "runs" / "ablation.json").read_text())
    assert payload["seeds"] == [0, 1] and payload["reference"] == "demo"
    demo, base = payload["results"]
    for r in (demo, base):
        for run in r["runs"]:
            run_dir = tmp_path / "runs" / r["variant"] / f"seed{run['seed']}"
            saved = json.loads((run_dir / "ablate_eval.json").read_text())
            assert run["metrics"] == run_metrics(saved["result"], "probe/concat", "x")[0]
            parts = column_parts(load_outcomes(run_dir / "ablate_eval.npz"), "probe/concat", "x")
            assert all(parts[k].value() == pytest.approx(run["metrics"][k], abs=1e-12) for k in COLUMNS)
        for key in ("mean", "EC Fmax", "fold accuracy"):
            vals = [run["metrics"][key] for run in r["runs"]]
            assert all(v is not None for v in vals) and r["mean"][key] == pytest.approx(sum(vals) / 2)
    assert set(base["tests"]) == set(COLUMNS) and base["tests"]["mean"]["n"] == 2
    test = base["tests"]["mean"]
    assert 0.0 <= test["p"] <= 1.0 and test["ci"][0] <= test["mean_diff"] <= test["ci"][1] and "t_test" in test
    assert demo["runs"][0]["metrics"] != demo["runs"][1]["metrics"]  # the seeds differ
    # Running it again (seed 0 only) reuses the finished run and the evaluations: no training, same values.
    npz = tmp_path / "runs" / "demo" / "seed0" / "ablate_eval.npz"
    stamp = (tmp_path / "runs" / "demo" / "seed0" / "ablate_eval.json").stat().st_mtime_ns, npz.stat().st_mtime_ns
    cmd[cmd.index("--seeds") + 1] = "1"
    again = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already finished at step 2" in (tmp_path / "runs" / "demo" / "seed0" / "ablate.log").read_text()
    assert (
        (tmp_path / "runs" / "demo" / "seed0" / "ablate_eval.json").stat().st_mtime_ns,
        npz.stat().st_mtime_ns,
    ) == stamp
    rerun = json.loads((tmp_path / "runs" / "ablation.json").read_text())["results"]
    assert [r["runs"] for r in rerun] == [r["runs"][:1] for r in payload["results"]]
    assert "One seed: no spread and no significance test" in readme.read_text()


def test_runs_scored_on_other_held_out_proteins_are_refused(tmp_path):
    from pretrain.ablate.__main__ import _same_proteins
    from pretrain.ablate.runs import Result

    def result(name):
        return Result(name, f"{name}.yaml", "w", 1, [0, 1], [{"seed": 0}, {"seed": 1}])

    ids = {"ids": np.array(["a", "b", "c"])}
    results = [result("demo"), result("other")]
    _same_proteins(results, {"demo": [ids, ids], "other": [ids, ids]}, tmp_path)
    moved = {"ids": np.array(["a", "c", "b"])}
    with pytest.raises(ValueError, match=r"other/seed1/ablate_eval.npz: its held-out proteins differ from those of"):
        _same_proteins(results, {"demo": [ids, ids], "other": [ids, moved]}, tmp_path)
