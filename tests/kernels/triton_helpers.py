"""Shared by the Triton op tests: float64 references, inputs, runners and checks (not a test module).

Test modules import it after ``pytest.importorskip("triton")``.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.infonce_tiles import interpreter_ready

# On CPU every test here runs the kernels under the Triton interpreter; tests/kernels/conftest.py sets
# TRITON_INTERPRET=1 first. If something imported triton before that conftest ran, skip cleanly.
_RUNNABLE = torch.cuda.is_available() or interpreter_ready()
needs_triton_runtime = pytest.mark.skipif(
    not _RUNNABLE, reason="no GPU and Triton imported before TRITON_INTERPRET=1 was set (tests/kernels/conftest.py)"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}
LOGIT_SCALE = 14.285  # 1 / 0.07, CLIP's initial temperature
GRAD_OUT = 0.7


def reference_infonce(q, k, s, targets, key_valid=None):
    """Materialised float64 InfoNCE: mean over valid rows (t >= 0, positive kept) of lse_i − z_{i,t_i}."""
    q, k, s = q.double(), k.double(), s.double().reshape(())
    z = s * q @ k.T
    lse = torch.logsumexp(z if key_valid is None else z.masked_fill(~key_valid[None, :], -torch.inf), dim=1)
    valid = targets >= 0
    if key_valid is not None:
        valid = valid & key_valid[targets.clamp_min(0)]
    per_row = lse - z.gather(1, targets.clamp_min(0)[:, None])[:, 0]
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp_min(1)


def make_inputs(m, n, d, dtype, seed=0, scale_shape=()):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(DEVICE, dtype)
    k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DEVICE, dtype)
    s = torch.full(scale_shape, LOGIT_SCALE, device=DEVICE)
    targets = torch.randint(0, n, (m,), generator=g).to(DEVICE)
    return q, k, s, targets


def run_loss(fn, q, k, s, *args, grad_out=GRAD_OUT, **kwargs):
    """Loss and (dq, dk, ds) of ``grad_out * fn(q, k, s, ...)`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, s)]
    loss = fn(*leaves, *args, **kwargs)
    loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    return loss.detach(), [t.grad for t in leaves]


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def assert_loss_and_grads_close(loss, grads, ref_loss, ref_grads, inputs, dtype, names=("dq", "dk", "ds")):
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_err(loss, ref_loss) <= loss_tol, (loss, ref_loss)
    assert len(names) == len(grads) == len(ref_grads) == len(inputs)
    for name, got, want, inp in zip(names, grads, ref_grads, inputs):
        assert got.dtype == inp.dtype and got.shape == inp.shape, name
        assert rel_err(got, want) <= grad_tol, (name, rel_err(got, want))


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns (all allocations go through one)."""

    def __init__(self):
        super().__init__()
        self.shapes, self.nbytes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                self.nbytes.append(t.numel() * t.element_size())
        return out


def numel(shape):
    return int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else 1


def paired_targets(m, valid):
    rows = torch.arange(m, device=DEVICE)
    return rows if valid is None else torch.where(valid, rows, -1)


def reference_symmetric(a, b, s, valid=None):
    t = paired_targets(a.shape[0], valid)
    return 0.5 * (reference_infonce(a, b, s, t, valid) + reference_infonce(b, a, s, t, valid))


def make_paired_inputs(m, d, dtype, seed, masked):
    a, b, s, _ = make_inputs(m, m, d, dtype, seed=seed)
    valid = None
    if masked:
        valid = torch.rand(m, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE) > 0.3
        valid[0] = True  # at least one valid pair, also for m = 1
    return a, b, s, valid
