"""python -m pretrain.ablate: R@10 extraction, the README table, and a real two-variant run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pretrain import ablate
from pretrain.config import CONFIGS_DIR
from tests.conftest import REPO, TINY_OVERRIDES, cpu_env

DIRECTIONS = ("seq->struct", "struct->seq", "seq->text", "text->seq", "struct->text", "text->struct")


def _eval_json(run_dir, values):
    run_dir.mkdir(parents=True)
    directions = {d: {"n": 100, "R@10": v, "chance_R@10": 0.1} for d, v in zip(DIRECTIONS, values)}
    (run_dir / "eval.json").write_text(json.dumps({"retrieval": {"directions": directions}}))


def test_read_r10_averages_both_directions_of_each_pair(tmp_path):
    _eval_json(tmp_path / "v", [0.1, 0.3, 0.2, 0.4, 0.0, 0.6])
    r10, chance = ablate.read_r10(tmp_path / "v")
    assert r10 == pytest.approx({"seq<->struct": 0.2, "seq<->text": 0.3, "struct<->text": 0.3, "mean": 1.6 / 6})
    assert chance == 0.1
    with pytest.raises(RuntimeError, match="eval.json is missing"):
        ablate.read_r10(tmp_path / "nothing")


def test_readme_section_is_replaced_not_duplicated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{ablate.README_BEGIN}\nold table\n{ablate.README_END}\n\nafter\n")
    ablate.write_readme(f"{ablate.README_BEGIN}\nnew table\n{ablate.README_END}", readme)
    text = readme.read_text()
    assert "new table" in text and "old table" not in text and text.endswith("\n\nafter\n")
    assert text.count(ablate.README_BEGIN) == 1


def test_bad_recipe_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  alhpa: 1\n")
    assert ablate.main(["--recipes", str(bad), "--run-root", str(tmp_path / "runs")]) == 2
    assert "unknown config key 'loss.alhpa'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_variants_train_evaluate_and_fill_the_table(tmp_path, small_demo):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{ablate.README_BEGIN}\n{ablate.README_END}\n")
    recipes = [CONFIGS_DIR / "recipes" / "demo.yaml", CONFIGS_DIR / "recipes" / "ablations" / "demo_seq_text.yaml"]
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
    cmd += ["--recipes", *map(str, recipes)]
    for o in over:
        cmd += ["--set", o]
    p = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`demo`", "`demo_seq_text`"]
    assert "| 1/1/1; 0.1/0.1/0.1; yes | 2 |" in rows[0] and "| 0/1/0; 0.1/0/0.1; yes | 2 |" in rows[1]
    result = json.loads((tmp_path / "runs" / "ablation.json").read_text())["results"]
    for r, name in zip(result, ("demo", "demo_seq_text")):
        want = ablate.read_r10(tmp_path / "runs" / name)[0]
        assert r["variant"] == name and r["r10"] == want
        assert 0.0 <= want["mean"] <= 1.0
    # Running it again reuses the finished runs: no training, same table.
    again = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already finished at step 2" in (tmp_path / "runs" / "demo" / "ablate.log").read_text()
