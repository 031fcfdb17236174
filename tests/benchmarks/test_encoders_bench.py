"""benchmarks/encoders.py: every encoder measured, the synthetic backbone a real chain, the table written."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import encoders  # noqa: E402

from pretrain.data.featurize import peptide_bonds  # noqa: E402


def _args(**kw) -> argparse.Namespace:
    base = {"batch": 1, "layers": 1, "seq_preset": "esm2_t6_8M", "text_preset": "pubmedbert-base", "repeats": 2}
    return argparse.Namespace(**{**base, "dtype": "fp32", **kw})


def test_helix_backbone_is_one_bonded_chain_with_real_bond_lengths():
    coords = encoders.helix_backbone(40)  # (L, 4, 3): N, CA, C, O
    assert coords.shape == (40, 4, 3)
    assert bool(peptide_bonds(coords, torch.ones(40, 4, dtype=torch.bool)).all())
    ca_step = (coords[1:, 1] - coords[:-1, 1]).norm(dim=-1)
    assert torch.allclose(ca_step, torch.full_like(ca_step, 3.8), atol=0.15)  # the CA-CA distance of a helix


def test_fused_attention_saves_less_for_backward_than_the_reference():
    """At L = 300 the reference keeps every head's L x L probabilities; the fused path does not."""
    cpu = torch.device("cpu")
    ref = encoders.measure("sequence-reference", _args(), 300, cpu)
    fused = encoders.measure("sequence-fused", _args(), 300, cpu)
    assert ref["memory_kind"] == fused["memory_kind"] == "saved"
    heads, tokens = 20, 302
    assert ref["memory_bytes"] - fused["memory_bytes"] >= 0.9 * heads * tokens**2 * 4  # ~ one fp32 L x L a head
    assert len(ref["times_s"]) == 2 and ref["min_s"] <= ref["median_s"] <= ref["max_s"]


def test_structure_memory_grows_with_length():
    cpu = torch.device("cpu")
    short, long = (encoders.measure("structure", _args(repeats=1), n, cpu) for n in (16, 64))
    assert short["layers"] == 3 and long["memory_bytes"] > 3 * short["memory_bytes"]  # nodes and edges grow with L


def test_main_measures_each_encoder_and_writes_the_table(tmp_path):
    out, raw = tmp_path / "bench.md", tmp_path / "raw.json"
    argv = ["--lengths", "16", "520", "--encoders", "text", "sequence-fused", "--seq-preset", "esm2_t6_8M"]
    assert encoders.main([*argv, "--layers", "1", "--repeats", "1", "--out", str(out), "--json", str(raw)]) == 0
    rows = json.loads(raw.read_text())["rows"]
    got = {(r["encoder"], r["length"]) for r in rows}
    assert got == {("text", 16), ("sequence-fused", 16), ("sequence-fused", 520)}  # BERT holds 512 positions
    assert all(r["memory_bytes"] > 0 and r["median_s"] > 0 for r in rows)
    assert all(0 < r["cpu_min_s"] <= r["cpu_median_s"] <= r["cpu_max_s"] for r in rows)  # process CPU time too
    assert "| sequence-fused | 520 | 1 |" in out.read_text()
