"""The grouped (false-negative) SigLIP loss: same-group pairs other than a row's positive are excluded.

The float64 oracle (``sigmoid_loss_reference`` with ``groups``) is checked against a loop over pairs
written from the definition; the chunked torch op and the Triton kernel (the interpreter on CPU,
tests/kernels/conftest.py) are checked against the oracle, losses and every gradient. The
distributed strategies are checked in tests/kernels/test_sigmoid_distributed.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels import sigmoid_loss
from kernels.grouped import NO_GROUP
from kernels.sigmoid_reference import sigmoid_loss_reference, sigmoid_loss_torch

GRAD_OUT = 0.37


def _inputs(m, n, d=6, seed=0, n_groups=3):
    """float64 embeddings with some aligned positives, targets, and group ids with NO_GROUP rows."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = min(m, n) // 2
    b[:k] = F.normalize(a[:k] + 0.3 * b[:k], dim=1)
    targets = torch.randint(0, n, (m,), generator=g)
    targets[:k] = torch.arange(k)
    groups = torch.randint(NO_GROUP, n_groups, (m,), generator=g)
    key_groups = torch.randint(NO_GROUP, n_groups, (n,), generator=g)
    key_groups[targets[:k]] = groups[:k]  # paired keys mostly share their row's group, as in training
    s = torch.tensor([4.0], dtype=torch.float64)
    t = torch.tensor([-1.5], dtype=torch.float64)
    return a, b, s, t, targets, groups, key_groups


def _loss_and_grads(fn, a, b, s, t, *args, **kwargs):
    a, b, s, t = (x.detach().clone().requires_grad_() for x in (a, b, s, t))
    loss = fn(a, b, s, t, *args, **kwargs)
    (loss * GRAD_OUT).backward()
    return loss.detach().double(), *(x.grad.double() for x in (a, b, s, t))


def _loop_loss(a, b, s, t, targets, key_valid, groups, key_groups):
    """The definition pair by pair in Python floats: a same-group pair that is not the row's positive
    is skipped, every other valid pair is a binary term (checks the oracle itself)."""
    rows = [i for i in range(a.shape[0]) if targets[i] >= 0 and key_valid[targets[i]]]
    total = 0.0
    for i in rows:
        for j in range(b.shape[0]):
            if not key_valid[j]:
                continue
            if j != targets[i] and groups[i] != NO_GROUP and groups[i] == key_groups[j]:
                continue  # a false negative: neither positive nor negative
            z = 1.0 if j == targets[i] else -1.0
            total += math.log1p(math.exp(-z * (s * float(a[i] @ b[j]) + t)))
    return total / max(len(rows), 1)


def test_oracle_matches_pairwise_definition():
    a, b, s, t, targets, groups, key_groups = _inputs(6, 8)
    targets[1] = -1
    key_valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    got = sigmoid_loss_reference(a, b, s, t, targets, key_valid=key_valid, groups=groups, key_groups=key_groups)
    want = _loop_loss(a, b, 4.0, -1.5, targets.tolist(), key_valid.tolist(), groups.tolist(), key_groups.tolist())
    assert abs(got.item() - want) < 1e-12
    ungrouped = sigmoid_loss_reference(a, b, s, t, targets, key_valid=key_valid)
    assert abs(got.item() - ungrouped.item()) > 1e-3  # the groups do exclude pairs here


@pytest.mark.parametrize("m,n", [(1, 5), (6, 6), (7, 23), (23, 7), (40, 40)])
@pytest.mark.parametrize("masked", [False, True], ids=["all_keys", "key_valid"])
def test_torch_op_matches_oracle_exactly(m, n, masked):
    a, b, s, t, targets, groups, key_groups = _inputs(m, n, seed=m + n)
    key_valid = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.25 if masked else None
    kw = {"key_valid": key_valid, "groups": groups, "key_groups": key_groups}
    ref = _loss_and_grads(sigmoid_loss_reference, a, b, s, t, targets, **kw)
    for chunk in (3, 4096):  # chunks that split the key columns, and one chunk
        got = _loss_and_grads(sigmoid_loss_torch, a, b, s, t, targets, chunk_size=chunk, **kw)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


def test_groups_without_duplicates_give_the_plain_loss():
    a, b, s, t, _, _, _ = _inputs(9, 9)
    plain = _loss_and_grads(sigmoid_loss_torch, a, b, s, t)
    for groups in (torch.full((9,), NO_GROUP), torch.arange(9) * 7):  # no group, or every row its own
        got = _loss_and_grads(sigmoid_loss_torch, a, b, s, t, groups=groups)
        for g, r in zip(got, plain):
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_excluded_pairs_get_no_gradient():
    """Two rows of one group (paired, m = n): neither one's key moves the other's row."""
    a, b, s, t, _, _, _ = _inputs(5, 5)
    groups = torch.tensor([3, NO_GROUP, 3, 1, NO_GROUP])
    b_leaf = b.clone().requires_grad_()
    # only row 0 is a query: its gradient reaches keys 1, 3, 4 (negatives) and 0 (positive), not 2
    sigmoid_loss_torch(a, b_leaf, s, t, torch.tensor([0, -1, -1, -1, -1]), groups=groups).backward()
    assert torch.all(b_leaf.grad[2] == 0)
    assert all(torch.any(b_leaf.grad[j] != 0) for j in (0, 1, 3, 4))


def test_argument_validation():
    a, b, s, t, targets, groups, key_groups = _inputs(5, 7)
    with pytest.raises(ValueError, match="key_groups"):
        sigmoid_loss_torch(a, b, s, t, targets, groups=groups)  # m != n: key ids needed
    with pytest.raises(ValueError, match="needs groups"):
        sigmoid_loss_torch(a, b, s, t, targets, key_groups=key_groups)
    with pytest.raises(ValueError, match="key_groups must be an integer tensor of shape \\(7,\\)"):
        sigmoid_loss(a, b, s, t, targets, groups=groups, key_groups=key_groups[:6], backend="torch")
    with pytest.raises(ValueError, match="groups must be an integer tensor"):
        sigmoid_loss_reference(a, b, s, t, targets, groups=groups.float(), key_groups=key_groups)


# ----------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("m,n", [(1, 7), (7, 41), (41, 9), (64, 64)])  # ragged against every tile
@pytest.mark.parametrize("masked", [False, True], ids=["all_keys", "key_valid"])
def test_triton_matches_oracle(m, n, masked):
    pytest.importorskip("triton")
    from tests.kernels import triton_helpers
    from tests.kernels.triton_helpers import DEVICE, rel_err

    if not triton_helpers._RUNNABLE:
        pytest.skip("no GPU and Triton imported before TRITON_INTERPRET=1 was set")

    a, b, s, t, targets, groups, key_groups = _inputs(m, n, d=24, seed=2 * m + n, n_groups=2)
    targets[0] = -1 if m > 1 else targets[0]
    key_valid = torch.rand(n, generator=torch.Generator().manual_seed(m)) > 0.25 if masked else None
    kw = {"key_valid": key_valid, "groups": groups, "key_groups": key_groups}
    ref = _loss_and_grads(sigmoid_loss_reference, a, b, s, t, targets, **kw)
    dev = {k: None if v is None else v.to(DEVICE) for k, v in kw.items()}
    args = [x.to(DEVICE, torch.float32) for x in (a, b, s, t)]
    got = _loss_and_grads(sigmoid_loss, *args, targets.to(DEVICE), backend="triton", **dev)
    for name, g, r in zip(("loss", "da", "db", "ds", "dt"), got, ref):
        assert rel_err(g.cpu(), r) <= 1e-4, (name, rel_err(g.cpu(), r))
    plain = sigmoid_loss_reference(a, b, s, t, targets, key_valid=key_valid)
    assert m == 1 or abs(plain.item() - ref[0].item()) > 1e-4  # grouping changed this loss
