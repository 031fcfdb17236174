"""python -m pretrain.ablate: metric extraction, the paired t-test, the table, and a real seeded run."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest

from pretrain import ablate
from pretrain.config import CONFIGS_DIR
from tests.conftest import REPO, TINY_OVERRIDES, cpu_env

DIRECTIONS = ("seq->struct", "struct->seq", "seq->text", "text->seq", "struct->text", "text->struct")


def _retrieval(values):
    return {"directions": {d: {"n": 100, "R@10": v, "chance_R@10": 0.1} for d, v in zip(DIRECTIONS, values)}}


def test_r10_averages_both_directions_of_each_pair():
    r10, chance = ablate.r10_of({"retrieval": _retrieval([0.1, 0.3, 0.2, 0.4, 0.0, 0.6])}, "x")
    assert r10 == pytest.approx({"seq<->struct": 0.2, "seq<->text": 0.3, "struct<->text": 0.3, "mean": 1.6 / 6})
    assert chance == 0.1
    with pytest.raises(RuntimeError, match=r"x: no R@10 for \['seq->struct'"):
        ablate.r10_of({"retrieval": {"directions": {}}}, "x")
    with pytest.raises(ValueError, match="x: not a retrieval evaluation"):
        ablate.r10_of({"retrieval": []}, "x")


def test_run_metrics_read_fmax_and_fold_of_the_chosen_method():
    result = {
        "retrieval": _retrieval([0.1] * 6),
        "function": {
            "GO-MF": {"methods": {"probe/concat": {"fmax": 0.4}, "probe/sequence": {"fmax": 0.3}}},
            "GO-BP": {"skipped": "no held-out protein has a label"},
            "EC": {"methods": {"probe/concat": {"fmax": 0.7}}},
        },
        "fold": {"methods": {"probe/concat": {"accuracy": 0.9}}},
    }
    metrics, chance = ablate.run_metrics(result, "probe/concat", "x")
    assert metrics["GO-MF Fmax"] == 0.4 and metrics["EC Fmax"] == 0.7 and metrics["fold accuracy"] == 0.9
    assert metrics["GO-BP Fmax"] is None and metrics["GO-CC Fmax"] is None and metrics["mean"] == pytest.approx(0.1)
    assert ablate.run_metrics(result, "probe/sequence", "x")[0]["GO-MF Fmax"] == 0.3
    assert chance == 0.1 and ablate.run_metrics({}, "probe/concat", "x") == (dict.fromkeys(ablate.COLUMNS), None)


def test_paired_t_test_by_hand_and_at_its_nominal_rate():
    # diffs 1, 2, 4: mean 7/3, s.d. sqrt(7/3), t = sqrt(7); 2 d.f.: p = 1 - |t| / sqrt(t^2 + 2)
    out = ablate.paired_t_test([1.0, 2.0, 4.0], [0.0, 0.0, 0.0])
    assert out["t"] == pytest.approx(math.sqrt(7)) and out["p"] == pytest.approx(1 - math.sqrt(7) / 3)
    # 1 d.f. (Cauchy): p = 1 - 2 atan|t| / pi
    one = ablate.paired_t_test([1.0, 3.0], [0.5, 0.0])  # diffs 0.5, 3: t = 1.75 / (1.7678 / sqrt 2) = 1.4
    assert one["p"] == pytest.approx(1 - 2 * math.atan(abs(one["t"])) / math.pi)
    for df, t_crit in ((2, 4.302653), (4, 2.776445), (10, 2.228139)):  # textbook two-sided 5 % critical values
        assert ablate._betainc(df / 2, 0.5, df / (df + t_crit**2)) == pytest.approx(0.05, abs=1e-5)
    assert ablate.paired_t_test([1.0, 2.0], [0.0, 1.0])["p"] == 0.0  # a constant shift
    assert ablate.paired_t_test([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    assert ablate.paired_t_test([1.0, None, 3.0], [0.0, 1.0, None])["p"] is None  # one seed-matched pair
    rng = random.Random(0)  # no true difference: p < 0.05 in about 5 % of 3-seed experiments
    hits = sum(
        ablate.paired_t_test([rng.gauss(0, 1) for _ in range(3)], [rng.gauss(0, 1) for _ in range(3)])["p"] < 0.05
        for _ in range(4000)
    )
    assert 0.04 < hits / 4000 < 0.06


def _result(name, values_by_seed, **kw):
    runs = [{"seed": s, "metrics": {**dict.fromkeys(ablate.COLUMNS), **m}, "wall_s": 1.0} for s, m in values_by_seed]
    return ablate.Result(name, f"{name}.yaml", "1/1/1; 0.1/0.1/0.1; yes", 2, [s for s, _ in values_by_seed], runs, **kw)


def test_summary_and_table_mark_significant_differences_only():
    full = _result(
        "demo",
        [(0, {"mean": 0.30, "EC Fmax": 0.5}), (1, {"mean": 0.32, "EC Fmax": 0.6}), (2, {"mean": 0.31, "EC Fmax": 0.4})],
    )
    worse = _result(
        "demo_x",
        [
            (0, {"mean": 0.20, "EC Fmax": 0.6}),
            (1, {"mean": 0.215, "EC Fmax": 0.4}),
            (2, {"mean": 0.205, "EC Fmax": 0.5}),
        ],
    )
    for r in (full, worse):
        ablate.summarise(r, full, 0.05)
    assert full.mean["mean"] == pytest.approx(0.31) and full.sd["mean"] == pytest.approx(0.01) and full.tests == {}
    assert worse.tests["mean"]["significant"] and not worse.tests["EC Fmax"]["significant"]
    assert worse.tests["mean"]["mean_diff"] == pytest.approx(-0.31 / 3)
    table = ablate.markdown_table([full, worse])
    header, _, row_full, row_worse = table.splitlines()
    assert "mean R@10" in header and "EC Fmax" in header and "GO-MF Fmax" not in header  # no value: no column
    assert "| 0.310 ± 0.010 | 0.500 ± 0.100 |" in row_full
    assert "| 0.207 ± 0.008* | 0.500 ± 0.100 |" in row_worse and "| 3 |" in row_worse


def test_readme_section_is_replaced_not_duplicated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{ablate.README_BEGIN}\nold table\n{ablate.README_END}\n\nafter\n")
    ablate.write_readme(f"{ablate.README_BEGIN}\nnew table\n{ablate.README_END}", readme)
    text = readme.read_text()
    assert "new table" in text and "old table" not in text and text.endswith("\n\nafter\n")
    assert text.count(ablate.README_BEGIN) == 1


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  alhpa: 1\n")
    assert ablate.main(["--recipes", str(bad), "--run-root", str(tmp_path / "runs")]) == 2
    assert "unknown config key 'loss.alhpa'" in capsys.readouterr().err
    demo = str(CONFIGS_DIR / "recipes" / "demo.yaml")
    assert ablate.main(["--recipes", demo, "--run-root", str(tmp_path / "r"), "--reference", "nope"]) == 2
    assert "--reference 'nope' is not one of the variants ['demo']" in capsys.readouterr().err
    assert ablate.main(["--recipes", demo, "--run-root", str(tmp_path / "r"), "--tasks", "retrieval,gogo"]) == 2
    assert "unknown eval task(s) ['gogo']" in capsys.readouterr().err
    assert ablate._weights(str(CONFIGS_DIR / "recipes" / "ablations" / "demo_seq_text.yaml"), []) == (
        "0/1/0; 0.1/0/0.1; yes",
        150,
    )
    # overlays that differ only in an objective switch are told apart in the table
    ablations = CONFIGS_DIR / "recipes" / "ablations"
    assert ablate._weights(str(ablations / "demo_per_term_temperature.yaml"), [])[0].endswith("; temperature per_term")
    assert ablate._weights(str(ablations / "demo_text_lr_0p1.yaml"), [])[0].endswith("; lr × text 0.1")
    assert ablate._weights(str(ablations / "demo_protclip_pda_gumbel.yaml"), [])[0].endswith(
        "; objective protclip; PDA gumbel"
    )


@pytest.mark.slow
def test_seeds_base_row_and_statistics_from_real_runs(tmp_path, small_demo):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{ablate.README_BEGIN}\n{ablate.README_END}\n")
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
    cmd += ["--max-train-samples", "96"]
    for o in over:
        cmd += ["--set", o]
    p = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`demo`", "`base`"]
    assert (
        "| 1/1/1; 0.1/0.1/0.1; yes | 2 | 2 |" in rows[0] and "| untrained: 1/1/1; 0.1/0.1/0.1; yes | 0 | 2 |" in rows[1]
    )
    payload = json.loads((tmp_path / "runs" / "ablation.json").read_text())
    assert payload["seeds"] == [0, 1] and payload["reference"] == "demo"
    demo, base = payload["results"]
    for r in (demo, base):
        for run in r["runs"]:
            saved = json.loads(
                (tmp_path / "runs" / r["variant"] / f"seed{run['seed']}" / "ablate_eval.json").read_text()
            )
            assert run["metrics"] == ablate.run_metrics(saved["result"], "probe/concat", "x")[0]
        for key in ("mean", "EC Fmax", "fold accuracy"):
            vals = [run["metrics"][key] for run in r["runs"]]
            assert all(v is not None for v in vals) and r["mean"][key] == pytest.approx(sum(vals) / 2)
    assert set(base["tests"]) == set(ablate.COLUMNS) and base["tests"]["mean"]["n"] == 2
    assert demo["runs"][0]["metrics"] != demo["runs"][1]["metrics"]  # the seeds differ
    # Running it again (seed 0 only) reuses the finished run and the evaluations: no training, same values.
    stamp = (tmp_path / "runs" / "demo" / "seed0" / "ablate_eval.json").stat().st_mtime_ns
    cmd[cmd.index("--seeds") + 1] = "1"
    again = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already finished at step 2" in (tmp_path / "runs" / "demo" / "seed0" / "ablate.log").read_text()
    assert (tmp_path / "runs" / "demo" / "seed0" / "ablate_eval.json").stat().st_mtime_ns == stamp
    rerun = json.loads((tmp_path / "runs" / "ablation.json").read_text())["results"]
    assert [r["runs"] for r in rerun] == [r["runs"][:1] for r in payload["results"]]
