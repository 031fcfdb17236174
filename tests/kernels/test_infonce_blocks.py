"""kernels/infonce_blocks.py: block LSE and block backward (one direction and paired) against references."""

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.infonce_blocks import (  # noqa: E402
    forward_splits,
    gemm_chunk_columns,
    infonce_block_backward,
    infonce_block_lse,
    paired_block_backward,
    paired_block_lse,
)
from tests.kernels.triton_helpers import (  # noqa: E402
    DEVICE,
    AllocationRecorder,
    make_inputs,
    make_paired_inputs,
    needs_triton_runtime,
    numel,
    paired_targets,
    rel_err,
)

pytestmark = needs_triton_runtime


def _block_grads(q, k, s, targets, key_valid, **kwargs):
    lse, _ = infonce_block_lse(q, k, s, targets, key_valid=key_valid)
    w = torch.linspace(0.0, 1.0, q.shape[0], device=DEVICE)  # w_0 = 0: a dead row
    return infonce_block_backward(q, k, s, lse, w, targets, key_valid=key_valid, **kwargs)


def test_gemm_backward_in_ragged_chunks_equals_the_fused_backward():
    """Chunks of 80 columns end inside a key tile; masks and dead rows cross chunk borders."""
    q, k, s, targets = make_inputs(129, 300, 40, torch.float32, seed=10)
    targets[::4] = -1
    key_valid = torch.rand(300, generator=torch.Generator().manual_seed(11)).to(DEVICE) > 0.2
    fused = _block_grads(q, k, s, targets, key_valid, method="fused")
    chunked = _block_grads(q, k, s, targets, key_valid, method="gemm", chunk=80)
    for name, got, want in zip(("dq", "dk", "ds"), chunked, fused):
        assert rel_err(got, want) <= 1e-5, (name, rel_err(got, want))
    again = _block_grads(q, k, s, targets, key_valid, method="gemm", chunk=80)
    assert all(torch.equal(a, b) for a, b in zip(chunked, again)), "gemm backward not repeatable"


def test_gemm_backward_workspace_is_bounded_by_the_chunk():
    m, n, d, chunk = 96, 200, 8, 32
    q, k, s, targets = make_inputs(m, n, d, torch.float32, seed=12)
    lse, _ = infonce_block_lse(q, k, s, targets)
    w = torch.full((m,), 1.0 / m, device=DEVICE)
    infonce_block_backward(q, k, s, lse, w, targets, method="gemm", chunk=chunk)  # autotune outside
    with AllocationRecorder() as rec:
        infonce_block_backward(q, k, s, lse, w, targets, method="gemm", chunk=chunk)
    assert (m, chunk) in rec.shapes, "the recorder did not see the workspace"
    assert max(numel(shape) for shape in rec.shapes) < m * n
    # (The interpreter's own byte copies of the kernel arguments are recorded too.)
    assert max(rec.nbytes) <= 4 * max(m * chunk, (m + n) * d)


def test_gemm_chunk_columns_follow_d_not_n():
    assert gemm_chunk_columns(16384, 1024, 2) == 8192  # 16·d bytes per row of bf16
    assert gemm_chunk_columns(16384, 1024, 4) == 4096
    assert gemm_chunk_columns(10, 4, 4) == 128  # never below one wide tile
    assert 2**17 * gemm_chunk_columns(2**17, 4096, 2) < 2**31  # 32-bit workspace offsets
    with pytest.raises(ValueError, match="method"):
        _block_grads(*make_inputs(4, 6, 8, torch.float32)[:4], None, method="cublas")


def test_block_lse_returns_row_lse_and_positive():
    q, k, s, targets = make_inputs(37, 53, 24, torch.float32, seed=5)
    lse, pos = infonce_block_lse(q, k, s, targets)
    z = s.double() * q.double() @ k.double().T
    assert rel_err(lse, torch.logsumexp(z, dim=1)) <= 1e-6
    assert rel_err(pos, z.gather(1, targets[:, None])[:, 0]) <= 1e-5


@pytest.mark.parametrize("splits", [1, 3, 40])
def test_block_lse_over_key_splits(splits):
    """Split-KV forward: partial LSEs of 128-column splits merged (40 asks for more splits than exist),
    with masked columns and a row whose every valid key sits in one split."""
    q, k, s, targets = make_inputs(70, 300, 24, torch.float32, seed=13)
    key_valid = torch.ones(300, dtype=torch.bool, device=DEVICE)
    key_valid[:128] = False
    lse, pos = infonce_block_lse(q, k, s, targets, key_valid=key_valid, splits=splits)
    z = s.double() * q.double() @ k.double().T
    assert rel_err(lse, torch.logsumexp(z.masked_fill(~key_valid[None, :], -torch.inf), dim=1)) <= 1e-6
    assert rel_err(pos, z.gather(1, targets[:, None])[:, 0]) <= 1e-5
    # No valid column at all: every split's partial is −inf, and so is the merged LSE (no nan).
    lse, pos = infonce_block_lse(q, k, s, targets, key_valid=torch.zeros_like(key_valid), splits=splits)
    assert torch.equal(lse, torch.full_like(lse, -torch.inf))
    assert rel_err(pos, z.gather(1, targets[:, None])[:, 0]) <= 1e-5


def test_forward_splits_fill_the_device_and_stay_bounded():
    cpu = torch.device("cpu")
    assert forward_splits(64, 10**6, cpu) == 16  # one row tile: 4 programs per "SM" × 4
    assert forward_splits(2**20, 10**6, cpu) == 1  # enough row tiles already
    assert forward_splits(64, 300, cpu) == 2  # at least 256 columns per split


@pytest.mark.parametrize("splits", [1, 3])
def test_paired_block_lse_is_both_directions(splits):
    a, b, s, valid = make_paired_inputs(300, 24, torch.float32, seed=21, masked=True)
    t = paired_targets(300, valid)
    lse, pos = paired_block_lse(a, b, s, t, key_valid=valid, splits=splits)
    assert lse.shape == pos.shape == (2, 300)
    for way, (q, k) in enumerate(((a, b), (b, a))):
        want_lse, want_pos = infonce_block_lse(q, k, s, t, key_valid=valid, splits=splits)
        assert rel_err(lse[way], want_lse) <= 1e-6 and rel_err(pos[way], want_pos) <= 1e-6


def test_paired_gemm_backward_in_ragged_chunks_equals_two_fused_backwards():
    """One gemm backward for both directions, chunks of 50 columns ending inside key tiles, a key mask
    and dead rows, against the two directions' fused backwards summed; bitwise repeatable."""
    a, b, s, valid = make_paired_inputs(129, 40, torch.float32, seed=22, masked=True)
    t = paired_targets(129, valid)
    lse, _ = paired_block_lse(a, b, s, t, key_valid=valid)
    w = torch.linspace(0.0, 1.0, 129, device=DEVICE) * valid  # w_0 = 0: a dead row
    got = paired_block_backward(a, b, s, lse, w, t, key_valid=valid, chunk=50)
    da, db, ds = infonce_block_backward(a, b, s, lse[0], w, t, key_valid=valid, method="fused")
    db2, da2, ds2 = infonce_block_backward(b, a, s, lse[1], w, t, key_valid=valid, method="fused")
    for name, x, want in zip(("da", "db", "ds"), got, (da + da2, db + db2, ds + ds2)):
        assert rel_err(x, want) <= 1e-5, (name, rel_err(x, want))
    again = paired_block_backward(a, b, s, lse, w, t, key_valid=valid, chunk=50)
    assert all(torch.equal(x, y) for x, y in zip(got, again)), "paired backward not repeatable"
