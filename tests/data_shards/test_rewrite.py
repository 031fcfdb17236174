"""``python -m data_shards rewrite`` (data_shards/rewrite.py): cache, resume, validation, shards out."""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from data_shards.__main__ import main
from data_shards.build import BuildConfig, build_shards
from data_shards.llm_backends import EndpointError, GenerationParams, HFBackend, OpenAIBackend
from data_shards.manifest import load_manifest
from data_shards.reader import iter_records
from data_shards.rewrite import (
    RewriteConfig,
    RewriteError,
    annotation_text,
    cache_key,
    check_rewrite,
    make_prompt,
    rewrite_shards,
)
from data_shards.schema import ProteinRecord
from data_shards.text_rules import augment_text
from data_shards.validate import inspect_dir, validate_dir
from data_shards.writer import ShardWriter
from tests.data_shards.local_llm_server import LocalLLMServer, ServerState, default_reply
from tests.data_shards.tiny_causal_lm import make_tiny_causal_lm

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
FIELDS = {
    "name": "Serine kinase X",
    "function": "Phosphorylates serine residues (EC 2.7.11.1).",
    "location": "",
    "similarity": "",
    "go": [
        {"id": "GO:0004674", "aspect": "F", "name": "protein serine kinase activity"},
        {"id": "GO:0005737", "aspect": "C", "name": "cytoplasm"},
    ],
    "ec": ["2.7.11.1"],
}


def records_on_disk(root: Path) -> list[ProteinRecord]:
    return [r for shard in load_manifest(root).shards for r in iter_records(shard.path)]


@pytest.fixture
def shards(tmp_path) -> Path:
    """Two shards (3 + 2 samples); P2 has no text, P3 and P4 provoke invented identifiers."""
    root = tmp_path / "in"
    with ShardWriter(root, samples_per_shard=3, extra={"split": "train"}) as writer:
        for i in range(5):
            text = None
            if i != 2:
                text = {
                    "name": f"Kinase {i}",
                    "go": [{"id": "GO:0004672", "aspect": "F", "name": "protein kinase activity"}],
                    "ec": ["2.7.11.1"],
                }
            writer.write(ProteinRecord(f"P{i}", "MKVLA", None, text, {"source": "test"}), {"existence": i})
    return root


def scripted_reply(body: dict) -> str:
    """Deterministic answers; Kinase 3 invents an EC number, Kinase 4 a GO id, variant 1 of Kinase 0 is empty."""
    content = body["messages"][-1]["content"]
    if "Kinase 3" in content:
        return "A kinase with EC 9.9.9.9 activity that phosphorylates proteins."
    if "Kinase 4" in content:
        return "A kinase annotated with GO:0000001 that phosphorylates proteins."
    if "Kinase 0" in content and body["seed"] == 1:
        return "   "
    return default_reply(body)


def run_cli(args: list[str], capsys) -> tuple[int, dict]:
    code = main(["rewrite", *args])
    return code, json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- prompts and checks


def test_prompt_lists_the_annotations_without_ids_or_rewrites():
    text = annotation_text({**FIELDS, "rewrites": ["old rewrite"]})
    assert text.splitlines() == [
        "Protein name: Serine kinase X",
        "Function: Phosphorylates serine residues (EC 2.7.11.1).",
        "Molecular function: protein serine kinase activity",
        "Cellular component: cytoplasm",
        "EC numbers: 2.7.11.1",
    ]
    params = GenerationParams(seed=10)
    first, second = make_prompt(FIELDS, 0, params), make_prompt(FIELDS, 1, params)
    assert first.instruction != second.instruction and (first.seed, second.seed) == (10, 11)
    keys = {
        cache_key(first, "m", params, 0),
        cache_key(second, "m", params, 1),
        cache_key(first, "other", params, 0),
        cache_key(first, "m", GenerationParams(seed=10, temperature=0.1), 0),
        cache_key(make_prompt({**FIELDS, "name": "Y"}, 0, params), "m", params, 0),
    }
    assert len(keys) == 5  # template, input, model and parameters all change the key


@pytest.mark.parametrize(
    "output, reason",
    [
        ("Serine kinase X is a cytoplasmic kinase (EC 2.7.11.1).", None),
        ("A kinase of class EC 2.7.11, found in the cytoplasm.", None),  # a class prefix of its EC
        ("A kinase of class EC 2.7.-.-, found in the cytoplasm.", None),
        ("Annotated with GO:0004674, this kinase works in the cytoplasm.", None),
        ('Description: "A cytoplasmic serine kinase."', None),
        ("A cytoplasmic kinase inhibited by staurosporine with an EC50 of 3 nM.", None),
        ("A cytoplasmic kinase (EC:2.7.11.1), also listed as EC2.7.11.1.", None),
        ("A cytoplasmic kinase (EC:2.7.11.2), a close relative.", "invented EC number"),
        ("A cytoplasmic kinase, EC 3.1.1.1, that also hydrolyses esters.", "invented EC number"),
        ("A cytoplasmic kinase, classified 3.1.1.1 by the IUBMB.", "invented EC number"),
        ("A cytoplasmic kinase of class EC 2.8, probably.", "invented EC number"),
        ("A cytoplasmic kinase (GO:0016301) with broad substrate range.", "invented GO id"),
        ("   ", "empty"),
        ("Kinase.", "too short"),
        ("kinase " * 100, "too long"),
    ],
)
def test_check_rewrite(output, reason):
    cleaned, got = check_rewrite(output, FIELDS, min_chars=20, max_chars=300)
    assert got == reason
    if output.startswith("Description"):
        assert cleaned == "A cytoplasmic serine kinase."


# ----------------------------------------------------------------------------- the run over shards


def test_rewrite_over_a_local_endpoint_then_rerun_makes_no_calls(shards, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache.sqlite"
    with LocalLLMServer(ServerState(reply=scripted_reply)) as server:
        args = ["--shards", str(shards), "--out", str(out), "--backend", "openai", "--model", "tiny"]
        args += ["--endpoint", server.url, "--cache", str(cache), "--variants", "2", "--seed", "0"]
        code, summary = run_cli(args, capsys)
        assert code == 0, summary
        assert len(server.state.requests) == 8  # 4 records with text x 2 variants
        assert summary["model_calls"] == 8 and summary["cache_hits"] == 0 and summary["records"] == 5
        assert summary["rejected"] == {"empty": 1, "invented EC number": 2, "invented GO id": 2}
        assert summary["accepted"] == 3 and summary["fallback"] == 5 and summary["records_without_text"] == 1

        assert validate_dir(out)["ok"]
        manifest = load_manifest(out)
        assert [s.num_samples for s in manifest.shards] == [3, 2]
        assert [v for s in manifest.shards for v in s.sample_props["existence"]] == [0, 1, 2, 3, 4]
        assert manifest.extra["split"] == "train" and manifest.extra["rewrite"]["backend_model"] == "openai:tiny"
        records = {r.id: r for r in records_on_disk(out)}
        assert records["P1"].text["rewrites"] == [
            "This protein (Kinase 1) is described in variant 0.",
            "This protein (Kinase 1) is described in variant 1.",
        ]
        assert records["P2"].text is None
        # rejected outputs are replaced by the rule-based description seeded from the cache key
        prompt = make_prompt(records["P3"].text, 0, GenerationParams(seed=0))
        key = cache_key(prompt, "openai:tiny", GenerationParams(seed=0), 0)
        plain = {k: v for k, v in records["P3"].text.items() if k != "rewrites"}
        assert records["P3"].text["rewrites"][0] == augment_text(plain, np.random.default_rng(int(key[:16], 16)))
        assert all("9.9.9.9" not in r and "GO:0000001" not in r for r in records["P3"].text["rewrites"])
        assert records["P0"].text["rewrites"][0].startswith("This protein (Kinase 0)")
        summary = inspect_dir(out, samples=5)  # what `python -m data_shards inspect` prints
        assert summary["texts_with_rewrites"] == 4 and summary["rewrites_per_text"]["max"] == 2
        assert [s.get("rewrites", [])[:1] for s in summary["samples"] if s["id"] == "P1"] == [
            ["This protein (Kinase 1) is described in variant 0."]
        ]
        assert inspect_dir(shards)["texts_with_rewrites"] == 0

        first_bytes = {s.name: s.path.read_bytes() for s in manifest.shards}
        code, again = run_cli([*args, "--overwrite"], capsys)
        assert code == 0 and again["model_calls"] == 0 and again["cache_hits"] == 8
        assert len(server.state.requests) == 8  # the second run made no call
        assert {s.name: s.path.read_bytes() for s in load_manifest(out).shards} == first_bytes


def test_crash_midway_resumes_from_the_cache(shards, tmp_path):
    config = RewriteConfig(shards=shards, out=tmp_path / "out", variants=2, cache=tmp_path / "c.sqlite", batch_size=2)
    with LocalLLMServer(ServerState(fail_after=4)) as server:  # dies after 4 answers
        backend = OpenAIBackend(server.url, "tiny", retries=1, sleep=lambda s: None, concurrency=1)
        with pytest.raises(EndpointError, match=server.url):
            rewrite_shards(config, backend)
        assert not (tmp_path / "out" / "manifest.json").exists()  # nothing half-written is listed
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM rewrites").fetchone()[0] == 4  # committed batches survive
    with LocalLLMServer() as server:
        backend = OpenAIBackend(server.url, "tiny", concurrency=1)
        summary = rewrite_shards(config, backend)
        assert len(server.state.requests) == 4 and summary["cache_hits"] == 4 and summary["model_calls"] == 4
    assert summary["ok"] and validate_dir(tmp_path / "out")["ok"]


@pytest.mark.parametrize("concurrency", [1, 2])
def test_answers_of_the_failed_batch_are_cached(shards, tmp_path, concurrency):
    config = RewriteConfig(shards=shards, out=tmp_path / "out", variants=2, cache=tmp_path / "c.sqlite", batch_size=2)
    with LocalLLMServer(ServerState(fail_after=5)) as server:  # dies inside the third batch
        backend = OpenAIBackend(server.url, "tiny", retries=1, sleep=lambda s: None, concurrency=concurrency)
        with pytest.raises(EndpointError, match=server.url):
            rewrite_shards(config, backend)
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM rewrites").fetchone()[0] == 5  # not 4: the fifth answer is kept
    with LocalLLMServer() as server:
        summary = rewrite_shards(config, OpenAIBackend(server.url, "tiny", concurrency=1))
    assert summary["cache_hits"] == 5 and summary["model_calls"] == summary["items"] - 5


def test_unreachable_endpoint_exits_2_naming_it(shards, tmp_path, capsys):
    from tests.data_shards.test_llm_backends import closed_port

    url = f"http://127.0.0.1:{closed_port()}"
    args = ["--shards", str(shards), "--out", str(tmp_path / "out"), "--backend", "openai", "--model", "m"]
    code, result = run_cli([*args, "--endpoint", url, "--retries", "0"], capsys)
    assert code == 2 and result["error"].startswith(f"{url}/v1/chat/completions: unreachable")


def test_bad_arguments(shards, tmp_path, capsys):
    with LocalLLMServer() as server:
        backend = OpenAIBackend(server.url, "m")
        with pytest.raises(RewriteError, match="must differ"):
            rewrite_shards(RewriteConfig(shards=shards, out=shards), backend)
        with pytest.raises(RewriteError, match="variants"):
            rewrite_shards(RewriteConfig(shards=shards, out=tmp_path / "o", variants=0), backend)
        (tmp_path / "junk.sqlite").write_bytes(b"this is not sqlite" * 100)
        with pytest.raises(RewriteError, match="junk.sqlite"):
            rewrite_shards(RewriteConfig(shards=shards, out=tmp_path / "o", cache=tmp_path / "junk.sqlite"), backend)
        assert server.state.requests == []
    code, result = run_cli(
        ["--shards", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--backend", "openai", "--model", "m"],
        capsys,
    )
    assert code == 2 and "--endpoint" in result["error"]


def test_fallback_none_keeps_only_accepted_rewrites(shards, tmp_path):
    config = RewriteConfig(shards=shards, out=tmp_path / "out", variants=2, fallback="none")
    with LocalLLMServer(ServerState(reply=scripted_reply)) as server:
        summary = rewrite_shards(config, OpenAIBackend(server.url, "tiny"))
    assert summary["dropped"] == 5 and summary["fallback"] == 0
    records = {r.id: r for r in records_on_disk(tmp_path / "out")}
    assert "rewrites" not in records["P3"].text and len(records["P0"].text["rewrites"]) == 1
    assert (tmp_path / "out" / "rewrite-cache.sqlite").exists()  # default cache location


def test_local_transformers_model_end_to_end(shards, tmp_path, capsys):
    model = make_tiny_causal_lm(tmp_path / "lm")
    out, cache = tmp_path / "out", tmp_path / "cache.sqlite"
    args = ["--shards", str(shards), "--out", str(out), "--backend", "hf", "--model", str(model)]
    args += ["--cache", str(cache), "--variants", "1", "--temperature", "0", "--max-new-tokens", "12"]
    code, summary = run_cli(args, capsys)
    assert code == 0 and summary["model_calls"] == 4 and summary["backend_model"].startswith("hf:lm@")
    assert summary["accepted"] + summary["fallback"] == 4
    # the stored text is the model's own greedy output for that prompt
    backend = HFBackend(model)
    record = next(r for r in records_on_disk(shards) if r.id == "P1")
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    expected = " ".join(backend.generate([make_prompt(record.text, 0, params)], params)[0].split())
    written = next(r for r in records_on_disk(out) if r.id == "P1")
    if check_rewrite(expected, record.text, 20, 1200)[1] is None:
        assert written.text["rewrites"] == [expected]
    code, again = run_cli([*args, "--overwrite"], capsys)
    assert code == 0 and again["model_calls"] == 0 and again["cache_hits"] == 4


@pytest.mark.skipif(not (SHARED / "uniprot" / "emboss_seq.dat").exists(), reason="shared data not present")
def test_real_uniprot_entries(tmp_path):
    built = build_shards(
        BuildConfig(out=tmp_path / "in", uniprot=[str(SHARED / "uniprot" / "emboss_seq.dat")], samples_per_shard=40)
    )
    assert built["ok"]
    with LocalLLMServer() as server:
        summary = rewrite_shards(
            RewriteConfig(shards=tmp_path / "in", out=tmp_path / "out", variants=1), OpenAIBackend(server.url, "m")
        )
        requests = len(server.state.requests)
    with_text = [r for r in records_on_disk(tmp_path / "in") if r.text]
    distinct = {annotation_text(r.text) for r in with_text}  # orthologues often share all text
    assert requests == summary["model_calls"] == len(distinct) > 50 and len(with_text) > len(distinct)
    assert summary["accepted"] == len(with_text) and validate_dir(tmp_path / "out")["ok"]
    first = with_text[0]
    _, body = next((p, b) for p, b in server.state.requests if f"Protein name: {first.text['name']}" in str(b))
    assert first.text["name"] in body["messages"][1]["content"]


def test_rerunning_on_rewritten_shards_replaces_the_old_rewrites(shards, tmp_path):
    with LocalLLMServer(ServerState(reply=scripted_reply)) as server:
        rewrite_shards(RewriteConfig(shards=shards, out=tmp_path / "a", variants=1), OpenAIBackend(server.url, "m"))
        config = RewriteConfig(shards=tmp_path / "a", out=tmp_path / "b", variants=1, fallback="none")
        summary = rewrite_shards(config, OpenAIBackend(server.url, "m2"))
    assert summary["cache_hits"] == 0  # another model id: new keys
    before = {r.id: r for r in records_on_disk(tmp_path / "a")}
    after = {r.id: r for r in records_on_disk(tmp_path / "b")}
    assert len(before["P3"].text["rewrites"]) == 1 and "rewrites" not in after["P3"].text  # fallback dropped
    assert after["P1"].text["rewrites"] == before["P1"].text["rewrites"]  # same reply, same prompt


def test_a_record_without_annotation_text_loses_its_stale_rewrites(tmp_path):
    """Rewrites are replaced on every record: one with nothing to rewrite (a GO term without a name)
    must not keep the rewrites of an earlier run."""
    root = tmp_path / "in"
    stale = {"go": [{"id": "GO:0004672", "aspect": "F", "name": ""}], "rewrites": ["STALE rewrite from an older run."]}
    with ShardWriter(root, samples_per_shard=3, extra={"split": "train"}) as writer:
        writer.write(ProteinRecord("P0", "MKVLA", None, {"name": "Kinase 0"}, {"source": "test"}))
        writer.write(ProteinRecord("P1", "MKVLA", None, stale, {"source": "test"}))
    with LocalLLMServer(ServerState(reply=scripted_reply)) as server:
        summary = rewrite_shards(
            RewriteConfig(shards=root, out=tmp_path / "out", variants=1), OpenAIBackend(server.url, "m")
        )
    after = {r.id: r for r in records_on_disk(tmp_path / "out")}
    assert summary["records_without_text"] == 1
    assert "rewrites" not in after["P1"].text and after["P1"].text["go"] == stale["go"]
    assert after["P0"].text["rewrites"]
