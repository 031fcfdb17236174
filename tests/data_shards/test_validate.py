"""``python -m data_shards`` demo / inspect / validate, run as a user would (data_shards/validate.py,
data_shards/__main__.py)."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_shards.validate import validate_dir

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "data_shards", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture
def heldout_copy(small_demo, tmp_path) -> Path:
    return Path(shutil.copytree(small_demo / "heldout", tmp_path / "heldout"))


def test_demo_command_writes_both_splits(tmp_path):
    args = "--num-train 24 --num-heldout 8 --samples-per-shard 10 --num-families 4 --seed 1".split()
    code, out = cli("demo", "--out", tmp_path, *args)
    assert code == 0 and out["splits"]["train"]["num_shards"] == 3 and out["splits"]["heldout"]["num_samples"] == 8
    assert (tmp_path / "train" / "manifest.json").is_file() and (tmp_path / "heldout" / "shard-000000.tar").is_file()


def test_validate_and_inspect_a_sound_directory(small_demo):
    code, report = cli("validate", small_demo / "train")
    assert code == 0 and report["ok"] and report["num_samples"] == 384 and report["bad_samples"] == []
    assert all(s["ok"] for s in report["shards"])
    code, summary = cli("inspect", small_demo / "heldout", "--samples", 2)
    assert code == 0 and summary["num_samples"] == 96 and summary["coverage"]["structure"] == 1.0
    assert len(summary["samples"]) == 2 and summary["sequence_length"]["min"] >= 60
    assert summary["extra"]["split"] == "heldout"
    code, limited = cli("inspect", small_demo / "heldout", "--limit", 10)
    assert code == 0 and limited["read"] == 10 and limited["num_samples"] == 96


def test_corrupted_sample_fails_validation_naming_shard_and_key(heldout_copy):
    shard = heldout_copy / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".seq.txt"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data] = ord("7")  # not an amino acid
    shard.write_bytes(bytes(data))
    code, report = cli("validate", heldout_copy)
    assert code == 1 and not report["ok"]
    bad = report["bad_samples"]
    assert bad == [{"shard": "shard-000001.tar", "key": member.name.split(".")[0], "reason": bad[0]["reason"]}]
    assert "sequence" in bad[0]["reason"]
    errors = next(s for s in report["shards"] if s["name"] == "shard-000001.tar")["errors"]
    assert any("sha256" in e for e in errors)
    assert next(s for s in report["shards"] if s["name"] == "shard-000000.tar")["ok"]


def test_truncated_or_missing_shard_fails_validation(heldout_copy):
    shard = heldout_copy / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    report = validate_dir(heldout_copy)
    assert not report["ok"] and any("shard-000000.tar" in e for e in report["shards"][0]["errors"])
    code, summary = cli("inspect", heldout_copy)  # inspect names the bad shard too, and says so by its exit code
    assert code == 1 and summary["bad_samples"] == 48
    assert [p["shard"] for p in summary["problems"]] == ["shard-000000.tar"] and summary["problems"][0]["reason"]
    shard.unlink()
    code, report = cli("validate", heldout_copy)
    assert code == 1 and "missing" in report["shards"][0]["errors"][0]


def test_missing_or_broken_manifest_exits_2(heldout_copy, tmp_path):
    code, report = cli("validate", tmp_path / "nowhere")
    assert code == 2 and "nowhere" in report["error"]
    (heldout_copy / "manifest.json").write_text("{ broken")
    code, report = cli("validate", heldout_copy)
    assert code == 2 and "manifest.json" in report["error"]
    code, report = cli("inspect", heldout_copy)
    assert code == 2 and "invalid JSON" in report["error"]


def test_manifest_count_mismatch_and_unlisted_shards_are_reported(heldout_copy):
    manifest = json.loads((heldout_copy / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] += 1
    manifest["num_samples"] += 1
    (heldout_copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(heldout_copy / "shard-000000.tar", heldout_copy / "stray.tar")
    report = validate_dir(heldout_copy)
    assert not report["ok"] and "48 samples, the manifest says 49" in report["shards"][0]["errors"]
    assert report["unlisted_files"] == ["stray.tar"]
