"""kernels.infonce_reference (chunked torch InfoNCE and the eager baseline) against a float64 oracle.

The oracle (``tests/kernels/reference_helpers.py``) is an independent float64 materialised
implementation; inputs in half precision are quantised first and the oracle runs on the same quantised
values.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.infonce_reference import infonce_eager, infonce_torch
from tests.kernels.reference_helpers import assert_matches_oracle, loss_and_grads, make_inputs

SHAPES = [(1, 7, 5), (37, 53, 24), (129, 300, 64)]  # (m, n, d)


@pytest.mark.parametrize("m,n,d", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_matches_float64_oracle(m, n, d, dtype, chunk_size):
    q, k, s, targets = make_inputs(m, n, d, dtype)
    got = assert_matches_oracle(q, k, s, targets, dtype, chunk_size=chunk_size)
    assert got[0].dtype == torch.float32


def test_default_targets_are_the_diagonal():
    q, k, s, _ = make_inputs(37, 53, 24, torch.float32)
    assert_matches_oracle(q, k, s, torch.arange(37), torch.float32, chunk_size=10)
    default = infonce_torch(q, k, s, chunk_size=10)
    torch.testing.assert_close(default, infonce_torch(q, k, s, torch.arange(37), chunk_size=10))
    with pytest.raises(ValueError, match="m <= n"):
        infonce_torch(k, q, s)


@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_logit_scale_grad_shape_and_value(scale_shape):
    q, k, s, targets = make_inputs(37, 53, 24, torch.float32, scale=3.5, scale_shape=scale_shape)
    _, _, _, ds = assert_matches_oracle(q, k, s, targets, torch.float32, chunk_size=16)
    assert ds.shape == torch.Size(scale_shape) and ds.abs().item() > 0


def test_ignored_rows():
    q, k, s, targets = make_inputs(129, 300, 64, torch.float32)
    targets[::3] = -1
    _, dq, _, _ = assert_matches_oracle(q, k, s, targets, torch.float32, chunk_size=50)
    assert torch.all(dq[::3] == 0)


@pytest.mark.parametrize("fn", [infonce_torch, infonce_eager], ids=["torch", "eager"])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(fn):
    q, k, s, _ = make_inputs(9, 11, 8, torch.float32)
    loss, dq, dk, ds = loss_and_grads(fn, q, k, s, torch.full((9,), -1))
    assert loss.item() == 0.0
    for g in (dq, dk, ds):
        assert g is not None and torch.all(g == 0)
    q, k = q[:3], k[:0]  # no keys at all: still a defined, zero loss
    loss, dq, dk, ds = loss_and_grads(fn, q, k, s, torch.full((3,), -1))
    assert loss.item() == 0.0 and not dq.any() and dk.shape == (0, 8) and ds.item() == 0.0


def test_key_valid_masks_columns_and_rows_without_positive():
    q, k, s, targets = make_inputs(37, 53, 24, torch.float32)
    g = torch.Generator().manual_seed(1)
    key_valid = torch.rand(53, generator=g) > 0.3
    targets[0] = int(torch.nonzero(~key_valid)[0])  # a row whose positive is masked: ignored
    targets[1] = -1
    got = assert_matches_oracle(q, k, s, targets, torch.float32, key_valid=key_valid, chunk_size=8)
    dq, dk = got[1], got[2]
    assert torch.all(dq[:2] == 0)
    assert torch.all(dk[~key_valid] == 0)  # a masked key is neither positive nor negative


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_baseline_matches_oracle(dtype):
    q, k, s, targets = make_inputs(37, 53, 24, dtype)
    targets[5] = -1
    key_valid = torch.ones(53, dtype=torch.bool)
    key_valid[[0, 7, 30]] = False
    assert_matches_oracle(q, k, s, targets, dtype, key_valid=key_valid, fn=infonce_eager)


def test_gradcheck_float64():
    q, k, s, targets = make_inputs(6, 9, 4, torch.float64, scale=2.0)
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
    q, k, s, targets = make_inputs(m, n, d, torch.float32)
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
    q, k, s, targets = make_inputs(5, 7, 4, torch.float32)
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


def test_double_backward_is_refused_not_silently_dropped():
    q, k, s, targets = make_inputs(5, 7, 8, torch.float32)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(infonce_torch(q, k, s, targets), q, create_graph=True)
