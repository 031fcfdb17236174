"""Shared by the torch-reference and dispatcher tests: an independent float64 materialised oracle, inputs
and checks (not a test module). Inputs in half precision are quantised first and the oracle runs on the
same quantised values.
"""

from __future__ import annotations

import torch

from kernels.infonce_reference import infonce_torch

TOL = {  # dtype -> (loss rtol, grad rtol); grad atol is rtol x max|grad|
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}
GRAD_OUT = 0.37


def oracle_infonce(q, k, s, targets, key_valid=None):
    """float64 materialised InfoNCE with -inf masked columns; ignored rows leave the mean."""
    logits = s.double().reshape(()) * (q.double() @ k.double().T)
    safe = targets.clamp(min=0)
    valid = targets >= 0
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid, float("-inf"))
        valid = valid & key_valid[safe]
    per_row = logits.logsumexp(1) - logits.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp(min=1)


def make_inputs(m, n, d, dtype, seed=0, scale=14.0, scale_shape=()):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    s = torch.full(scale_shape, scale, dtype=torch.float32)
    targets = torch.randint(0, n, (m,), generator=g)
    return q, k, s, targets


def loss_and_grads(fn, q, k, s, *args, **kwargs):
    """Runs ``fn`` on fresh leaves, backprops ``GRAD_OUT * loss``; returns (loss, dq, dk, ds)."""
    q, k, s = (t.detach().clone().requires_grad_() for t in (q, k, s))
    loss = fn(q, k, s, *args, **kwargs)
    (loss * GRAD_OUT).backward()
    return loss.detach(), q.grad, k.grad, s.grad


def assert_close_rel(actual, expected, rtol):
    expected = expected.to(torch.float64)
    atol = rtol * max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol)


def assert_matches_oracle(q, k, s, targets, dtype, key_valid=None, chunk_size=1024, fn=None):
    loss_rtol, grad_rtol = TOL[dtype]
    fn = fn or (lambda *a, **kw: infonce_torch(*a, chunk_size=chunk_size, **kw))
    got = loss_and_grads(fn, q, k, s, targets, key_valid=key_valid)
    ref = loss_and_grads(oracle_infonce, q.double(), k.double(), s.double(), targets, key_valid)
    assert_close_rel(got[0], ref[0], loss_rtol)
    for g, r, x in zip(got[1:], ref[1:], (q, k, s)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_rel(g, r, grad_rtol)
    return got
