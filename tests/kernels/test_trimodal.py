"""kernels.trimodal: the fused tri-modal step equals the per-term losses, each modality gathered once.

Reference: the per-term calls ``pretrain.losses.align_pro`` makes today (``gathered_symmetric_infonce`` /
``grouped_symmetric_infonce``, torch backend) on float64 inputs, for the loss of every term and the
gradient of every embedding and every scale. On 2 gloo ranks: each rank's gradients are W × the
single-process global-batch gradients, and the collectives are counted.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import check_equal_rows, gathered_symmetric_infonce, grouped_symmetric_infonce, trimodal_blocks
from kernels.grouped import NO_GROUP
from kernels.trimodal import ALIGN_PRO_TERMS, Term, rank_trimodal_infonce, trimodal_infonce
from tests.spawn_ranks import gloo_rank, run_ranks

B, DIM, WORLD, TIMEOUT_S = 7, 12, 2, 150.0
KEYS = ("sequence", "structure", "text", "sequence_view2", "structure_view2", "text_view2")
TERMS = ALIGN_PRO_TERMS  # align_pro's six, false negatives on the terms that contrast texts
WEIGHTS = (0.9, 1.3, 0.4, 0.7, 1.1, 0.25)  # the upstream gradient of each term (≠ 1, distinct)


def _data(rows: int, seed: int = 0) -> dict:
    """float64 embeddings, presence masks with missing rows, groups shared within and across ranks."""
    g = torch.Generator().manual_seed(seed)
    emb = {k: F.normalize(torch.randn(rows, DIM, generator=g, dtype=torch.float64), dim=1) for k in KEYS}
    present = {k: torch.rand(rows, generator=g) > 0.25 for k in ("sequence", "structure", "text")}
    present["sequence"][0] = False
    groups = torch.tensor([5, 9, 5, NO_GROUP, 9, 5, 11] * (rows // 7 + 1))[:rows]
    scales = torch.tensor([3.0, 5.5, 2.2, 7.0, 4.1, 6.3], dtype=torch.float64)
    return {"emb": emb, "present": present, "groups": groups, "scales": scales}


def _per_term(emb, terms, scales, present, groups, backend="torch"):
    """The present per-term calls as align_pro makes them: one row check, then one call per term."""
    check_equal_rows(next(iter(emb.values())).shape[0], torch.device("cpu"))
    out = {}
    for i, t in enumerate(terms):
        valid = None
        if present is not None:
            valid = present[t.presence_keys()[0]]
            for p in t.presence_keys()[1:]:
                valid = valid & present[p]
        a, b, s = emb[t.a_key], emb[t.b_key], scales[i]
        if t.grouped:
            out[t.name] = grouped_symmetric_infonce(
                a, b, s, groups, valid_local=valid, backend=backend, check_rows=False
            )
        else:
            out[t.name] = gathered_symmetric_infonce(a, b, s, valid_local=valid, backend=backend, check_rows=False)
    return out


def _run(fn, data, terms=TERMS, dtype=torch.float64, scale_form="vector", device="cpu", **kwargs):
    """Fresh leaves on ``device``, backprop Σ_t WEIGHTS[t]·L_t; returns (losses, grads by key, scale grads
    (n_terms,)), on the CPU."""
    emb = {k: v.detach().to(device, dtype).requires_grad_() for k, v in data["emb"].items()}
    scales = data["scales"][: len(terms)].detach().to(device, dtype).requires_grad_()
    s_in = scales if scale_form == "vector" else [scales[i : i + 1] for i in range(len(terms))]
    kwargs = {k: v if k != "present" else {m: x.to(device) for m, x in v.items()} for k, v in kwargs.items()}
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out = fn(emb, terms, s_in, **kwargs)
    sum(WEIGHTS[i] * out[t.name] for i, t in enumerate(terms)).backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)).cpu() for k, v in emb.items()}
    return {k: v.detach().cpu() for k, v in out.items()}, grads, scales.grad.cpu()


def _fused(**options):
    return lambda emb, terms, s, present=None, groups=None: trimodal_infonce(
        emb, terms, s, present=present, groups=groups, **options
    )


def _reference(emb, terms, s, present=None, groups=None):
    return _per_term(emb, terms, s, present, groups)


def _assert_same(got, ref, rtol=1e-10):
    for name, value in ref[0].items():
        torch.testing.assert_close(got[0][name].double(), value.double(), rtol=rtol, atol=rtol, msg=name)
    for key, value in ref[1].items():
        atol = rtol * max(value.abs().max().item(), 1e-12)
        torch.testing.assert_close(got[1][key].double(), value, rtol=rtol, atol=atol, msg=f"d {key}")
    torch.testing.assert_close(got[2].double(), ref[2], rtol=rtol, atol=rtol * ref[2].abs().max().item())


def test_align_pro_terms_are_the_terms_align_pro_fuses():
    """kernels.trimodal.ALIGN_PRO_TERMS (used here and by benchmarks/trimodal_loss.py) names align_pro's
    terms in its order, grouped where its false negatives apply, each with the presence it uses."""
    from pretrain.losses import align_pro

    assert tuple(t.name for t in TERMS) == align_pro.TERMS
    assert {t.name for t in TERMS if t.grouped} == align_pro._GROUPED_TERMS
    for name, a, b, _ in align_pro._PAIR_TERMS:
        assert TERMS[align_pro.TERMS.index(name)].presence_keys() == (a, b)
    for name, mod, _ in align_pro._INTRA_TERMS:
        term = TERMS[align_pro.TERMS.index(name)]
        assert (term.a_key, term.b_key, term.presence_keys()) == (mod, f"{mod}_view2", (mod,))


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
@pytest.mark.parametrize("scale_form", ["vector", "list"])
def test_torch_equals_per_term_losses_and_grads(strategy, scale_form):
    data = _data(B)
    kw = {"present": data["present"], "groups": data["groups"]}
    ref = _run(_reference, data, **kw)
    got = _run(_fused(backend="torch", strategy=strategy), data, scale_form=scale_form, **kw)
    _assert_same(got, ref)
    assert all(got[2] != 0) and all(g.abs().sum() > 0 for g in got[1].values())  # every input is reached


def test_torch_chunks_match_unchunked(monkeypatch):
    """Two query rows per chunk (the buffer bound): the same losses and gradients as one chunk."""
    data = _data(B, seed=3)
    kw = {"present": data["present"], "groups": data["groups"]}
    whole = _run(_fused(backend="torch"), data, **kw)
    monkeypatch.setattr(trimodal_blocks, "_CHUNK_ELEMS", 8 * B)  # Σn = 3·B keys per query group: 2 rows
    _assert_same(_run(_fused(backend="torch"), data, **kw), whole, rtol=1e-12)


def test_subset_without_masks_or_groups():
    """Two plain terms, no presence masks, no groups: the plain symmetric losses."""
    data = _data(B, seed=1)
    terms = (TERMS[0], Term("loss_seq_text", "sequence", "text"))
    _assert_same(_run(_fused(backend="torch"), data, terms=terms), _run(_reference, data, terms=terms))


def test_one_shared_scale_tensor_for_every_term():
    """align_pro's ``temperature: shared``: the same [1] tensor passed for every term gets their summed grad."""
    data = _data(B, seed=4)
    kw = {"present": data["present"], "groups": data["groups"]}

    def shared(fn):
        def run(emb, terms, s, **kwargs):
            return fn(emb, terms, [s[:1]] * len(terms), **kwargs)

        return run

    got, ref = _run(shared(_fused(backend="torch")), data, **kw), _run(shared(_reference), data, **kw)
    _assert_same(got, ref)
    assert torch.all(got[2][1:] == 0) and got[2][0] != 0


def test_simulated_ranks_sum_to_the_global_loss():
    """rank_trimodal_infonce (the benchmark's simulated world): Σ_r L_r = W·L and Σ_r dL_r = W·dL."""
    data = _data(3 * B, seed=5)
    kw = {"present": data["present"], "groups": data["groups"]}
    ref = _run(_reference, data, **kw)

    def ranks(emb, terms, s, present, groups):
        shares = [
            rank_trimodal_infonce(
                emb, terms, s, world=3, rank=r, present_all=present, groups_all=groups, backend="torch"
            )
            for r in range(3)
        ]
        return {t.name: sum(share[t.name] for share in shares) / 3 for t in terms}

    got = _run(ranks, data, **kw)
    # the mean of the shares is the global loss; its gradient is the global one (each share's is W × its rows)
    _assert_same(got, ref)


def test_zero_valid_rows_give_zero_loss_and_grads():
    data = _data(B)
    data["present"] = {k: torch.zeros(B, dtype=torch.bool) for k in data["present"]}
    losses, grads, ds = _run(_fused(backend="torch"), data, present=data["present"], groups=data["groups"])
    assert all(v == 0 for v in losses.values()) and all(torch.all(g == 0) for g in grads.values())
    assert torch.all(ds == 0)


def _triton_interpretable() -> bool:
    try:
        from kernels.infonce_tiles import interpreter_ready
    except ImportError:
        return False
    return interpreter_ready()


needs_triton_on_cpu = pytest.mark.skipif(
    torch.cuda.is_available() or not _triton_interpretable(),
    reason="CPU test of the Triton path: needs triton imported under TRITON_INTERPRET=1",
)
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or _triton_interpretable()), reason="no GPU and no Triton interpreter"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize(
    ("strategy", "method"), [("allgather", "fused"), ("allgather", "gemm"), ("ring", "auto")], ids=str
)
def test_triton_matches_float64_reference(strategy, method, monkeypatch):
    """On CPU under the interpreter; on a GPU compiled (fp32: 3×tf32 dots, hence the looser tolerance)."""
    if method != "auto":  # the backward method of kernels.trimodal_triton (the interpreter's default: fused)
        import kernels.trimodal_triton

        monkeypatch.setattr(kernels.trimodal_triton, "resolve_method", lambda _method, _x: method)
    data = _data(B, seed=2)
    kw = {"present": data["present"], "groups": data["groups"]}
    ref = _run(_reference, data, **kw)
    got = _run(_fused(backend="triton", strategy=strategy), data, dtype=torch.float32, device=DEVICE, **kw)
    _assert_same(got, ref, rtol=2e-5 if DEVICE == "cpu" else 2e-4)


@needs_triton
def test_triton_bf16_matches_reference_on_rounded_inputs():
    """bf16 embeddings (the GPU recipe's dtype; the interpreter upcasts its dots): the reference runs in
    float64 on the same rounded values; gradients come back in bf16."""
    data = _data(B, seed=6)
    data["emb"] = {k: v.to(torch.bfloat16).double() for k, v in data["emb"].items()}
    data["scales"] = data["scales"].to(torch.bfloat16).double()  # the scales are leaves of that dtype too
    kw = {"present": data["present"], "groups": data["groups"]}
    ref = _run(_reference, data, **kw)
    got = _run(_fused(backend="triton"), data, dtype=torch.bfloat16, device=DEVICE, **kw)
    assert all(g.dtype == torch.bfloat16 for g in got[1].values())
    _assert_same(got, ref, rtol=2e-2)


def test_bad_arguments_fail_clearly():
    data = _data(B)
    emb, s = data["emb"], data["scales"]
    with pytest.raises(KeyError, match="text_view2"):
        trimodal_infonce({k: v for k, v in emb.items() if k != "text_view2"}, TERMS, s, groups=data["groups"])
    with pytest.raises(KeyError, match="presence mask .structure."):
        trimodal_infonce(emb, TERMS, s, present={"sequence": data["present"]["sequence"]}, groups=data["groups"])
    with pytest.raises(ValueError, match="need groups"):
        trimodal_infonce(emb, TERMS, s)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        trimodal_infonce(emb, TERMS, s[:5], groups=data["groups"])
    with pytest.raises(ValueError, match="one scale per term"):
        trimodal_infonce(emb, TERMS, [s[:1]], groups=data["groups"])
    with pytest.raises(ValueError, match="strategy"):
        trimodal_infonce(emb, TERMS, s, groups=data["groups"], strategy="tree")
    with pytest.raises(ValueError, match="distinct"):
        trimodal_infonce(emb, (TERMS[0], TERMS[0]), s[:2])
    with pytest.raises(ValueError, match="'text'"):
        trimodal_infonce({**emb, "text": emb["text"][:, :5]}, TERMS, s, groups=data["groups"])


# ----------------------------------------------------------------------------- 2 gloo ranks


class _Counter:
    """Counts calls of torch.distributed's all_gather and all_reduce while active."""

    def __init__(self):
        self.counts = {"all_gather": 0, "all_reduce": 0}
        self._originals = {}

    def __enter__(self):
        for name in self.counts:
            original = self._originals[name] = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _rank_results(rank: int, with_triton: bool) -> dict:
    data = _data(WORLD * B)
    local = slice(rank * B, (rank + 1) * B)
    mine = {
        "emb": {k: v[local] for k, v in data["emb"].items()},
        "present": {k: v[local] for k, v in data["present"].items()},
        "groups": data["groups"][local],
        "scales": data["scales"],
    }
    kw = {"present": mine["present"], "groups": mine["groups"]}
    out = {}
    runs = [("allgather", "torch"), ("ring", "torch")] + ([("allgather", "triton")] if with_triton else [])
    for strategy, backend in runs:
        dtype = torch.float32 if backend == "triton" else torch.float64
        with _Counter() as counter:
            out[(strategy, backend)] = _run(_fused(backend=backend, strategy=strategy), mine, dtype=dtype, **kw)
        out[(strategy, backend, "counts")] = counter.counts
    with _Counter() as counter:
        _run(_reference, mine, **kw)
    out["per_term_counts"] = counter.counts
    return out


def _worker(rank: int, init_file: str, out_dir: str, with_triton: bool) -> None:
    gloo_rank(rank, WORLD, init_file, out_dir, lambda: _rank_results(rank, with_triton))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("trimodal_gloo")
    with_triton = _triton_interpretable() and not torch.cuda.is_available()
    args = lambda r: (r, str(tmp / "rendezvous"), str(tmp), with_triton)  # noqa: E731
    return run_ranks(_worker, args, WORLD, tmp, TIMEOUT_S, "rank")


RUNS = pytest.mark.parametrize(
    "run",
    [("allgather", "torch"), ("ring", "torch"), pytest.param(("allgather", "triton"), marks=needs_triton_on_cpu)],
    ids=["allgather-torch", "ring-torch", "allgather-triton"],
)


@RUNS
def test_ranks_equal_single_process_global_batch(rank_results, run):
    data = _data(WORLD * B)
    ref_losses, ref_grads, ref_ds = _run(_reference, data, present=data["present"], groups=data["groups"])
    rtol = 2e-5 if run[1] == "triton" else 1e-9
    for name, value in ref_losses.items():
        mean = sum(r[run][0][name].double() for r in rank_results) / WORLD
        torch.testing.assert_close(mean, value, rtol=rtol, atol=rtol, msg=name)
    for rank, res in enumerate(rank_results):
        for key, grad in ref_grads.items():
            expected = WORLD * grad[rank * B : (rank + 1) * B]
            atol = rtol * expected.abs().max().item()
            torch.testing.assert_close(res[run][1][key].double(), expected, rtol=rtol, atol=atol, msg=f"d {key}")
    ds = sum(r[run][2].double() for r in rank_results)  # replicated scales: rank grads sum to W × global
    torch.testing.assert_close(ds, WORLD * ref_ds, rtol=rtol, atol=rtol * ref_ds.abs().max().item())


def test_each_modality_is_gathered_once(rank_results):
    """allgather: 1 row check + 1 mask/group gather + ONE gather of the six stacked keys forward, one
    all-reduce backward; the ring: the check and the masks only (features go point to point, once per
    step for every key). The per-term calls pay 22 gathers and 12 all-reduces for the same six terms."""
    for res in rank_results:
        assert res[("allgather", "torch")][0].keys() == {t.name for t in TERMS}
        assert res[("allgather", "torch", "counts")] == {"all_gather": 3, "all_reduce": 1}
        assert res[("ring", "torch", "counts")] == {"all_gather": 2, "all_reduce": 0}
        assert res["per_term_counts"] == {"all_gather": 22, "all_reduce": 12}
        if ("allgather", "triton", "counts") in res:
            assert res[("allgather", "triton", "counts")] == {"all_gather": 3, "all_reduce": 1}
