"""kernels.infonce_reference (chunked torch InfoNCE) and the kernels.functional dispatcher.

The oracle is an independent float64 materialised implementation written here; inputs in half
precision are quantised first and the oracle runs on the same quantised values.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import functional
from kernels.functional import infonce, rank_symmetric_infonce, symmetric_infonce
from kernels.infonce_reference import infonce_eager, infonce_torch

SHAPES = [(1, 7, 5), (37, 53, 24), (129, 300, 64)]  # (m, n, d)
TOL = {  # dtype -> (loss rtol, grad rtol); grad atol is rtol x max|grad|
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}
GRAD_OUT = 0.37


def _oracle(q, k, s, targets, key_valid=None):
    """float64 materialised InfoNCE with -inf masked columns; ignored rows leave the mean."""
    logits = s.double().reshape(()) * (q.double() @ k.double().T)
    safe = targets.clamp(min=0)
    valid = targets >= 0
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid, float("-inf"))
        valid = valid & key_valid[safe]
    per_row = logits.logsumexp(1) - logits.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp(min=1)


def _inputs(m, n, d, dtype, seed=0, scale=14.0, scale_shape=()):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    s = torch.full(scale_shape, scale, dtype=torch.float32)
    targets = torch.randint(0, n, (m,), generator=g)
    return q, k, s, targets


def _loss_and_grads(fn, q, k, s, *args, **kwargs):
    """Runs ``fn`` on fresh leaves, backprops ``GRAD_OUT * loss``; returns (loss, dq, dk, ds)."""
    q, k, s = (t.detach().clone().requires_grad_() for t in (q, k, s))
    loss = fn(q, k, s, *args, **kwargs)
    (loss * GRAD_OUT).backward()
    return loss.detach(), q.grad, k.grad, s.grad


def _assert_close(actual, expected, rtol):
    expected = expected.to(torch.float64)
    atol = rtol * max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol)


def _assert_matches_oracle(q, k, s, targets, dtype, key_valid=None, chunk_size=1024, fn=None):
    loss_rtol, grad_rtol = TOL[dtype]
    fn = fn or (lambda *a, **kw: infonce_torch(*a, chunk_size=chunk_size, **kw))
    got = _loss_and_grads(fn, q, k, s, targets, key_valid=key_valid)
    ref = _loss_and_grads(_oracle, q.double(), k.double(), s.double(), targets, key_valid)
    _assert_close(got[0], ref[0], loss_rtol)
    for g, r, x in zip(got[1:], ref[1:], (q, k, s)):
        assert g.dtype == x.dtype and g.shape == x.shape
        _assert_close(g, r, grad_rtol)
    return got


@pytest.mark.parametrize("m,n,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_matches_float64_oracle(m, n, d, dtype, chunk_size):
    q, k, s, targets = _inputs(m, n, d, dtype)
    got = _assert_matches_oracle(q, k, s, targets, dtype, chunk_size=chunk_size)
    assert got[0].dtype == torch.float32


def test_default_targets_are_the_diagonal():
    q, k, s, _ = _inputs(37, 53, 24, torch.float32)
    _assert_matches_oracle(q, k, s, torch.arange(37), torch.float32, chunk_size=10)
    default = infonce_torch(q, k, s, chunk_size=10)
    torch.testing.assert_close(default, infonce_torch(q, k, s, torch.arange(37), chunk_size=10))
    with pytest.raises(ValueError, match="m <= n"):
        infonce_torch(k, q, s)


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_logit_scale_grad_shape_and_value(scale_shape):
    q, k, s, targets = _inputs(37, 53, 24, torch.float32, scale=3.5, scale_shape=scale_shape)
    _, _, _, ds = _assert_matches_oracle(q, k, s, targets, torch.float32, chunk_size=16)
    assert ds.shape == torch.Size(scale_shape) and ds.abs().item() > 0


def test_ignored_rows():
    q, k, s, targets = _inputs(129, 300, 64, torch.float32)
    targets[::3] = -1
    _, dq, _, _ = _assert_matches_oracle(q, k, s, targets, torch.float32, chunk_size=50)
    assert torch.all(dq[::3] == 0)


@pytest.mark.parametrize("fn", [infonce_torch, infonce_eager], ids=["torch", "eager"])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(fn):
    q, k, s, _ = _inputs(9, 11, 8, torch.float32)
    loss, dq, dk, ds = _loss_and_grads(fn, q, k, s, torch.full((9,), -1))
    assert loss.item() == 0.0
    for g in (dq, dk, ds):
        assert g is not None and torch.all(g == 0)
    q, k = q[:3], k[:0]  # no keys at all: still a defined, zero loss
    loss, dq, dk, ds = _loss_and_grads(fn, q, k, s, torch.full((3,), -1))
    assert loss.item() == 0.0 and not dq.any() and dk.shape == (0, 8) and ds.item() == 0.0


def test_key_valid_masks_columns_and_rows_without_positive():
    q, k, s, targets = _inputs(37, 53, 24, torch.float32)
    g = torch.Generator().manual_seed(1)
    key_valid = torch.rand(53, generator=g) > 0.3
    targets[0] = int(torch.nonzero(~key_valid)[0])  # a row whose positive is masked: ignored
    targets[1] = -1
    got = _assert_matches_oracle(q, k, s, targets, torch.float32, key_valid=key_valid, chunk_size=8)
    dq, dk = got[1], got[2]
    assert torch.all(dq[:2] == 0)
    assert torch.all(dk[~key_valid] == 0)  # a masked key is neither positive nor negative


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_baseline_matches_oracle(dtype):
    q, k, s, targets = _inputs(37, 53, 24, dtype)
    targets[5] = -1
    key_valid = torch.ones(53, dtype=torch.bool)
    key_valid[[0, 7, 30]] = False
    _assert_matches_oracle(q, k, s, targets, dtype, key_valid=key_valid, fn=infonce_eager)


def test_gradcheck_float64():
    q, k, s, targets = _inputs(6, 9, 4, torch.float64, scale=2.0)
    targets[2] = -1
    key_valid = torch.ones(9, dtype=torch.bool)
    key_valid[4] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, s.double())]
    fn = lambda q_, k_, s_: infonce_torch(q_, k_, s_, targets, key_valid=key_valid, chunk_size=4)
    assert torch.autograd.gradcheck(fn, leaves)


class _ShapeRecorder(TorchDispatchMode):
    """Records the element count of every tensor produced by any aten op."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.numels += [t.numel() for t in flat if isinstance(t, torch.Tensor)]
        return out


def test_memory_is_bounded_by_chunk_times_n():
    m, n, d, chunk = 96, 80, 8, 16
    q, k, s, targets = _inputs(m, n, d, torch.float32)
    q, k, s = (t.requires_grad_() for t in (q, k, s))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with _ShapeRecorder() as rec:
            loss = infonce_torch(q, k, s, targets, chunk_size=chunk)
            loss.backward()
    assert max(saved) <= max(m, n) * d  # inputs and (m,) vectors only: no logits saved
    assert max(rec.numels) <= chunk * n < m * n
    # The recorder does see a materialised m x n tensor when there is one.
    with _ShapeRecorder() as rec_eager:
        infonce_eager(q, k, s, targets).backward()
    assert max(rec_eager.numels) >= m * n


def test_argument_validation():
    q, k, s, targets = _inputs(5, 7, 4, torch.float32)
    with pytest.raises(ValueError, match="logit_scale"):
        infonce_torch(q, k, torch.ones(2), targets)
    with pytest.raises(ValueError, match="targets"):
        infonce_torch(q, k, s, targets.float())
    with pytest.raises(ValueError, match="key_valid"):
        infonce_torch(q, k, s, targets, key_valid=torch.ones(7))
    with pytest.raises(ValueError, match=r"\(m, d\)"):
        infonce_torch(q, k[:, :3], s, targets)
    with pytest.raises(ValueError, match="chunk_size"):
        infonce_torch(q, k, s, targets, chunk_size=0)


# --- kernels.functional -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_dispatcher_on_cpu(backend):
    q, k, s, targets = _inputs(37, 53, 24, torch.float32)
    targets[3] = -1
    fn = lambda *a, **kw: infonce(*a, backend=backend, **kw)
    _assert_matches_oracle(q, k, s, targets, torch.float32, fn=fn)
    with pytest.raises(ValueError, match="backend"):
        infonce(q, k, s, backend="cuda")


def test_triton_backend_routes_to_the_kernel_with_masks(monkeypatch):
    calls = []

    def fake_triton(q, k, logit_scale, targets=None, *, key_valid=None):
        calls.append((targets, key_valid))
        return infonce_torch(q, k, logit_scale, targets, key_valid=key_valid)

    monkeypatch.setattr(functional, "_load_triton", lambda: fake_triton)
    q, k, s, targets = _inputs(37, 53, 24, torch.float32)
    key_valid = torch.rand(53, generator=torch.Generator().manual_seed(2)) > 0.25
    fn = lambda *a, **kw: infonce(*a, backend="triton", **kw)
    _assert_matches_oracle(q, k, s, targets, torch.float32, key_valid=key_valid, fn=fn)
    assert len(calls) == 1 and calls[0][0] is targets and calls[0][1] is key_valid
    infonce(q, k, s, backend="auto")  # CPU tensors: "auto" never picks Triton
    assert len(calls) == 1


def test_float_logit_scale_is_accepted():
    q, k, s, targets = _inputs(5, 7, 4, torch.float32)
    torch.testing.assert_close(infonce(q, k, 14.0, targets), infonce(q, k, s, targets))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rank_share_backends_agree_and_take_a_float_scale(backend):
    """kernels.rank_symmetric_infonce: rank 1 of 2 (offset 4), a presence mask; the Triton backend (the
    interpreter on CPU) and a float logit scale give the torch backend's share."""
    if backend == "triton":
        pytest.importorskip("triton")
    a_all, b_all, s, _ = _inputs(8, 8, 6, torch.float32)
    valid = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    want = rank_symmetric_infonce(
        a_all[4:], b_all[4:], a_all, b_all, s, offset=4, world=2, key_valid=valid, backend="torch"
    )
    got = rank_symmetric_infonce(
        a_all[4:], b_all[4:], a_all, b_all, 14.0, offset=4, world=2, key_valid=valid, backend=backend
    )
    assert float(s) == 14.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _symmetric_oracle(a, b, s, valid):
    t = torch.where(valid, torch.arange(a.shape[0]), -1)
    return 0.5 * (_oracle(a, b, s, t, valid) + _oracle(b, a, s, t, valid))


@pytest.mark.parametrize("masked", [False, True])
def test_symmetric_infonce(masked):
    a, b, s, _ = _inputs(37, 37, 24, torch.float32)
    valid = torch.arange(37) % 4 != 1 if masked else torch.ones(37, dtype=torch.bool)
    kw = {"valid": valid} if masked else {}
    got = _loss_and_grads(lambda a_, b_, s_: symmetric_infonce(a_, b_, s_, backend="torch", **kw), a, b, s)
    ref = _loss_and_grads(_symmetric_oracle, a.double(), b.double(), s.double(), valid)
    for x, y in zip(got, ref):
        _assert_close(x, y, 1e-4)


def test_package_attribute_infonce_is_the_function():
    """Importing the submodules must leave ``kernels.infonce`` bound to the contract function.

    Regression test: the Triton module used to be ``kernels/infonce.py``, and importing it replaced
    the package attribute ``kernels.infonce`` (the dispatcher) with the module.
    """
    for name in ("kernels.infonce_triton", "kernels.ring"):
        try:
            importlib.import_module(name)
        except ImportError:  # no triton here: the submodule cannot shadow anything
            pass
    import kernels

    assert kernels.infonce is functional.infonce


def test_double_backward_is_refused_not_silently_dropped():
    q, k, s, targets = _inputs(5, 7, 8, torch.float32)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(infonce_torch(q, k, s, targets), q, create_graph=True)
