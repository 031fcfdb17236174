"""benchmarks/memory.py: ZeRO model-state formulas, real parameter counts, the README table."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch

from pretrain.config import CONFIGS_DIR
from pretrain.models.sequence_encoder import ESM2_PRESETS, SequenceEncoder, SequenceEncoderConfig
from tests.conftest import REPO


def _load_memory():
    spec = importlib.util.spec_from_file_location("memory_benchmark", REPO / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


mem = _load_memory()


def test_zero_paper_worked_example():
    """Rajbhandari et al. 2020, fig. 1: 7.5B parameters, N_d = 64, K = 12."""
    gb = {stage: mem.model_state_bytes(7.5e9, stage, 64) / 1e9 for stage in (0, 1, 2, 3)}
    assert round(gb[0], 1) == 120.0
    assert round(gb[1], 1) == 31.4
    assert round(gb[2], 1) == 16.6
    assert round(gb[3], 1) == 1.9
    assert mem.model_state_bytes(10, 3, 1) == mem.model_state_bytes(10, 0, 7) == 160  # no sharding at N_d = 1
    with pytest.raises(ValueError, match="stage=4"):
        mem.model_state_bytes(1, 4, 8)


def _esm2_params(layers: int, h: int, heads: int, vocab: int = 33) -> int:
    """fair-esm ESM2, counted by hand: embeddings, 12h^2 + 13h per layer, final LN, contact head, LM head."""
    per_layer = 4 * (h * h + h) + 2 * h + (h * 4 * h + 4 * h) + (4 * h * h + h) + 2 * h
    lm_head = (h * h + h) + 2 * h + vocab  # dense, layer norm, bias (weight tied to the embeddings)
    return vocab * h + layers * per_layer + 2 * h + (layers * heads + 1) + lm_head


NOMINAL = {
    "esm2_t6_8M": 8e6,
    "esm2_t12_35M": 35e6,
    "esm2_t30_150M": 150e6,
    "esm2_t33_650M": 650e6,
    "esm2_t36_3B": 3e9,
    "esm2_t48_15B": 15e9,
}


@pytest.mark.parametrize("preset", sorted(ESM2_PRESETS))
def test_esm2_parameter_counts_on_meta(preset):
    with torch.device("meta"):
        enc = SequenceEncoder(SequenceEncoderConfig(preset=preset))
    n = sum(p.numel() for p in enc.parameters())
    assert n == _esm2_params(*ESM2_PRESETS[preset])
    # The published names are rounded: 8M is 7.51M and 3B is 2.84B, so "a few %" means up to 7 % here.
    assert abs(n / NOMINAL[preset] - 1) < 0.07, (preset, n)


# kept GB of one bf16 forward, measured on an NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130) with
# benchmarks/activation_memory.py (BENCHMARKS.md): (layers, width, heads, tokens, batch) -> GB
H100_ESM2 = {(33, 1280, 20, 452, 16): 27.73, (36, 2560, 40, 452, 8): 30.21, (36, 2560, 40, 452, 6): 22.74}
H100_ESM2 |= {(48, 5120, 40, 452, 4): 30.80, (48, 5120, 40, 452, 3): 23.16}
H100_BERT = {16: 2.60, 8: 1.30, 6: 0.98, 4: 0.66, 3: 0.50}  # bert-base, 512 tokens, SDPA


def test_activation_formulas_by_hand_and_against_the_h100_measurements():
    assert mem.esm2_layer_bytes(2, 1, 4, 2) == 2 * 1 * 4 * (48 + 6 * 2 * 2 / 4)
    assert mem.bert_layer_bytes(2, 1, 4, 2) == 34 * 2 * 1 * 4
    for (layers, h, a, s, b), gb in H100_ESM2.items():
        assert layers * mem.esm2_layer_bytes(s, b, h, a) / 1e9 == pytest.approx(gb, rel=0.01)
    for b, gb in H100_BERT.items():
        assert 12 * mem.bert_layer_bytes(512, b, 768, 12) / 1e9 == pytest.approx(gb, rel=0.04)
    t = mem.Transformer("esm2", layers=3, hidden=4, heads=2, tokens=2, passes=2)
    layer = mem.esm2_layer_bytes(2, 5, 4, 2)
    assert mem.activation_bytes([t], 5) == 2 * 3 * layer
    assert mem.activation_bytes([t], 5, checkpointed=True) == 2 * 3 * (2 * 2 * 5 * 4) + layer


def test_plans_match_the_recipes_and_the_big_ones_fit():
    rows = {plan.recipe: mem.compute_row(plan) for plan in mem.PLANS}
    for name in ("align_pro_3B", "align_pro_15B"):
        header = (CONFIGS_DIR / "recipes" / f"{name}.yaml").read_text()
        plan = rows[name].plan
        assert f"--config zero{plan.zero_stage}.json" in header
        assert f"{plan.gpus} ranks" in header
        assert rows[name].total_gb <= mem.GPU_MEMORY_GB - mem.RESERVE_GB  # fits without activation checkpointing
    assert 2.8e9 < rows["align_pro_3B"].counts["total"] < 3.1e9
    assert 15.0e9 < rows["align_pro_15B"].counts["total"] < 15.5e9
    assert "bert×0" in rows["protclip_650M"].passes  # its text encoder is frozen: no activations kept
    c = rows["align_pro_650M"].counts
    assert c["total"] == c["sequence"] + c["structure"] + c["text"] + c["heads"]
    assert 105e6 < c["text"] < 112e6  # BERT-base without pooler, 30522-token vocabulary


def test_readme_holds_the_current_table():
    rows = [mem.compute_row(plan) for plan in mem.PLANS]
    readme = (REPO / "README.md").read_text()
    assert mem.readme_section(rows) in readme, "README memory table is stale: run python benchmarks/memory.py"


def test_write_readme_replaces_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\ntext\n")
    mem.write_readme(f"{mem.README_BEGIN}\nold\n{mem.README_END}", readme)
    mem.write_readme(f"{mem.README_BEGIN}\nnew\n{mem.README_END}", readme)
    text = readme.read_text()
    assert text.count(mem.README_BEGIN) == 1 and "new" in text and "old" not in text
    assert re.search(r"### Memory per GPU \(computed\)", text) and text.startswith("# title\n\ntext\n")


def test_fused_esm2_formula_matches_a_fresh_measurement():
    """The fitted fused-attention formula against one ESM-2 layer measured now with saved-tensor hooks
    (CPU, bf16 and fp32, real 8M width, no L x L term: the reference path keeps far more at the same point)."""
    import esm_fused_memory  # on sys.path through memory.py

    s, b, h, a = 130, 2, 320, 20
    bf16 = esm_fused_memory.layer_saved_bytes(s, b, h, a, "bf16")
    fp32 = esm_fused_memory.layer_saved_bytes(s, b, h, a, "fp32")
    assert mem.esm2_fused_layer_bytes(s, b, h, a) == pytest.approx(bf16, rel=0.01)
    assert mem.esm2_fused_layer_bytes(s, b, h, a, element_bytes=4) == pytest.approx(fp32, rel=0.01)
    reference = esm_fused_memory.layer_saved_bytes(s, b, h, a, "bf16", mode="reference")
    assert reference - bf16 > 0.9 * 6 * a * s * s * b  # fp32 probabilities and their bf16 copy, gone when fused


def test_fit_recovers_the_coefficients_of_its_features():
    import esm_fused_memory

    pts = list(esm_fused_memory.FIT_POINTS)
    kept = [esm_fused_memory.esm2_fused_layer_bytes(*p) for p in pts]
    assert esm_fused_memory.fit(pts, kept) == pytest.approx([48, 4, 8, 4], rel=1e-6)
    quadratic = esm_fused_memory.fit(pts, [k + 3 * p[3] * p[0] ** 2 * p[1] for k, p in zip(kept, pts)], True)
    assert quadratic[-1] == pytest.approx(3, rel=1e-6)  # an a·s²·b term would show


def test_the_recipes_attention_picks_the_esm2_formula():
    recipe = CONFIGS_DIR / "recipes" / "align_pro_650M.yaml"
    base = ["model.sequence.weights=null", "model.text.pretrained_dir=null"]
    fused = mem.encoder_passes(mem.load_config(recipe, base))
    reference = mem.encoder_passes(mem.load_config(recipe, [*base, "model.sequence.attention=reference"]))
    assert (fused[0].name, reference[0].name) == ("esm2-fused", "esm2")  # fused is the default
    b = 16
    assert mem.activation_bytes(fused[:1], b) == fused[0].passes * fused[0].layers * mem.esm2_fused_layer_bytes(
        fused[0].tokens, b, fused[0].hidden, fused[0].heads
    )
    ratio = mem.activation_bytes(fused[:1], b) / mem.activation_bytes(reference[:1], b)
    assert ratio == pytest.approx(48 / (48 + 6 * 20 * 452 / 1280), rel=0.01)  # the a·s²·b term gone: 0.53x
