"""``groups_as="positive"``: same-group pairs of the SigLIP loss are positives (z = +1), in every path.

Each path (float64 reference, chunked torch, Triton in the interpreter, the all-gather and the ring on
2 gloo ranks) is checked against :func:`_explicit_z_loss`, an independent float64 oracle that writes
the label matrix out pair by pair: ``z_ij = +1`` at row i's positive and wherever row i and key j share
a group (``NO_GROUP`` matches nothing), ``-1`` elsewhere. Loss and gradients of ``a``, ``b``, the scale
and the bias; ``groups_as="exclude"`` (the default) is unchanged (tests/kernels/test_sigmoid_grouped.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import gathered_sigmoid_loss, sigmoid_loss
from kernels.grouped import NO_GROUP
from kernels.sigmoid_reference import sigmoid_loss_reference, sigmoid_loss_torch
from kernels.sigmoid_ring import ring_sigmoid_loss
from tests.kernels.test_sigmoid_grouped import _inputs  # the same inputs as the excluding mode's tests
from tests.spawn_ranks import gloo_rank, run_ranks

GRAD_OUT = 0.37


def _explicit_z_loss(a, b, s, t, targets=None, key_valid=None, groups=None, key_groups=None):
    """The multi-positive sigmoid loss from an explicit (m, n) label matrix (float64, autograd).

    Written independently of the kernels: ``z`` and the pair mask are filled pair by pair in Python.
    Valid rows: ``targets[i] >= 0`` with a valid positive key; loss = Σ over (valid row, valid key)
    of ``-log σ(z x)`` divided by the number of valid rows.
    """
    m, n = a.shape[0], b.shape[0]
    targets = list(range(m)) if targets is None else targets.tolist()
    kv = [True] * n if key_valid is None else key_valid.tolist()
    rg = groups.tolist()
    kg = rg if key_groups is None else key_groups.tolist()
    z = torch.full((m, n), -1.0, dtype=torch.float64)
    live = torch.zeros(m, n, dtype=torch.float64)
    rows = 0
    for i in range(m):
        if targets[i] < 0 or not kv[targets[i]]:
            continue
        rows += 1
        for j in range(n):
            live[i, j] = 1.0 if kv[j] else 0.0
            if j == targets[i] or (rg[i] != NO_GROUP and rg[i] == kg[j]):
                z[i, j] = 1.0
    x = s.double().reshape(()) * (a.double() @ b.double().T) + t.double().reshape(())
    return (live * -F.logsigmoid(z * x)).sum() / max(rows, 1)


def _loss_and_grads(fn, a, b, s, t, *args, **kwargs):
    a, b, s, t = (x.detach().clone().requires_grad_() for x in (a, b, s, t))
    loss = fn(a, b, s, t, *args, **kwargs)
    (loss * GRAD_OUT).backward()
    return loss.detach().double(), *(x.grad.double() for x in (a, b, s, t))


def _assert_all_close(got, ref, rtol, atol):
    for name, g, r in zip(("loss", "da", "db", "ds", "dt"), got, ref):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=name)


def _key_valid(n, masked):
    return torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.25 if masked else None


@pytest.mark.parametrize("m,n", [(1, 5), (6, 6), (7, 23), (23, 7)])
@pytest.mark.parametrize("masked", [False, True], ids=["all_keys", "key_valid"])
def test_reference_and_torch_op_match_the_explicit_z_oracle(m, n, masked):
    a, b, s, t, targets, groups, key_groups = _inputs(m, n, seed=m + n)
    targets[-1] = -1 if m > 1 else targets[-1]  # an ignored row
    kw = {"key_valid": _key_valid(n, masked), "groups": groups, "key_groups": key_groups}
    want = _loss_and_grads(_explicit_z_loss, a, b, s, t, targets, **kw)
    ref = _loss_and_grads(sigmoid_loss_reference, a, b, s, t, targets, groups_as="positive", **kw)
    _assert_all_close(ref, want, rtol=1e-12, atol=1e-14)
    for chunk in (3, 4096):
        got = _loss_and_grads(sigmoid_loss_torch, a, b, s, t, targets, groups_as="positive", chunk_size=chunk, **kw)
        _assert_all_close(got, want, rtol=1e-12, atol=1e-14)
    got = _loss_and_grads(sigmoid_loss, a, b, s, t, targets, groups_as="positive", backend="torch", **kw)
    _assert_all_close(got, want, rtol=1e-12, atol=1e-14)
    if m > 1:  # this batch has same-group pairs: positives and exclusion differ
        excluded = sigmoid_loss_reference(a, b, s, t, targets, **kw)
        assert abs(excluded.item() - want[0].item()) > 1e-3


def test_paired_rows_default_key_groups_and_gradcheck():
    """m == n with ``groups`` only (key groups = row groups, as the distributed paths pass them)."""
    a, b, s, t, _, _, _ = _inputs(8, 8, d=4)
    groups = torch.tensor([3, NO_GROUP, 3, 1, NO_GROUP, 1, 3, 8])
    want = _loss_and_grads(_explicit_z_loss, a, b, s, t, groups=groups)
    got = _loss_and_grads(sigmoid_loss_torch, a, b, s, t, groups=groups, groups_as="positive", chunk_size=3)
    _assert_all_close(got, want, rtol=1e-12, atol=1e-14)
    leaves = [x.clone().requires_grad_() for x in (a, b, s, t)]
    fn = lambda *x: sigmoid_loss_torch(*x, groups=groups, groups_as="positive", chunk_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_same_group_keys_get_the_positive_gradient():
    """Row 0's same-group key 2 is pulled toward it (as its own positive 0 is), not skipped or pushed."""
    a, b, s, t, _, _, _ = _inputs(5, 5)
    groups = torch.tensor([3, NO_GROUP, 3, 1, NO_GROUP])
    only_row0 = torch.tensor([0, -1, -1, -1, -1])
    b_leaf = b.clone().requires_grad_()
    sigmoid_loss_torch(a, b_leaf, s, t, only_row0, groups=groups, groups_as="positive").backward()
    # dL/db_j = s w z_j (σ(z_j x_j) − 1) a_0: along -a_0 for a positive (z = +1), along +a_0 for a negative
    along = b_leaf.grad @ a[0]
    assert along[0] < 0 and along[2] < 0
    assert along[1] > 0 and along[3] > 0 and along[4] > 0


def test_default_is_exclude_and_no_duplicates_is_the_plain_loss():
    a, b, s, t, targets, groups, key_groups = _inputs(7, 9)
    kw = {"groups": groups, "key_groups": key_groups}
    for fn in (sigmoid_loss_reference, sigmoid_loss_torch):
        default = _loss_and_grads(fn, a, b, s, t, targets, **kw)
        exclude = _loss_and_grads(fn, a, b, s, t, targets, groups_as="exclude", **kw)
        _assert_all_close(exclude, default, rtol=0, atol=0)
    plain = _loss_and_grads(sigmoid_loss_torch, a, b, s, t)
    nobody = torch.full((7,), NO_GROUP), torch.full((9,), NO_GROUP)  # NO_GROUP never matches NO_GROUP
    disjoint = torch.arange(7) * 5, torch.arange(9) * 5 + 1  # every row and key in its own group
    for ids, key_ids in (nobody, disjoint):
        for groups_as in ("exclude", "positive"):
            got = _loss_and_grads(sigmoid_loss_torch, a, b, s, t, groups=ids, key_groups=key_ids, groups_as=groups_as)
            _assert_all_close(got, plain, rtol=0, atol=0)


def test_groups_as_is_validated_in_every_entry_point():
    a, b, s, t, targets, groups, key_groups = _inputs(6, 6)
    calls = [
        lambda: sigmoid_loss_reference(a, b, s, t, groups=groups, groups_as="positives"),
        lambda: sigmoid_loss_torch(a, b, s, t, groups=groups, groups_as=True),
        lambda: sigmoid_loss(a, b, s, t, groups=groups, groups_as="both", backend="torch"),
        lambda: gathered_sigmoid_loss(a, b, s, t, groups_local=groups, groups_as="include"),
        lambda: ring_sigmoid_loss(a, b, s, t, groups=groups, groups_as="Positive"),  # before any collective
    ]
    try:
        from kernels.sigmoid_triton import sigmoid_loss_triton
    except ImportError:  # no Triton: the other entry points are still checked
        pass
    else:
        calls.append(lambda: sigmoid_loss_triton(a.float(), b.float(), s, t, groups=groups, groups_as="exclusive"))
    for call in calls:
        with pytest.raises(ValueError, match="groups_as must be 'exclude' or 'positive'"):
            call()


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)


@pytest.mark.parametrize("m,n,masked", [(7, 41, True), (41, 9, False), (64, 64, True)])
def test_triton_matches_the_explicit_z_oracle(m, n, masked):
    pytest.importorskip("triton")
    from tests.kernels import triton_helpers
    from tests.kernels.triton_helpers import DEVICE, rel_err

    if not triton_helpers._RUNNABLE:
        pytest.skip("no GPU and Triton imported before TRITON_INTERPRET=1 was set")
    a, b, s, t, targets, groups, key_groups = _inputs(m, n, d=24, seed=2 * m + n, n_groups=2)
    targets[0] = -1
    kw = {"key_valid": _key_valid(n, masked), "groups": groups, "key_groups": key_groups}
    want = _loss_and_grads(_explicit_z_loss, a, b, s, t, targets, **kw)
    dev = {k: None if v is None else v.to(DEVICE) for k, v in kw.items()}
    args = [x.to(DEVICE, torch.float32) for x in (a, b, s, t)]
    got = _loss_and_grads(sigmoid_loss, *args, targets.to(DEVICE), backend="triton", groups_as="positive", **dev)
    for name, g, r in zip(("loss", "da", "db", "ds", "dt"), got, want):
        assert rel_err(g.cpu(), r) <= 1e-4, (name, rel_err(g.cpu(), r))
    excluded = sigmoid_loss_reference(a, b, s, t, targets, **kw)
    assert abs(excluded.item() - want[0].item()) > 1e-3  # the flag matters on this batch


# ----------------------------------------------------------------------------- 2 gloo ranks

WORLD, GLOBAL_BATCH, DIM = 2, 12, 8
TIMEOUT_S = 120.0  # a hang guard: spawned ranks start slowly on a busy 2-core host
STRATEGIES = ("allgather", "ring")


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1),
        "b": F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1),
        "scale": torch.tensor([3.0], dtype=torch.float64),
        "bias": torch.tensor([-2.0], dtype=torch.float64),
        "valid": torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool),
        # groups 5 and 7 cross the rank boundary (rows 0-5 | 6-11); -1: no group
        "groups": torch.tensor([5, -1, 5, 7, 7, -1, 5, 3, 7, -1, 9, 9]),
    }


def _rank_results(rank: int) -> dict:
    data = _global_batch()
    rows = GLOBAL_BATCH // WORLD
    local = slice(rank * rows, (rank + 1) * rows)
    out = {}
    for strategy in STRATEGIES:
        for masked in (False, True):
            a, b, s, t = (
                x.clone().requires_grad_() for x in (data["a"][local], data["b"][local], data["scale"], data["bias"])
            )
            loss = gathered_sigmoid_loss(
                a,
                b,
                s,
                t,
                valid_local=data["valid"][local] if masked else None,
                groups_local=data["groups"][local],
                groups_as="positive",
                strategy=strategy,
                backend="torch",
            )
            loss.backward()
            out[strategy, masked] = {"loss": loss.detach(), "a": a.grad, "b": b.grad, "s": s.grad, "t": t.grad}
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    gloo_rank(rank, WORLD, init_file, out_dir, lambda: _rank_results(rank))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo_sigmoid_positive")
    return run_ranks(_worker, lambda r: (r, str(tmp / "rendezvous"), str(tmp)), WORLD, tmp, TIMEOUT_S, "rank")


def _global_reference(masked: bool) -> dict:
    data = _global_batch()
    valid = data["valid"] if masked else torch.ones(GLOBAL_BATCH, dtype=torch.bool)
    targets = torch.where(valid, torch.arange(GLOBAL_BATCH), -1)
    a, b, s, t = (x.clone().requires_grad_() for x in (data["a"], data["b"], data["scale"], data["bias"]))
    loss = _explicit_z_loss(a, b, s, t, targets, key_valid=valid, groups=data["groups"])
    loss.backward()
    return {"loss": loss.detach(), "a": a.grad, "b": b.grad, "s": s.grad, "t": t.grad}


@pytest.mark.parametrize("masked", [False, True], ids=["all_pairs", "valid_local"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_match_the_global_explicit_z_oracle(rank_results, strategy, masked):
    ref = _global_reference(masked)
    res = [r[strategy, masked] for r in rank_results]
    torch.testing.assert_close(sum(r["loss"] for r in res) / WORLD, ref["loss"], rtol=1e-10, atol=1e-12)
    rows = GLOBAL_BATCH // WORLD
    for rank, r in enumerate(res):  # local embeddings: W x the global gradient
        local = slice(rank * rows, (rank + 1) * rows)
        for name in ("a", "b"):
            torch.testing.assert_close(r[name], WORLD * ref[name][local], rtol=1e-9, atol=1e-12, msg=name)
    for name in ("s", "t"):  # replicated: the ranks' gradients sum to W x the global one
        torch.testing.assert_close(sum(r[name] for r in res), WORLD * ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_single_process_fallback_is_the_one_process_loss():
    data = _global_batch()
    a, b, s, t, valid, groups = (data[k] for k in ("a", "b", "scale", "bias", "valid", "groups"))
    want = _explicit_z_loss(a, b, s, t, torch.where(valid, torch.arange(GLOBAL_BATCH), -1), valid, groups)
    for strategy in STRATEGIES:
        got = gathered_sigmoid_loss(
            a, b, s, t, valid_local=valid, groups_local=groups, groups_as="positive", strategy=strategy
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
