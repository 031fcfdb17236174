"""pretrain.losses.align_pro: weighted pairwise + intra-modal terms, masking, false-negative groups.

References are built term by term from ``kernels.symmetric_infonce`` (plain terms) and the
materialised N x N oracle ``grouped_symmetric_infonce_reference`` (terms that contrast texts when
``loss.false_negatives`` is on), on one process and on 2 gloo ranks.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import symmetric_infonce
from kernels.grouped import NO_GROUP, grouped_symmetric_infonce_reference
from pretrain.config import ConfigError, LossConfig, load_config
from pretrain.losses.align_pro import AlignProLoss
from tests.spawn_ranks import run_ranks

N, DIM, WORLD, TIMEOUT_S = 12, 6, 2, 120.0  # spawned ranks import transformers and fair-esm (slow on a busy host)
MODS = ("sequence", "structure", "text")
# Text groups: 100 x3 (rows 1, 4, 9), 200 x2 (rows 2, 10), 300 x2 across the rank boundary (5, 6).
GROUPS = torch.tensor([7, 100, 200, NO_GROUP, 100, 300, 300, 8, NO_GROUP, 100, 200, 9], dtype=torch.int64)
PRESENT = {
    "sequence": torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool),
    "structure": torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
    "text": torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool),
}
CFG = LossConfig(alpha=1.0, beta=0.7, gamma=0.4, intra_seq=0.3, intra_struct=0.2, intra_text=0.5, backend="torch")


def _emb(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODS:
        for key in (m, f"{m}_view2"):
            out[key] = F.normalize(torch.randn(N, DIM, generator=g, dtype=torch.float64), dim=1)
    return out


def _reference(emb, present, s, cfg: LossConfig, groups, scales=None) -> torch.Tensor:
    """The Align-Pro total on one process: text terms deduplicated by the explicit-mask oracle.

    ``scales`` (6,): one logit scale per term in TERMS order (loss.temperature=per_term); None: ``s`` for all.
    """
    grouped = cfg.false_negatives != "none"

    def term(i, a, b, valid, text):
        si = s if scales is None else scales[i : i + 1]
        if grouped and text:
            return grouped_symmetric_infonce_reference(a, b, si, groups, valid)
        return symmetric_infonce(a, b, si, valid=valid, backend="torch")

    p = present
    return (
        cfg.alpha * term(0, emb["sequence"], emb["structure"], p["sequence"] & p["structure"], False)
        + cfg.beta * term(1, emb["sequence"], emb["text"], p["sequence"] & p["text"], True)
        + cfg.gamma * term(2, emb["structure"], emb["text"], p["structure"] & p["text"], True)
        + cfg.intra_seq * term(3, emb["sequence"], emb["sequence_view2"], p["sequence"], False)
        + cfg.intra_struct * term(4, emb["structure"], emb["structure_view2"], p["structure"], False)
        + cfg.intra_text * term(5, emb["text"], emb["text_view2"], p["text"], True)
    )


PER_TERM_SCALES = torch.tensor([3.0, 5.0, 7.0, 2.0, 4.0, 6.0], dtype=torch.float64)  # loss.temperature=per_term


def _per_term_loss_and_grads(fn, emb):
    """Like :func:`_loss_and_grads` with one scale per term (``fn(leaves, scales)``)."""
    leaves = {k: v.clone().requires_grad_() for k, v in emb.items()}
    scales = PER_TERM_SCALES.clone().requires_grad_()
    loss = fn(leaves, scales)
    (loss * 1.7).backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}, scales.grad


def _loss_and_grads(fn, emb):
    leaves = {k: v.clone().requires_grad_() for k, v in emb.items()}
    s = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    loss = fn(leaves, s)
    (loss * 1.7).backward()  # grad_output != 1
    return loss.detach(), {k: v.grad for k, v in leaves.items()}, s.grad


def test_terms_and_total_on_a_hand_checkable_pair():
    """Two proteins, seq <-> text only: each direction is log(1 + exp(s·(c - 1))) with c the cosine."""
    e = {"sequence": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "text": torch.tensor([[1.0, 0.0], [0.6, 0.8]])}
    e["structure"] = e["sequence"]
    present = {m: torch.ones(2, dtype=torch.bool) for m in MODS}
    cfg = LossConfig(alpha=0.0, beta=2.0, gamma=0.0, intra_seq=0.0, intra_struct=0.0, intra_text=0.0, backend="torch")
    s = torch.tensor([3.0])
    terms = AlignProLoss(cfg).compute(e, present, s)
    assert set(terms) == {"loss", "loss_seq_text"}
    # seq->text: row 0 logits (3, 1.8), row 1 (0, 2.4); text->seq: row 0 (3, 0), row 1 (1.8, 2.4)
    lse = lambda x, y: torch.logsumexp(torch.tensor([x, y]), 0)  # noqa: E731
    want = 0.5 * ((lse(3, 1.8) - 3 + lse(0, 2.4) - 2.4) / 2 + (lse(3, 0) - 3 + lse(1.8, 2.4) - 2.4) / 2)
    torch.testing.assert_close(terms["loss_seq_text"], want)
    torch.testing.assert_close(terms["loss"], 2.0 * want)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("mode", ["none", "text"])
def test_matches_the_term_by_term_reference(mode, fuse):
    """Fused (kernels.trimodal_infonce, one gather per key) and per-term paths both equal the reference."""
    cfg = replace(CFG, false_negatives=mode, fuse_terms=fuse)
    assert AlignProLoss(cfg).fused is fuse
    emb = _emb()
    got = _loss_and_grads(lambda e, s: AlignProLoss(cfg).compute(e, PRESENT, s, GROUPS)["loss"], emb)
    ref = _loss_and_grads(lambda e, s: _reference(e, PRESENT, s, cfg, GROUPS), emb)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    for k in emb:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-10, atol=1e-12, msg=k)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-12)


def test_groups_change_only_the_text_terms():
    emb = _emb(1)
    s = torch.tensor([4.0], dtype=torch.float64)
    plain = AlignProLoss(CFG).compute(emb, PRESENT, s)
    grouped = AlignProLoss(replace(CFG, false_negatives="text")).compute(emb, PRESENT, s, GROUPS)
    for name in ("loss_seq_struct", "loss_intra_seq", "loss_intra_struct"):
        torch.testing.assert_close(grouped[name], plain[name], rtol=0, atol=0, msg=name)
    for name in ("loss_seq_text", "loss_struct_text", "loss_intra_text"):
        assert not torch.isclose(grouped[name], plain[name]), name
    # Without duplicates the grouped loss is the plain one.
    singles = torch.arange(N, dtype=torch.int64) + 1000
    again = AlignProLoss(replace(CFG, false_negatives="text")).compute(emb, PRESENT, s, singles)
    for name, value in plain.items():
        torch.testing.assert_close(again[name], value, rtol=1e-12, atol=1e-12, msg=name)


def test_missing_groups_and_bad_modes_are_clear_errors():
    cfg = replace(CFG, false_negatives="go")
    emb = _emb()
    with pytest.raises(KeyError, match="text_group"):
        AlignProLoss(cfg).compute(emb, PRESENT, torch.tensor([4.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="loss.false_negatives='texts'"):
        load_config(overrides=["loss.false_negatives=texts"])
    with pytest.raises(ConfigError, match="protclip.false_negatives"):
        load_config(overrides=["loss.objective=protclip", "loss.false_negatives=text"])
    assert load_config(overrides=["loss.false_negatives=go"]).loss.false_negatives == "go"


def test_collate_adds_group_ids_only_when_switched_on(tmp_path):
    import numpy as np

    from data_shards.demo_corpus import build_demo_corpus
    from data_shards.reader import iter_records
    from pretrain.data.collate import BatchBuilder
    from pretrain.losses.false_negatives import group_ids
    from tests.conftest import TINY_OVERRIDES

    build_demo_corpus(tmp_path, num_train=48, num_heldout=48, samples_per_shard=48)
    recs = list(iter_records(sorted((tmp_path / "train").glob("*.tar"))[0]))[:6]
    recs[2].text = None
    rng = np.random.default_rng(0)
    on = load_config(overrides=[*TINY_OVERRIDES, "loss.false_negatives=text"])
    batch = BatchBuilder(on, views={"text": True}).build(recs, rng, train=True)
    want = group_ids([r.text for r in recs], "text")
    assert torch.equal(batch["text_group"], want) and want[2] == NO_GROUP
    assert "text_group" not in BatchBuilder(on).build(recs, rng, train=False)  # evaluation batches
    off = load_config(overrides=TINY_OVERRIDES)
    assert "text_group" not in BatchBuilder(off).build(recs, rng, train=True)


# ----------------------------------------------------------------------------- 2 gloo ranks


def _two_rank_cfg(strategy: str, fuse: bool = True) -> LossConfig:
    """Either strategy with the text false-negative groups (the text terms grouped, the others plain)."""
    return replace(CFG, strategy=strategy, false_negatives="text", fuse_terms=fuse)


def _count_row_checks() -> list[int]:
    """Count (in the returned one-element list) the all_gathers of one int64: the equal-rows checks."""
    count, all_gather = [0], dist.all_gather

    def counting(tensors, tensor, *args, **kwargs):
        count[0] += int(tensor.dtype == torch.int64 and tensor.numel() == 1)
        return all_gather(tensors, tensor, *args, **kwargs)

    dist.all_gather = counting
    return count


def _worker(rank: int, init_file: str, out_dir: str, strategy: str = "allgather", fuse: bool = True) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=90)
        )
        rows = N // WORLD
        local = slice(rank * rows, (rank + 1) * rows)
        emb = {k: v[local] for k, v in _emb().items()}
        present = {k: v[local] for k, v in PRESENT.items()}
        cfg = _two_rank_cfg(strategy, fuse)
        row_checks = _count_row_checks()
        loss, grads, s_grad = _loss_and_grads(
            lambda e, s: AlignProLoss(cfg).compute(e, present, s, GROUPS[local])["loss"], emb
        )
        result = {"loss": loss, "grads": grads, "s": s_grad, "row_checks": row_checks[0]}
        per_term = replace(cfg, temperature="per_term")
        shared = torch.tensor([4.0], dtype=torch.float64)
        result["per_term"] = _per_term_loss_and_grads(
            lambda e, sc: AlignProLoss(per_term).compute(e, present, shared, GROUPS[local], term_logit_scale=sc)[
                "loss"
            ],
            emb,
        )
        torch.save(result, os.path.join(out_dir, f"r{rank}.pt"))
    except BaseException:
        Path(out_dir, f"r{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize(("strategy", "fuse"), [("allgather", True), ("ring", True), ("allgather", False)])
def test_two_gloo_ranks_match_the_global_reference(strategy, fuse, tmp_path):
    """Presence masks on every term; the ring (kernels.ring) computes its blocks in fp32, hence its tolerance.
    ``fuse``: all terms in one kernels.trimodal_infonce call, else one gathered call per term."""
    res = run_ranks(
        _worker, lambda r: (r, str(tmp_path / "rdv"), str(tmp_path), strategy, fuse), WORLD, tmp_path, TIMEOUT_S, "r"
    )
    cfg = _two_rank_cfg(strategy, fuse)
    ref = _loss_and_grads(lambda e, s: _reference(e, PRESENT, s, cfg, GROUPS), _emb())
    rtol, atol = (1e-10, 1e-12) if strategy == "allgather" else (1e-5, 1e-6)
    torch.testing.assert_close(sum(r["loss"] for r in res) / WORLD, ref[0], rtol=rtol, atol=atol)
    rows = N // WORLD
    for rank, r in enumerate(res):
        local = slice(rank * rows, (rank + 1) * rows)
        for k, g in r["grads"].items():  # gather_with_grad convention: W x the global gradient
            torch.testing.assert_close(g, WORLD * ref[1][k][local], rtol=10 * rtol, atol=atol, msg=k)
    torch.testing.assert_close(sum(r["s"] for r in res), WORLD * ref[2], rtol=10 * rtol, atol=atol)
    # six terms, one equal-rows check (a collective and a host sync) for the step, not one per term
    assert [r["row_checks"] for r in res] == [1, 1]
    # loss.temperature=per_term: each term's own scale, its gradient summed over ranks
    per_term = replace(cfg, temperature="per_term")
    ref = _per_term_loss_and_grads(lambda e, sc: _reference(e, PRESENT, None, per_term, GROUPS, sc), _emb())
    torch.testing.assert_close(sum(r["per_term"][0] for r in res) / WORLD, ref[0], rtol=rtol, atol=atol)
    for rank, r in enumerate(res):
        local = slice(rank * rows, (rank + 1) * rows)
        for k, g in r["per_term"][1].items():
            torch.testing.assert_close(g, WORLD * ref[1][k][local], rtol=10 * rtol, atol=atol, msg=k)
    torch.testing.assert_close(sum(r["per_term"][2] for r in res), WORLD * ref[2], rtol=10 * rtol, atol=atol)


@pytest.mark.parametrize("mode", ["none", "text"])
def test_sigmoid_kind_is_each_term_s_pairwise_sigmoid_loss_with_its_bias(mode):
    """loss.kind=sigmoid: every term is kernels' SigLIP loss (float64 oracle) with that term's bias;
    with loss.false_negatives the terms that contrast texts exclude same-group pairs (the oracle's
    ``groups``), the others are unchanged."""
    from kernels.sigmoid_reference import sigmoid_loss_reference
    from pretrain.losses.align_pro import TERMS

    cfg = replace(CFG, kind="sigmoid", false_negatives=mode)
    emb = _emb(3)
    s = torch.tensor([4.0], dtype=torch.float64)
    bias = torch.linspace(-3.0, 1.0, len(TERMS), dtype=torch.float64, requires_grad=True)
    got = AlignProLoss(cfg).compute(emb, PRESENT, s, GROUPS if mode != "none" else None, term_bias=bias)
    p = PRESENT
    pairs = {
        "loss_seq_struct": ("sequence", "structure", p["sequence"] & p["structure"], cfg.alpha),
        "loss_seq_text": ("sequence", "text", p["sequence"] & p["text"], cfg.beta),
        "loss_struct_text": ("structure", "text", p["structure"] & p["text"], cfg.gamma),
        "loss_intra_seq": ("sequence", "sequence_view2", p["sequence"], cfg.intra_seq),
        "loss_intra_struct": ("structure", "structure_view2", p["structure"], cfg.intra_struct),
        "loss_intra_text": ("text", "text_view2", p["text"], cfg.intra_text),
    }
    total = 0.0
    for name, (a, b, valid, w) in pairs.items():
        i = TERMS.index(name)
        targets = torch.where(valid, torch.arange(N), torch.full((N,), -1))
        text = "text" in (a, b)
        groups = GROUPS if mode != "none" and text else None
        want = sigmoid_loss_reference(emb[a], emb[b], s, bias[i : i + 1], targets, key_valid=valid, groups=groups)
        torch.testing.assert_close(got[name], want, rtol=1e-9, atol=1e-12, msg=name)
        plain = sigmoid_loss_reference(emb[a], emb[b], s, bias[i : i + 1], targets, key_valid=valid)
        assert (abs(float(want.detach() - plain.detach())) > 1e-6) == (groups is not None), name  # groups matter
        total = total + w * want
    torch.testing.assert_close(got["loss"], total, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(got["loss"], bias)
    assert bool((grad != 0).all())  # every term's bias is trained


def test_sigmoid_kind_needs_the_model_biases_and_takes_false_negatives():
    with pytest.raises(KeyError, match="term_bias"):
        AlignProLoss(replace(CFG, kind="sigmoid")).compute(_emb(), PRESENT, torch.tensor([4.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="loss.kind"):
        load_config(overrides=["loss.kind=softmax"])
    assert load_config(overrides=["loss.kind=sigmoid", "loss.false_negatives=go"]).loss.false_negatives == "go"
    sigmoid = AlignProLoss(replace(CFG, kind="sigmoid", false_negatives="text"))
    with pytest.raises(KeyError, match="text_group"):
        sigmoid.compute(_emb(), PRESENT, torch.tensor([4.0], dtype=torch.float64), term_bias=torch.zeros(6))
    with pytest.raises(ConfigError, match="protclip"):
        load_config(overrides=["loss.kind=sigmoid", "loss.objective=protclip"])
    plain, sig = load_config(), load_config(overrides=["loss.kind=sigmoid"])
    assert plain.fingerprint() != sig.fingerprint()  # the sigmoid model has more parameters: no resume across


def test_sigmoid_groups_positive_makes_same_group_text_pairs_positives():
    """loss.sigmoid_groups=positive: the text terms' same-group pairs are positives (the oracle's
    ``groups_as="positive"``), the other terms are untouched, and the total differs from the default."""
    from kernels.sigmoid_reference import sigmoid_loss_reference
    from pretrain.losses.align_pro import TERMS

    emb = _emb(4)
    s = torch.tensor([4.0], dtype=torch.float64)
    bias = torch.linspace(-3.0, 1.0, len(TERMS), dtype=torch.float64)
    cfg = replace(CFG, kind="sigmoid", false_negatives="text", sigmoid_groups="positive")
    got = AlignProLoss(cfg).compute(emb, PRESENT, s, GROUPS, term_bias=bias)
    excluded = AlignProLoss(replace(cfg, sigmoid_groups="exclude")).compute(emb, PRESENT, s, GROUPS, term_bias=bias)
    p = PRESENT
    for name, a, b, valid in (
        ("loss_seq_struct", "sequence", "structure", p["sequence"] & p["structure"]),
        ("loss_seq_text", "sequence", "text", p["sequence"] & p["text"]),
        ("loss_intra_text", "text", "text_view2", p["text"]),
    ):
        i = TERMS.index(name)
        targets = torch.where(valid, torch.arange(N), torch.full((N,), -1))
        text = "text" in (a, b)
        want = sigmoid_loss_reference(
            emb[a], emb[b], s, bias[i : i + 1], targets, key_valid=valid, groups=GROUPS if text else None,
            groups_as="positive",
        )  # fmt: skip
        torch.testing.assert_close(got[name], want, rtol=1e-9, atol=1e-12, msg=name)
        assert (abs(float(got[name] - excluded[name])) > 1e-6) == text, name  # only the text terms change


def test_sigmoid_groups_config_is_validated():
    assert LossConfig().sigmoid_groups == "exclude"  # default: today's exclusion
    on = ["loss.kind=sigmoid", "loss.false_negatives=text", "loss.sigmoid_groups=positive"]
    assert load_config(overrides=on).loss.sigmoid_groups == "positive"
    for off in (on[1:], [on[0], on[2]]):  # it would be ignored without sigmoid terms or without groups
        with pytest.raises(ConfigError, match="loss.sigmoid_groups='positive' needs loss.kind=sigmoid"):
            load_config(overrides=off)
    with pytest.raises(ConfigError, match="loss.sigmoid_groups='both'"):
        load_config(overrides=["loss.sigmoid_groups=both"])
    with pytest.raises(ConfigError, match="loss.sigmoid_groups"):
        replace(CFG, sigmoid_groups="positives").validate()
