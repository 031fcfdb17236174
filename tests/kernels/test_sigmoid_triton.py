"""kernels/sigmoid_triton.py (fused SigLIP loss) against the float64 reference; on CPU under the Triton
interpreter (tests/kernels/conftest.py sets TRITON_INTERPRET=1), so sizes stay small."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from kernels import sigmoid_loss  # noqa: E402
from kernels.sigmoid_reference import sigmoid_loss_reference  # noqa: E402
from kernels.sigmoid_triton import sigmoid_loss_triton  # noqa: E402
from tests.kernels.triton_helpers import DEVICE, AllocationRecorder, needs_triton_runtime, numel, rel_err  # noqa: E402

pytestmark = needs_triton_runtime

TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}
GRAD_OUT = 0.7
SHAPES = [(1, 7, 3), (7, 41, 64), (41, 401, 64), (401, 41, 3)]  # (m, n, d): ragged against every block


def _inputs(m, n, d, dtype, seed=0, scale_shape=(1,)):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(m, d, generator=g), dim=1)
    b = F.normalize(torch.randn(n, d, generator=g), dim=1)
    k = min(m, n) // 2
    b[:k] = F.normalize(a[:k] + 0.3 * b[:k], dim=1)  # some clearly aligned positives
    targets = torch.randint(0, n, (m,), generator=g)
    targets[:k] = torch.arange(k)
    s = torch.full(scale_shape, 10.0, device=DEVICE)
    t = torch.full(scale_shape, -5.0, device=DEVICE)
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype), s, t, targets.to(DEVICE)


def _run(fn, a, b, s, t, *args, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in (a, b, s, t)]
    loss = fn(*leaves, *args, **kwargs)
    loss.backward(torch.tensor(GRAD_OUT, dtype=loss.dtype, device=loss.device))
    return loss.detach(), [x.grad for x in leaves]


def _check(a, b, s, t, targets, dtype, key_valid=None, fn=sigmoid_loss_triton):
    loss, grads = _run(fn, a, b, s, t, targets, key_valid=key_valid)
    ref_loss, ref_grads = _run(sigmoid_loss_reference, a, b, s, t, targets, key_valid=key_valid)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert rel_err(loss, ref_loss) <= loss_tol, (loss, ref_loss)
    for name, got, want, inp in zip(("da", "db", "ds", "dt"), grads, ref_grads, (a, b, s, t)):
        assert got.dtype == inp.dtype and got.shape == inp.shape, name
        assert rel_err(got, want) <= grad_tol, (name, rel_err(got, want))
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_grads_match_float64_reference(shape, dtype):
    scale_shape = () if shape[0] % 2 == 0 else (1,)
    a, b, s, t, targets = _inputs(*shape, dtype, scale_shape=scale_shape)
    _check(a, b, s, t, targets, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masks_ignored_rows_and_default_targets(dtype):
    a, b, s, t, targets = _inputs(41, 67, 24, dtype)
    key_valid = torch.rand(67, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    targets[0] = int(torch.nonzero(~key_valid)[0])  # positive masked: row ignored
    targets[1] = -1
    _, (da, db, _, _) = _check(a, b, s, t, targets, dtype, key_valid=key_valid)
    assert torch.all(da[:2] == 0) and torch.all(db[~key_valid] == 0)
    _check(a, b, s, t, None, dtype)


def test_no_valid_row_gives_zero_loss_and_grads():
    a, b, s, t, _ = _inputs(9, 11, 8, torch.float32)
    loss, grads = _run(sigmoid_loss_triton, a, b, s, t, torch.full((9,), -1, device=DEVICE))
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)


def test_never_allocates_m_by_n():
    m, n, d = 96, 300, 8  # m·n = 28800 elements, far more than any (m + n)·d buffer
    a, b, s, t, targets = _inputs(m, n, d, torch.float32)
    _run(sigmoid_loss_triton, a, b, s, t, targets)  # CUDA: autotune (and its buffers) outside the recorder
    leaves = [x.detach().clone().requires_grad_() for x in (a, b, s, t)]
    with AllocationRecorder() as rec:
        loss = sigmoid_loss_triton(*leaves, targets)
        saved = loss.grad_fn.saved_tensors
        loss.backward(torch.tensor(GRAD_OUT, device=DEVICE))
    assert rec.shapes and (m, d) in rec.shapes, "the recorder saw no allocation"
    big = [shape for shape in rec.shapes if numel(shape) >= m * n]
    assert not big, f"m×n-sized tensors allocated: {big}"
    assert all(x is None or x.numel() < m * n for x in saved)
    with AllocationRecorder() as ref_rec:  # the detector does see the reference's logits
        sigmoid_loss_reference(*leaves, targets)
    assert any(numel(shape) >= m * n for shape in ref_rec.shapes)


def test_functional_dispatch_and_double_backward():
    a, b, s, t, targets = _inputs(7, 41, 64, torch.float32)
    want = sigmoid_loss_triton(a, b, s, t, targets)
    torch.testing.assert_close(sigmoid_loss(a, b, s, t, targets, backend="triton"), want, rtol=0, atol=0)
    torch.testing.assert_close(sigmoid_loss(a, b, s, t, targets, backend="torch"), want, rtol=1e-5, atol=0)
    a.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(sigmoid_loss_triton(a, b, s, t, targets), a, create_graph=True)
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        sigmoid_loss_triton(a.double(), b.double(), s, t, targets)
