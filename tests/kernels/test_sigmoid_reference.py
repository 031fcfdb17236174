"""kernels.sigmoid_reference and kernels.sigmoid: the chunked SigLIP loss against the float64 oracle.

The oracle is ``sigmoid_loss_reference`` (materialised, float64), itself checked against a loop over
pairs written straight from the paper's definition. Half-precision inputs are quantised first and the
oracle runs on the same quantised values, so the tolerances measure the op's fp32 arithmetic (and the
rounding of gradients to the input dtype).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import sigmoid_loss
from kernels.sigmoid_reference import sigmoid_loss_reference, sigmoid_loss_torch

TOL = {  # dtype -> (loss rtol, grad rtol); grad atol is rtol x max|grad|
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-2, 1e-2),
}
GRAD_OUT = 0.37
SIZES = [1, 7, 41, 401]


def _inputs(m, n, d, dtype, seed=0, scale=10.0, bias=-5.0, scale_shape=(1,)):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype)
    b = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    if min(m, n) > 1:  # make some positives clearly aligned so that both loss terms matter
        k = min(m, n) // 2
        b[:k] = F.normalize(a[:k].float() + 0.3 * b[:k].float(), dim=1).to(dtype)
    s = torch.full(scale_shape, scale, dtype=torch.float32)
    t = torch.full(scale_shape, bias, dtype=torch.float32)
    targets = torch.randint(0, n, (m,), generator=g)
    targets[: min(m, n) // 2] = torch.arange(min(m, n) // 2)
    return a, b, s, t, targets


def _loss_and_grads(fn, a, b, s, t, *args, **kwargs):
    """Runs ``fn`` on fresh leaves and backprops ``GRAD_OUT * loss``; returns (loss, da, db, ds, dt)."""
    a, b, s, t = (x.detach().clone().requires_grad_() for x in (a, b, s, t))
    loss = fn(a, b, s, t, *args, **kwargs)
    (loss * GRAD_OUT).backward()
    return loss.detach(), a.grad, b.grad, s.grad, t.grad


def _assert_close_rel(actual, expected, rtol):
    expected = expected.to(torch.float64)
    atol = rtol * max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol)


def _assert_matches_oracle(a, b, s, t, targets, dtype, key_valid=None, chunk_size=4096, fn=None):
    loss_rtol, grad_rtol = TOL[dtype]
    fn = fn or (lambda *x, **kw: sigmoid_loss_torch(*x, chunk_size=chunk_size, **kw))
    got = _loss_and_grads(fn, a, b, s, t, targets, key_valid=key_valid)
    ref = _loss_and_grads(
        sigmoid_loss_reference, a.double(), b.double(), s.double(), t.double(), targets, key_valid=key_valid
    )
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_close_rel(got[0], ref[0], loss_rtol)
    for g, r, x in zip(got[1:], ref[1:], (a, b, s, t)):
        assert g.dtype == x.dtype and g.shape == x.shape
        _assert_close_rel(g, r, grad_rtol)
    return got


def _loop_loss(a, b, s, t, targets, key_valid):
    """The paper's definition, pair by pair in Python floats (checks the oracle itself)."""
    rows = [i for i in range(a.shape[0]) if targets[i] >= 0 and key_valid[targets[i]]]
    total = 0.0
    for i in rows:
        for j in range(b.shape[0]):
            if key_valid[j]:
                z = 1.0 if j == targets[i] else -1.0
                x = s * float(a[i] @ b[j]) + t
                total += math.log1p(math.exp(-z * x))  # -log σ(z x)
    return total / max(len(rows), 1)


def test_oracle_matches_pairwise_definition():
    a, b, s, t, targets = _inputs(5, 6, 3, torch.float64, scale=3.0, bias=-1.5)
    targets[1] = -1
    key_valid = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    targets[2] = 2  # positive masked: the row is ignored
    got = sigmoid_loss_reference(a, b, s, t, targets, key_valid=key_valid)
    want = _loop_loss(a, b, 3.0, -1.5, targets.tolist(), key_valid.tolist())
    assert abs(got.item() - want) < 1e-12


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("d", [3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_oracle(m, n, d, dtype):
    a, b, s, t, targets = _inputs(m, n, d, dtype, seed=m * 1000 + n)
    chunk = max(n // 3, 1)  # several chunks, the last one ragged
    got = _assert_matches_oracle(a, b, s, t, targets, dtype, chunk_size=chunk)
    assert torch.isfinite(got[0]) and got[0] > 0


@pytest.mark.parametrize("m,n", [(7, 7), (41, 401), (1, 41)])
def test_default_targets_are_the_diagonal(m, n):
    a, b, s, t, _ = _inputs(m, n, 64, torch.float32)
    _assert_matches_oracle(a, b, s, t, None, torch.float32, chunk_size=16)
    torch.testing.assert_close(sigmoid_loss_torch(a, b, s, t), sigmoid_loss_torch(a, b, s, t, torch.arange(m)))
    with pytest.raises(ValueError, match="m <= n"):
        sigmoid_loss_torch(b[:3], a[:2], s, t)


def _chunked(chunk_size):
    return lambda *x, **kw: sigmoid_loss_torch(*x, chunk_size=chunk_size, **kw)


def test_chunking_does_not_change_the_result():
    a, b, s, t, targets = _inputs(41, 401, 64, torch.float32)
    ref = _loss_and_grads(_chunked(401), a, b, s, t, targets)
    for chunk in (1, 7, 64, 400):
        got = _loss_and_grads(_chunked(chunk), a, b, s, t, targets)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, rtol=2e-6, atol=1e-6 * r.abs().max().item())


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_scale_and_bias_gradients(scale_shape):
    a, b, s, t, targets = _inputs(41, 41, 64, torch.float32, scale=7.0, bias=-3.0, scale_shape=scale_shape)
    _, _, _, ds, dt = _assert_matches_oracle(a, b, s, t, targets, torch.float32, chunk_size=10)
    assert ds.shape == torch.Size(scale_shape) and dt.shape == torch.Size(scale_shape)
    assert ds.abs().item() > 0 and dt.abs().item() > 0
    # dL/dt by finite differences of the float64 oracle
    eps = 1e-6
    f = lambda tt: sigmoid_loss_reference(a.double(), b.double(), s.double(), tt, targets).item()
    fd = (f(t.double() + eps) - f(t.double() - eps)) / (2 * eps)
    assert abs(dt.item() / GRAD_OUT - fd) < 1e-4 * max(abs(fd), 1)


def test_masks_and_ignored_rows():
    a, b, s, t, targets = _inputs(41, 401, 64, torch.float32)
    g = torch.Generator().manual_seed(1)
    key_valid = torch.rand(401, generator=g) > 0.3
    targets[0] = int(torch.nonzero(~key_valid)[0])  # positive masked: the row contributes nothing
    targets[1] = -1
    got = _assert_matches_oracle(a, b, s, t, targets, torch.float32, key_valid=key_valid, chunk_size=50)
    da, db = got[1], got[2]
    assert torch.all(da[:2] == 0)
    assert torch.all(db[~key_valid] == 0)  # a masked key is neither positive nor negative
    # masking a key is the same as deleting it (with the targets renumbered)
    keep = torch.nonzero(key_valid).squeeze(1)
    renumber = torch.full((401,), -1, dtype=torch.long)
    renumber[keep] = torch.arange(keep.numel())
    t_kept = torch.where(targets >= 0, renumber[targets.clamp(min=0)], -1)
    deleted = sigmoid_loss_torch(a, b[keep], s, t, t_kept, chunk_size=50)
    torch.testing.assert_close(got[0], deleted)


def test_all_rows_ignored_gives_zero_loss_and_zero_grads():
    a, b, s, t, _ = _inputs(9, 11, 8, torch.float32)
    for fn in (sigmoid_loss_torch, sigmoid_loss_reference):
        loss, da, db, ds, dt = _loss_and_grads(fn, a, b, s, t, torch.full((9,), -1))
        assert loss.item() == 0.0
        for grad in (da, db, ds, dt):
            assert grad is not None and torch.all(grad == 0)
    loss, da, db, ds, dt = _loss_and_grads(sigmoid_loss_torch, a[:3], b[:0], s, t, torch.full((3,), -1))
    assert loss.item() == 0.0 and not da.any() and db.shape == (0, 8) and ds.item() == 0.0 and dt.item() == 0.0


def test_gradcheck_float64():
    a, b, s, t, targets = _inputs(6, 9, 4, torch.float64, scale=2.0, bias=-1.0)
    targets[2] = -1
    key_valid = torch.ones(9, dtype=torch.bool)
    key_valid[4] = False
    leaves = [x.double().clone().requires_grad_() for x in (a, b, s, t)]
    fn = lambda *x: sigmoid_loss_torch(*x, targets, key_valid=key_valid, chunk_size=4)
    assert torch.autograd.gradcheck(fn, leaves)


class _ShapeRecorder(TorchDispatchMode):
    """Records the element count of every tensor produced by any aten op."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.numels += [x.numel() for x in flat if isinstance(x, torch.Tensor)]
        return out


def test_memory_is_bounded_by_m_times_chunk():
    m, n, d, chunk = 96, 80, 8, 16
    a, b, s, t, targets = _inputs(m, n, d, torch.float32)
    a, b, s, t = (x.requires_grad_() for x in (a, b, s, t))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        with _ShapeRecorder() as rec:
            sigmoid_loss_torch(a, b, s, t, targets, chunk_size=chunk).backward()
    assert max(saved) <= max(m, n) * d  # inputs and (m,) vectors only: no logits saved
    assert max(rec.numels) <= max(m * chunk, max(m, n) * d) < m * n
    with _ShapeRecorder() as rec_ref:  # the recorder does see a materialised m x n tensor
        sigmoid_loss_reference(a, b, s, t, targets).backward()
    assert max(rec_ref.numels) >= m * n


def test_argument_validation():
    a, b, s, t, targets = _inputs(5, 7, 4, torch.float32)
    with pytest.raises(ValueError, match="logit_scale"):
        sigmoid_loss_torch(a, b, torch.ones(2), t, targets)
    with pytest.raises(ValueError, match="bias"):
        sigmoid_loss_torch(a, b, s, -1.0, targets)
    with pytest.raises(ValueError, match="targets"):
        sigmoid_loss_torch(a, b, s, t, targets.float())
    with pytest.raises(ValueError, match="key_valid"):
        sigmoid_loss_torch(a, b, s, t, targets, key_valid=torch.ones(7))
    with pytest.raises(ValueError, match=r"\(m, d\)"):
        sigmoid_loss_torch(a, b[:, :3], s, t, targets)
    with pytest.raises(ValueError, match="chunk_size"):
        sigmoid_loss_torch(a, b, s, t, targets, chunk_size=0)


def test_double_backward_is_refused_not_silently_dropped():
    a, b, s, t, targets = _inputs(5, 7, 8, torch.float32)
    a.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(sigmoid_loss_torch(a, b, s, t, targets), a, create_graph=True)


def test_functional_dispatch():
    a, b, s, t, targets = _inputs(7, 41, 64, torch.float32)
    key_valid = torch.ones(41, dtype=torch.bool)
    key_valid[3] = False
    want = sigmoid_loss_torch(a, b, s, t, targets, key_valid=key_valid)
    for backend in ("auto", "torch"):
        got = sigmoid_loss(a, b, s, t, targets, key_valid=key_valid, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(sigmoid_loss(a, b, 10.0, -5.0, targets), sigmoid_loss_torch(a, b, s, t, targets))
    with pytest.raises(ValueError, match="backend"):
        sigmoid_loss(a, b, s, t, backend="cuda")


def test_autocast_does_not_lower_precision():
    a, b, s, t, targets = _inputs(41, 41, 64, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sigmoid_loss_torch(a, b, s, t, targets)
    torch.testing.assert_close(got.double(), sigmoid_loss_reference(a, b, s, t, targets), rtol=1e-5, atol=0)
