"""The whole Align-Pro objective with ``loss.kind: sigmoid`` and ``loss.false_negatives: text`` on 2 gloo ranks.

Kernel-level 2-rank checks (``tests/kernels/test_sigmoid_distributed.py``) cover one gathered sigmoid
term; here :meth:`AlignProLoss.compute` runs all six terms (three pairs, three intra-modal views), each
with its own learned bias (:class:`TermBias`) and either the shared learned scale or one scale per term
(``loss.temperature: per_term``, :class:`TermLogitScale`), with presence masks and text groups of which
three (100, 200, 300) span both ranks. Every rank's numbers are checked against the same objective on
one process over the full batch and against an independent float64 reference written here (explicit
``N × N`` sigmoid terms with the exclusion mask; it shares no code with ``kernels``).

How a rank's loss relates to the single-process loss. Per term, with ``V`` the globally valid pairs
(rows with both modalities of the term), ``N = |V|``, ``W`` ranks, ``ℓ_ij = -log σ(z_ij (s a_i·b_j + t))``
(``z = +1`` on the diagonal, ``-1`` off it) and ``E`` the excluded pairs (``i ≠ j`` of one text group, in
the three text terms only), the single-process term is the mean over valid rows of the sum over valid
global keys::

    L = (1 / N) Σ_{i in V} Σ_{j in V, (i, j) not in E} ℓ_ij

and rank r's value of the term is NOT its local mean but its rows' part of that sum, rescaled::

    L_r = (W / N) Σ_{i in V, i on rank r} Σ_{j in V, (i, j) not in E} ℓ_ij,     so  mean_r L_r = L

(``loss`` is ``Σ_term w_term L_r`` alike). Gradients: each rank back-propagates its own ``L_r``; the
keys come through ``gather_with_grad`` (backward sums over ranks), so rank r's embedding gradient is
``Σ_r' ∂L_r'/∂e_r = W · ∂L/∂e_r``; a learned bias / scale gets ``∂L_r/∂θ`` on rank r (checked against
the reference's per-rank share), whose mean over ranks (DeepSpeed's gradient averaging) is ``∂L/∂θ``.
The logged value of a term (the trainer's mean over ranks) is therefore the single-process term.

Both ``loss.strategy`` values run (``ring`` computes in float64 for float64 inputs, so the tolerances
are tight for both). The workers are spawned once for the module.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.grouped import NO_GROUP
from pretrain.losses.align_pro import SCALE_NAMES, TERMS, AlignProLoss
from pretrain.losses.config import LossConfig
from pretrain.models.term_bias import TermBias, TermLogitScale
from tests.spawn_ranks import gloo_rank, run_ranks

N, DIM, WORLD = 12, 6, 2
ROWS = N // WORLD  # rank r holds global rows [r·ROWS, (r+1)·ROWS)
TIMEOUT_S = 120.0  # a hang guard: spawned ranks start slowly on a busy 2-core host
GRAD_OUT = 0.37  # backward of GRAD_OUT · loss: gradients are checked with grad_output != 1
RTOL, ATOL = 1e-10, 1e-12
MODS = ("sequence", "structure", "text")
# Text groups over rows 0-5 (rank 0) | 6-11 (rank 1): 100 (rows 1, 4 | 9), 200 (2 | 10) and 300 (5 | 6)
# span both ranks, 400 (0, 3) stays on rank 0; rows 7, 8, 11 share their text with nobody.
GROUPS = torch.tensor([400, 100, 200, 400, 100, 300, 300, 8, NO_GROUP, 100, 200, NO_GROUP], dtype=torch.int64)
PRESENT = {  # unequal valid counts per rank in every pair term: the W · N_r / N rescaling matters
    "sequence": torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool),
    "structure": torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
    "text": torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool),
}
CFG = LossConfig(
    alpha=1.0,
    beta=0.7,
    gamma=0.4,
    intra_seq=0.3,
    intra_struct=0.2,
    intra_text=0.5,
    backend="torch",
    kind="sigmoid",
    false_negatives="text",
)
# term -> (first embedding, second embedding, first presence, second presence, weight attribute)
SPEC = {
    "loss_seq_struct": ("sequence", "structure", "sequence", "structure", "alpha"),
    "loss_seq_text": ("sequence", "text", "sequence", "text", "beta"),
    "loss_struct_text": ("structure", "text", "structure", "text", "gamma"),
    "loss_intra_seq": ("sequence", "sequence_view2", "sequence", "sequence", "intra_seq"),
    "loss_intra_struct": ("structure", "structure_view2", "structure", "structure", "intra_struct"),
    "loss_intra_text": ("text", "text_view2", "text", "text", "intra_text"),
}
TEXT_TERMS = ("loss_seq_text", "loss_struct_text", "loss_intra_text")  # the terms that exclude same-group pairs
BIAS = [-2.5, -1.0, 0.5, -0.3, 1.2, -1.7]  # one learned bias per term (TERMS order), all distinct
LOG_SHARED = math.log(4.0)  # the shared learned log scale
LOG_TERM_SCALES = [1.0, 2.3, 1.5, 0.4, 3.1, 1.7]  # per_term log scales (all below the clamp, log 100)
CASES = [(s, t) for t in ("shared", "per_term") for s in ("allgather", "ring")]


def _cfg(strategy: str, temperature: str) -> LossConfig:
    return replace(CFG, strategy=strategy, temperature=temperature)


def _emb() -> dict[str, torch.Tensor]:
    """Unit-norm float64 embeddings of the global batch, (N, DIM) each, and each modality's second view."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for m in MODS:
        for key in (m, f"{m}_view2"):
            out[key] = F.normalize(torch.randn(N, DIM, generator=g, dtype=torch.float64), dim=1)
    # some positives well aligned, so the terms are not all dominated by the biases
    for key in ("structure", "text", "sequence_view2", "structure_view2", "text_view2"):
        out[key][:6] = F.normalize(out[key][:6] + out["sequence"][:6], dim=1)
    return out


# ----------------------------------------------------------------------------- the objective (any world size)


def _objective(cfg: LossConfig, emb: dict, present: dict, groups: torch.Tensor) -> dict:
    """Run :meth:`AlignProLoss.compute` on these rows (this rank's share when a process group is up, else
    the whole batch) with the real learned-parameter modules, and back-propagate ``GRAD_OUT · loss``.

    Returns the detached outputs, the gradient of every embedding, of the shared log scale, of the
    biases and (``per_term``) of the per-term log scales.
    """
    leaves = {k: v.clone().requires_grad_() for k, v in emb.items()}
    log_shared = torch.tensor([LOG_SHARED], dtype=torch.float64, requires_grad=True)
    biases = TermBias(TERMS, cfg.sigmoid_init_bias).double()
    with torch.no_grad():
        biases.bias.copy_(torch.tensor(BIAS, dtype=torch.float64))
    scales, term_scale = None, None
    if cfg.temperature != "shared":
        scales = TermLogitScale(SCALE_NAMES[cfg.temperature], init_temperature=0.07, max_logit_scale=100.0).double()
        with torch.no_grad():
            scales.log_logit_scale.copy_(torch.tensor(LOG_TERM_SCALES, dtype=torch.float64))
        term_scale = scales()["term_logit_scale"]
    out = AlignProLoss(cfg).compute(
        leaves, present, log_shared.exp(), groups, biases()["term_bias"], term_logit_scale=term_scale
    )
    (GRAD_OUT * out["loss"]).backward()
    zero = torch.zeros(1, dtype=torch.float64)
    return {
        "out": {k: v.detach().clone() for k, v in out.items()},
        "emb": {k: torch.zeros_like(v) if v.grad is None else v.grad.clone() for k, v in leaves.items()},
        "log_shared": zero if log_shared.grad is None else log_shared.grad.clone(),
        "bias": biases.bias.grad.clone(),
        "term_scales": None if scales is None else scales.log_logit_scale.grad.clone(),
    }


def _rank_results() -> dict:
    """One gloo rank: every case of :data:`CASES` on this rank's half of the batch."""
    rank = dist.get_rank()
    local = slice(rank * ROWS, (rank + 1) * ROWS)
    emb = {k: v[local] for k, v in _emb().items()}
    present = {k: v[local] for k, v in PRESENT.items()}
    return {case: _objective(_cfg(*case), emb, present, GROUPS[local]) for case in CASES}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results (spawned once for the module)."""
    tmp = tmp_path_factory.mktemp("sigmoid_objective_ranks")
    init = str(tmp / "rendezvous")
    args = lambda r: (r, WORLD, init, str(tmp), _rank_results, 90.0, "r")  # noqa: E731
    return run_ranks(gloo_rank, args, WORLD, tmp, TIMEOUT_S, "r")


@pytest.fixture(scope="module")
def single() -> dict:
    """The same objective on one process over the full batch (no process group: world size 1)."""
    assert not dist.is_initialized()
    return {t: _objective(_cfg("allgather", t), _emb(), PRESENT, GROUPS) for t in ("shared", "per_term")}


# ----------------------------------------------------------------------------- float64 reference


def _pair_losses(a, b, s, t, valid, groups) -> torch.Tensor:
    """(N, N) ``-log σ(z_ij (s a_i·b_j + t))`` of the global batch, 0 where the pair does not count:
    row or key not valid, or (``groups`` given) ``i ≠ j`` in one group (NO_GROUP is nobody's group)."""
    x = s.reshape(()) * (a @ b.T) + t.reshape(())  # (N, N)
    eye = torch.eye(a.shape[0], dtype=torch.bool)
    z = torch.where(eye, 1.0, -1.0).to(torch.float64)
    counts = valid[:, None] & valid[None, :]
    if groups is not None:
        same = (groups[:, None] == groups[None, :]) & (groups[:, None] != NO_GROUP)
        counts = counts & ~(same & ~eye)
    u = z * x
    nll = torch.log1p(torch.exp(-u.abs())) + torch.relu(-u)  # -log σ(u), exact in float64 (no softplus threshold)
    return torch.where(counts, nll, torch.zeros((), dtype=torch.float64))


def _reference(emb, log_shared, bias, log_scales, temperature: str, groups) -> dict:
    """Per term and for ``loss``: ``"full"`` (the single-process value L) and ``"share"`` (list of the
    W ranks' L_r), from explicit pair losses (module docstring). ``groups`` None: no exclusion."""
    out = {"full": {}, "share": [{} for _ in range(WORLD)]}
    total_full, total_share = 0.0, [0.0] * WORLD
    for name, (ka, kb, pa, pb, attr) in SPEC.items():
        j = TERMS.index(name)
        s = (log_scales[j] if temperature == "per_term" else log_shared[0]).exp()
        valid = PRESENT[pa] & PRESENT[pb]
        grouped = groups if name in TEXT_TERMS else None
        row_sums = _pair_losses(emb[ka], emb[kb], s, bias[j], valid, grouped).sum(1)  # (N,) over global keys
        n_valid = valid.sum().to(torch.float64)
        w = getattr(CFG, attr)
        out["full"][name] = row_sums.sum() / n_valid
        total_full = total_full + w * out["full"][name]
        for r in range(WORLD):
            share = WORLD * row_sums[r * ROWS : (r + 1) * ROWS].sum() / n_valid
            out["share"][r][name] = share
            total_share[r] = total_share[r] + w * share
    out["full"]["loss"] = total_full
    for r in range(WORLD):
        out["share"][r]["loss"] = total_share[r]
    return out


def _reference_results(temperature: str, groups=GROUPS) -> dict:
    """The reference's values and gradients (of ``GRAD_OUT ·`` the total): ``"full"`` for the
    single-process objective, ``"share"[r]`` for rank r's ``L_r``."""
    emb = {k: v.clone().requires_grad_() for k, v in _emb().items()}
    log_shared = torch.tensor([LOG_SHARED], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    log_scales = torch.tensor(LOG_TERM_SCALES, dtype=torch.float64, requires_grad=True)
    ref = _reference(emb, log_shared, bias, log_scales, temperature, groups)
    params = [*emb.values(), log_shared, bias, log_scales]

    def grads(total):
        got = torch.autograd.grad(GRAD_OUT * total, params, retain_graph=True, allow_unused=True)
        got = [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]
        return {
            "emb": dict(zip(emb, got[: len(emb)])),
            "log_shared": got[-3],
            "bias": got[-2],
            "term_scales": got[-1] if temperature == "per_term" else None,
        }

    detach = lambda d: {k: v.detach() for k, v in d.items()}  # noqa: E731
    return {
        "full": {"out": detach(ref["full"]), **grads(ref["full"]["loss"])},
        "share": [{"out": detach(ref["share"][r]), **grads(ref["share"][r]["loss"])} for r in range(WORLD)],
    }


def _close(got, want, msg: str, scale: float = 1.0) -> None:
    torch.testing.assert_close(got, scale * want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{msg}: {m}")


# ----------------------------------------------------------------------------- tests


def test_reference_excludes_the_cross_rank_groups():
    """The fixture is a real test of grouping: in every text term the exclusion changes the loss and the
    gradients, and the pairs of groups spanning both ranks alone change them too (a rank that saw only
    its own rows' groups would be caught); the other terms ignore the groups."""
    grouped = _reference_results("shared")
    plain = _reference_results("shared", groups=None)
    rank_local = torch.cat([GROUPS[:ROWS], GROUPS[ROWS:] + 10_000])  # same groups, never across ranks
    rank_local[GROUPS == NO_GROUP] = NO_GROUP
    local = _reference_results("shared", groups=rank_local)
    for name in TERMS:
        for other in (plain, local):
            differs = abs(float(grouped["full"]["out"][name] - other["full"]["out"][name])) > 1e-6
            assert differs == (name in TEXT_TERMS), name
            for r in range(WORLD):
                share = abs(float(grouped["share"][r]["out"][name] - other["share"][r]["out"][name])) > 1e-6
                assert share == (name in TEXT_TERMS), (name, r)
    for other in (plain, local):
        for k in ("sequence", "structure", "text", "text_view2"):
            assert (grouped["full"]["emb"][k] - other["full"]["emb"][k]).abs().max() > 1e-6, k
        for k in ("sequence_view2", "structure_view2"):  # only in ungrouped terms
            torch.testing.assert_close(grouped["full"]["emb"][k], other["full"]["emb"][k], rtol=0, atol=0)
        assert (grouped["full"]["bias"] - other["full"]["bias"]).abs().max() > 1e-6


@pytest.mark.parametrize("temperature", ["shared", "per_term"])
def test_single_process_objective_matches_float64_reference(single, temperature):
    got, ref = single[temperature], _reference_results(temperature)["full"]
    for name in (*TERMS, "loss"):
        _close(got["out"][name], ref["out"][name], name)
    for k, g in got["emb"].items():
        _close(g, ref["emb"][k], k)
    _close(got["bias"], ref["bias"], "bias")
    _close(got["log_shared"], ref["log_shared"], "log_shared")
    if temperature == "per_term":
        assert float(got["log_shared"].abs().max()) == 0.0  # the shared scale serves no term
        _close(got["term_scales"], ref["term_scales"], "term_scales")


@pytest.mark.parametrize(("strategy", "temperature"), CASES)
def test_two_ranks_match_single_process_and_reference(ranks, single, strategy, temperature):
    """(a) each rank's value of every term and of ``loss`` is the reference's L_r, and their mean (what
    the trainer logs) is the single-process value; the bias / temperature metrics are the single
    process's. (b) rank r's embedding gradients are W × the single-process ones on its rows; its bias and
    scale gradients are the reference's ∂L_r/∂θ, averaging to the single-process ones."""
    case = (strategy, temperature)
    got = [r[case] for r in ranks]
    one, ref = single[temperature], _reference_results(temperature)
    assert all(set(g["out"]) == set(one["out"]) for g in got)
    for name in (*TERMS, "loss"):
        for r in range(WORLD):
            _close(got[r]["out"][name], ref["share"][r]["out"][name], f"rank {r} {name}")
        mean = sum(g["out"][name] for g in got) / WORLD
        _close(mean, one["out"][name], f"mean {name} vs one process")
        _close(mean, ref["full"]["out"][name], f"mean {name} vs reference")
    for key in one["out"]:
        if key.startswith(("bias_", "temp_")):
            for r in range(WORLD):
                _close(got[r]["out"][key], one["out"][key], f"rank {r} {key}")
    for r in range(WORLD):
        local = slice(r * ROWS, (r + 1) * ROWS)
        for k, g in got[r]["emb"].items():
            _close(g, one["emb"][k][local], f"rank {r} d{k} vs one process", scale=WORLD)
            _close(g, ref["full"]["emb"][k][local], f"rank {r} d{k} vs reference", scale=WORLD)
    params = ["bias", "log_shared"] + (["term_scales"] if temperature == "per_term" else [])
    for p in params:
        for r in range(WORLD):
            _close(got[r][p], ref["share"][r][p], f"rank {r} d{p} vs reference share")
        mean = sum(g[p] for g in got) / WORLD
        _close(mean, one[p], f"mean d{p} vs one process")
        _close(mean, ref["full"][p], f"mean d{p} vs reference")
