"""kernels/ring.py: ring symmetric InfoNCE vs a single-process float64 oracle over the global batch."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from kernels.ring import ring_symmetric_infonce
from tests.spawn_ranks import run_ranks

B_LOCAL, DIM, LOGIT_SCALE = 11, 16, 10.0
GRAD_OUT = (0.7, 1.3, 0.9)  # a different upstream gradient per rank
TIMEOUT_S = 150


def _triton_runnable():
    try:
        from kernels.infonce_tiles import interpreter_ready
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreter_ready()


def _triton_interpretable():
    try:
        from kernels.infonce_tiles import interpreter_ready
    except ImportError:
        return False
    return interpreter_ready()


needs_triton_runtime = pytest.mark.skipif(
    not _triton_runnable(), reason="triton missing, or no GPU and Triton imported without TRITON_INTERPRET=1"
)
# The spawned gloo ranks hold CPU tensors (gloo has no CUDA send/recv), so the Triton kernels there can
# only run under the interpreter; on a CUDA machine Triton is imported compiled and these are skipped.
needs_triton_on_cpu = pytest.mark.skipif(
    not _triton_interpretable(), reason="gloo ranks hold CPU tensors: Triton must run under TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _global_inputs(world):
    g = torch.Generator().manual_seed(1234)
    a = torch.nn.functional.normalize(torch.randn(world * B_LOCAL, DIM, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(world * B_LOCAL, DIM, generator=g, dtype=torch.float64), dim=1)
    return a, b, torch.tensor([LOGIT_SCALE], dtype=torch.float64)


def _global_valid(world, mask):
    """Presence mask of the global batch: None, "some" (every third pair missing) or "rank1_empty"
    (likewise, and rank 1 holds no valid pair at all: N_1 = 0)."""
    if mask is None:
        return None
    valid = torch.arange(world * B_LOCAL) % 3 != 1
    if mask == "rank1_empty":
        valid[B_LOCAL : 2 * B_LOCAL] = False
    return valid


def _infonce64(q, k, s, targets):
    z = s * q @ k.T
    return (torch.logsumexp(z, dim=1) - z.gather(1, targets[:, None])[:, 0]).mean()


def _oracle(world):
    """Per rank: L_r, d(Σ_r' g_r' L_r')/d(rank r's rows of a, b), g_r · dL_r/ds; all float64, one process."""
    a, b, s = (t.clone().requires_grad_() for t in _global_inputs(world))
    losses = []
    for r in range(world):
        rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        t = torch.arange(r * B_LOCAL, (r + 1) * B_LOCAL)
        losses.append(0.5 * (_infonce64(a[rows], b, s, t) + _infonce64(b[rows], a, s, t)))
    global_loss = 0.5 * (
        _infonce64(a, b, s, torch.arange(world * B_LOCAL)) + _infonce64(b, a, s, torch.arange(world * B_LOCAL))
    )
    assert torch.allclose(sum(losses) / world, global_loss)  # L_r average to the single-process loss
    ds = [GRAD_OUT[r] * torch.autograd.grad(losses[r], s, retain_graph=True)[0] for r in range(world)]
    sum(GRAD_OUT[r] * losses[r] for r in range(world)).backward()
    return [
        {
            "loss": losses[r].detach(),
            "da": a.grad[r * B_LOCAL : (r + 1) * B_LOCAL],
            "db": b.grad[r * B_LOCAL : (r + 1) * B_LOCAL],
            "ds": ds[r],
        }
        for r in range(world)
    ]


def _ring_loss(a, b, s, backend, valid=None):
    return ring_symmetric_infonce(a, b, s, backend=backend, valid=valid)


def _allgather_loss(a, b, s, backend, valid=None):
    from kernels.distributed import gathered_symmetric_infonce

    return gathered_symmetric_infonce(a, b, s, strategy="allgather", backend=backend, valid_local=valid)


def _worker(rank, world, init_file, backend, out_dir, strategy="ring", mask=None):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=90)
    )
    try:
        a, b, s = _global_inputs(world)
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        leaves = [
            a[rows].float().requires_grad_(),
            b[rows].float().requires_grad_(),
            s.float().requires_grad_(),
        ]
        valid = _global_valid(world, mask)
        valid = None if valid is None else valid[rows]
        loss = (_allgather_loss if strategy == "allgather" else _ring_loss)(*leaves, backend, valid)
        loss.backward(torch.tensor(GRAD_OUT[rank]))
        result = {"loss": loss.detach(), "da": leaves[0].grad, "db": leaves[1].grad, "ds": leaves[2].grad}
        torch.save(result, os.path.join(out_dir, f"{strategy}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ranks(world, backend, tmp_path, strategy="ring", mask=None):
    """Spawns ``world`` gloo ranks (file:// rendezvous), kills them past TIMEOUT_S; per-rank results."""
    rendezvous = str(tmp_path / f"rendezvous_{strategy}")
    out = str(tmp_path)
    return run_ranks(
        _worker, lambda r: (r, world, rendezvous, backend, out, strategy, mask), world, tmp_path, TIMEOUT_S, strategy
    )


def _assert_close(got, want, tol):
    for key in ("loss", "da", "db", "ds"):
        g, w = got[key].double().reshape(want[key].shape), want[key]
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()  # all-zero wants: exact 0
        assert err <= tol, (key, err)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,world",
    [("torch", 3), pytest.param("triton", 2, marks=needs_triton_on_cpu)],
)
def test_ring_matches_single_process_oracle(backend, world, tmp_path):
    results = _run_ranks(world, backend, tmp_path)
    for got, want in zip(results, _oracle(world)):
        _assert_close(got, want, tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,mask",
    [
        ("torch", None),
        ("torch", "some"),
        ("torch", "rank1_empty"),
        pytest.param("triton", "some", marks=needs_triton_on_cpu),
    ],
)
def test_ring_matches_allgather_strategy(backend, mask, tmp_path):
    """Same per-rank loss and gradients as kernels.distributed's all-gather strategy, presence masks
    (``valid_local``) included: invalid pairs are neither queries nor keys on any rank."""
    pytest.importorskip("kernels.distributed")
    ring = _run_ranks(2, backend, tmp_path, "ring", mask)
    allgather = _run_ranks(2, backend, tmp_path, "allgather", mask)
    if mask == "rank1_empty":
        assert ring[1]["loss"].item() == 0.0 and not ring[1]["da"].any()  # N_1 = 0: nothing on rank 1
    for got, want in zip(ring, allgather):
        _assert_close(got, {key: value.double() for key, value in want.items()}, tol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton_runtime)])
@pytest.mark.parametrize("scale_shape", [(), (1,)], ids=["scalar", "shape1"])
def test_world_of_one_is_the_symmetric_loss(backend, scale_shape):
    a, b, s = _global_inputs(1)
    device = DEVICE if backend == "triton" else "cpu"  # compiled Triton (GPU) or the interpreter (CPU)
    leaves = [
        a.float().to(device).requires_grad_(),
        b.float().to(device).requires_grad_(),
        s.float().reshape(scale_shape).to(device).requires_grad_(),
    ]
    loss = ring_symmetric_infonce(*leaves, backend=backend)
    loss.backward(torch.tensor(GRAD_OUT[0], device=device))
    assert leaves[2].grad.shape == scale_shape
    got = {
        "loss": loss.detach().cpu(),
        "da": leaves[0].grad.cpu(),
        "db": leaves[1].grad.cpu(),
        "ds": leaves[2].grad.cpu(),
    }
    _assert_close(got, _oracle(1)[0], tol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton_runtime)])
def test_world_of_one_with_presence_mask_is_the_masked_symmetric_loss(backend):
    from kernels.functional import symmetric_infonce

    a, b, s = _global_inputs(1)
    device = DEVICE if backend == "triton" else "cpu"
    valid = _global_valid(1, "some").to(device)
    results = []
    for fn in (
        lambda x, y, t: ring_symmetric_infonce(x, y, t, backend=backend, valid=valid),
        lambda x, y, t: symmetric_infonce(x, y, t, valid=valid, backend="torch"),
    ):
        leaves = [t.float().to(device).requires_grad_() for t in (a, b, s)]
        loss = fn(*leaves)
        loss.backward(torch.tensor(GRAD_OUT[0], device=device))
        results.append({"loss": loss.detach(), "da": leaves[0].grad, "db": leaves[1].grad, "ds": leaves[2].grad})
    got, want = ({k: v.double().cpu() for k, v in r.items()} for r in results)
    assert not got["da"][~valid.cpu()].any()  # an invalid pair gets no gradient
    _assert_close(got, want, tol=1e-5)


def test_bf16_inputs_keep_their_dtype_and_stay_close():
    a, b, s = _global_inputs(1)
    leaves = [a.bfloat16().requires_grad_(), b.bfloat16().requires_grad_(), s.float().requires_grad_()]
    loss = ring_symmetric_infonce(*leaves, backend="torch")
    loss.backward(torch.tensor(GRAD_OUT[0]))
    assert leaves[0].grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    got = {"loss": loss.detach(), "da": leaves[0].grad, "db": leaves[1].grad, "ds": leaves[2].grad}
    _assert_close(got, _oracle(1)[0], tol=2e-2)


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="b_local, d"):
        ring_symmetric_infonce(torch.ones(3, 4), torch.ones(2, 4), torch.ones(()))
    with pytest.raises(ValueError, match="valid"):
        ring_symmetric_infonce(torch.ones(3, 4), torch.ones(3, 4), torch.ones(()), valid=torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        ring_symmetric_infonce(torch.ones(3, 4), torch.ones(3, 4), torch.ones(()), backend="cuda")
    ones = torch.ones(3, 4), torch.ones(3, 4), torch.ones(())
    with pytest.raises(ValueError, match="targets must be an int64"):
        ring_symmetric_infonce(*ones, targets=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"key_valid must be a bool tensor of shape \(3,\)"):
        ring_symmetric_infonce(
            *ones, targets=torch.zeros(3, dtype=torch.int64), key_valid=torch.ones(6, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="pass targets with it"):
        ring_symmetric_infonce(*ones, key_valid=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton_runtime)])
def test_world_of_one_with_diagonal_targets_is_the_symmetric_loss(backend):
    """Retargeted rows with t_i = i and every key valid are the plain loss (positives taken from the
    block, not locally), loss and gradients."""
    from kernels import symmetric_infonce

    a, b, s = _global_inputs(1)
    outs = []
    for targets in (None, torch.arange(B_LOCAL)):
        leaves = [t.float().to(DEVICE).requires_grad_() for t in (a, b, s)]
        extra = (
            {}
            if targets is None
            else {"targets": targets.to(DEVICE), "key_valid": torch.ones(B_LOCAL, dtype=torch.bool, device=DEVICE)}
        )
        loss = ring_symmetric_infonce(*leaves, backend=backend, **extra)
        loss.backward(torch.tensor(0.8, device=DEVICE))
        outs.append([loss.detach(), *(t.grad for t in leaves)])
    want = symmetric_infonce(*(t.float().to(DEVICE) for t in (a, b, s)), backend="torch")
    torch.testing.assert_close(outs[1][0], want, rtol=1e-6, atol=1e-6)
    for got, ref in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_double_backward_is_refused_not_silently_dropped():
    a = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ring_symmetric_infonce(a, torch.randn(4, 8), torch.ones(())), a, create_graph=True)
