"""Zero-shot mutation effect: masked marginals of a tiny random ESM-2 against a direct forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.benchmark import mutation as mut
from pretrain.benchmark.go_similarity import spearman
from pretrain.models.sequence_encoder import SequenceEncoder, SequenceEncoderConfig

WT = "MKTAYIAKQRQISFVKSHFSRQ"
ROWS = [("K2R", 0.3), ("A4G", -1.2), ("K2R:Q9E", 0.1), ("Y5W", -0.4), ("S13A:F14L", -2.0), ("R21K", 0.8)]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SequenceEncoder(SequenceEncoderConfig(num_layers=1, embed_dim=32, attention_heads=4))


def _csv(path, rows, extra=None):
    header = "mutant,DMS_score" + (",mutated_sequence" if extra else "")
    lines = [f"{m},{s}" + (f",{extra(m)}" if extra else "") for m, s in rows]
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def _direct(encoder, seq, position, wt, mt, offset=0):
    """log p(mt) - log p(wt) at ``position`` (1-based on ``seq``) masked, by one plain ESM2 forward."""
    a = encoder.alphabet
    tokens = torch.tensor([[a.cls_idx, *(a.get_idx(c) for c in seq), a.eos_idx]])
    tokens[0, position - offset] = a.mask_idx
    encoder.eval()
    with torch.no_grad():
        logp = torch.log_softmax(encoder.esm(tokens)["logits"][0, position - offset].double(), -1)
    return float(logp[a.get_idx(mt)] - logp[a.get_idx(wt)])


def test_scores_match_a_direct_forward_pass_and_spearman(tmp_path, encoder):
    path = _csv(tmp_path / "dms.csv", ROWS, extra=lambda m: mut.apply(WT, mut.parse_mutant(m, WT)))
    out = mut.mutation_benchmark(encoder, WT, path, resamples=200, batch_size=3)
    texts, variants, dms = mut.read_dms_csv(path, WT)
    scores = mut.masked_marginal_scores(encoder, WT, variants)
    assert texts[2] == "K2R:Q9E" and variants[2] == [mut.Substitution("K", 2, "R"), mut.Substitution("Q", 9, "E")]
    hand = _direct(encoder, WT, 2, "K", "R") + _direct(encoder, WT, 9, "Q", "E")
    assert scores[2] == pytest.approx(hand, abs=1e-5)
    assert scores[0] == pytest.approx(_direct(encoder, WT, 2, "K", "R"), abs=1e-5)
    assert out["spearman"]["value"] == pytest.approx(spearman(scores, dms))
    assert out["n_variants"] == 6 and out["n_multi_mutants"] == 2 and out["n_positions"] == 7
    assert out["spearman"]["low"] <= out["spearman"]["value"] <= out["spearman"]["high"]
    assert encoder.training is False
    # synonymous substitution scores 0; the file's numbering can start elsewhere
    assert mut.masked_marginal_scores(encoder, WT, [mut.parse_mutant("K2K", WT)])[0] == 0.0
    shifted = mut.parse_mutant("K101R", WT, first_position=100)
    assert shifted == [mut.Substitution("K", 2, "R")]


def test_long_sequence_is_scored_in_a_window(encoder):
    short = SequenceEncoder(SequenceEncoderConfig(num_layers=1, embed_dim=32, attention_heads=4, max_length=8))
    short.load_state_dict(encoder.state_dict())
    # position 14 (F) of 22 in an 8-residue window: start = 14 - 1 - 4 = 9 -> residues 10..17
    score = mut.masked_marginal_scores(short, WT, [[mut.Substitution("F", 14, "L")]])[0]
    assert score == pytest.approx(_direct(encoder, WT[9:17], 14, "F", "L", offset=9), abs=1e-5)
    end = mut.masked_marginal_scores(short, WT, [[mut.Substitution("Q", 22, "E")]])[0]
    assert end == pytest.approx(_direct(encoder, WT[14:22], 22, "Q", "E", offset=14), abs=1e-5)


def test_bad_rows_are_clear_errors(tmp_path, encoder):
    with pytest.raises(ValueError, match=r"bad.csv row 3: mutant 'A2G': says position 2 is A but the wild-type "):
        mut.read_dms_csv(_csv(tmp_path / "bad.csv", [("K2R", 1), ("A2G", 2)]), WT)
    with pytest.raises(ValueError, match=r"row 2: mutant 'K99R': position 99 is outside"):
        mut.read_dms_csv(_csv(tmp_path / "far.csv", [("K99R", 1)]), WT)
    with pytest.raises(ValueError, match=r"row 2: mutant 'K2R:K2A': position 2 is mutated twice"):
        mut.read_dms_csv(_csv(tmp_path / "twice.csv", [("K2R:K2A", 1)]), WT)
    with pytest.raises(ValueError, match=r"row 2: mutant 'K2B'.*'B' is not one of the 20"):
        mut.read_dms_csv(_csv(tmp_path / "letter.csv", [("K2B", 1)]), WT)
    with pytest.raises(ValueError, match=r"row 2: DMS_score 'x' is not a number"):
        mut.read_dms_csv(_csv(tmp_path / "score.csv", [("K2R", "x")]), WT)
    with pytest.raises(ValueError, match=r"row 2: mutated_sequence differs"):
        mut.read_dms_csv(_csv(tmp_path / "seq.csv", [("K2R", 1)], extra=lambda m: WT), WT)
    (tmp_path / "cols.csv").write_text("variant,score\nK2R,1\n")
    with pytest.raises(ValueError, match=r"cols.csv: no column\(s\) \['mutant', 'DMS_score'\]"):
        mut.read_dms_csv(tmp_path / "cols.csv", WT)
    with pytest.raises(ValueError, match="Spearman needs at least 3"):
        mut.mutation_benchmark(encoder, WT, _csv(tmp_path / "two.csv", ROWS[:2]))
    with pytest.raises(TypeError, match="no ESM-2 sequence encoder"):
        mut.masked_log_probs(torch.nn.Linear(2, 2), WT, [1])
    assert np.isfinite(mut.masked_marginal_scores(encoder, WT.lower(), [mut.parse_mutant("M1A", WT)])).all()
