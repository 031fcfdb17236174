"""kernels/gathered_infonce_triton.py: one rank's share of the gathered loss (local rows against every
rank's) against a materialised float64 reference.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.gathered_infonce_triton import gathered_symmetric_infonce_triton  # noqa: E402
from tests.kernels.triton_helpers import (  # noqa: E402
    GRAD_OUT,
    AllocationRecorder,
    assert_loss_and_grads_close,
    make_inputs,
    make_paired_inputs,
    needs_triton_runtime,
    reference_infonce,
    reference_symmetric,
    run_loss,
)

pytestmark = needs_triton_runtime

GATHERED_SHAPES = [(1, 3, 5), (37, 2, 24), (64, 3, 40)]  # (m local rows, world, d): ragged tiles and d


def reference_rank_share(a, b, a_all, b_all, s, offset, world, key_valid=None):
    """Materialised float64 L_r = (world·N_r / N) · ½ · (InfoNCE(a, b_all) + InfoNCE(b, a_all))."""
    m = a.shape[0]
    live = torch.ones(m, dtype=torch.bool, device=a.device) if key_valid is None else key_valid[offset : offset + m]
    t = torch.where(live, offset + torch.arange(m, device=a.device), -1)
    loss = 0.5 * (reference_infonce(a, b_all, s, t, key_valid) + reference_infonce(b, a_all, s, t, key_valid))
    n_global = a_all.shape[0] if key_valid is None else int(key_valid.sum().clamp_min(1))
    return loss * (world * int(live.sum()) / n_global)


SHARE_INPUTS = ("a", "b", "a_all", "b_all", "s")


def _share_inputs(a_all, b_all, s, rank, m):
    """The inputs of rank ``rank``'s share, named as SHARE_INPUTS: its m rows of each, the keys, s."""
    local = slice(rank * m, (rank + 1) * m)
    return a_all[local], b_all[local], a_all, b_all, s


def _run_share(fn, a_all, b_all, s, rank, m, world, valid, **kwargs):
    """Loss and grads (SHARE_INPUTS) of one rank's share, every input a leaf of its own."""
    leaves = [t.detach().clone().requires_grad_() for t in _share_inputs(a_all, b_all, s, rank, m)]
    loss = fn(*leaves, offset=rank * m, world=world, key_valid=valid, **kwargs)
    loss.backward(torch.tensor(GRAD_OUT, dtype=loss.dtype, device=loss.device))
    return loss.detach(), [t.grad for t in leaves]


def _reference_share(a, b, a_all, b_all, s, *, offset, world, key_valid):
    return reference_rank_share(a, b, a_all, b_all, s, offset, world, key_valid)


@pytest.mark.parametrize("backward", ["gemm", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GATHERED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gathered_rank_share_matches_float64_reference(shape, dtype, backward):
    """The last rank's share (a positive offset), with a presence mask except at 37 rows; loss and the
    gradients of the local rows, the gathered keys and the logit scale."""
    m, world, d = shape
    a_all, b_all, s, valid = make_paired_inputs(world * m, d, dtype, seed=30, masked=m != 37)
    rank = world - 1
    loss, grads = _run_share(
        gathered_symmetric_infonce_triton, a_all, b_all, s, rank, m, world, valid, backward=backward
    )
    ref_loss, ref_grads = _run_share(_reference_share, a_all, b_all, s, rank, m, world, valid)
    inputs = _share_inputs(a_all, b_all, s, rank, m)
    assert_loss_and_grads_close(loss, grads, ref_loss, ref_grads, inputs, dtype, SHARE_INPUTS)


@pytest.mark.parametrize(
    ("dtype", "masked"), [(torch.float32, True), (torch.bfloat16, False)], ids=["fp32-masked", "bf16-all-pairs"]
)
def test_rank_shares_add_up_to_the_global_symmetric_loss(dtype, masked):
    """What the all-gather strategy relies on: with a and a_all views of one global leaf (the gradient
    of a row sums its query and key roles, as gather_with_grad's backward does across ranks), the mean
    of the 3 ranks' shares is the single-process loss and its gradient. 100 local rows against 300 keys
    at d = 8: the keys split in two, three gemm chunks of 128 columns (the last ragged). The leaves are
    fp32 copies of ``dtype`` values, cast inside, so that autograd sums the six bf16 gradient parts of
    each row in fp32 (summed in bf16 they round six times: ~1.0e-2 of error, none of it the kernel's)."""
    m, world, d = 100, 3, 8
    a_all, b_all, s, valid = make_paired_inputs(world * m, d, dtype, seed=31, masked=masked)
    a_all, b_all = a_all.float(), b_all.float()

    def mean_share(a_all, b_all, s):
        a_all, b_all = a_all.to(dtype), b_all.to(dtype)
        shares = [
            gathered_symmetric_infonce_triton(
                a_all[r * m : (r + 1) * m], b_all[r * m : (r + 1) * m], a_all, b_all, s,
                offset=r * m, world=world, key_valid=valid, backward="gemm",
            )
            for r in range(world)
        ]  # fmt: skip
        return sum(shares) / world

    loss, grads = run_loss(mean_share, a_all, b_all, s)
    ref_loss, ref_grads = run_loss(reference_symmetric, a_all, b_all, s, valid)
    assert_loss_and_grads_close(loss, grads, ref_loss, ref_grads, (a_all, b_all, s), dtype, ("a", "b", "s"))


@pytest.mark.parametrize("backward", ["gemm", "fused"])
def test_gathered_path_never_allocates_m_by_n(backward):
    m, world, d = 64, 3, 8  # m·n = 12288 elements; the gemm workspace is m × 128
    a_all, b_all, s, valid = make_paired_inputs(world * m, d, torch.float32, seed=32, masked=True)
    _run_share(gathered_symmetric_infonce_triton, a_all, b_all, s, 1, m, world, valid, backward=backward)  # autotune
    with AllocationRecorder() as rec:
        _run_share(gathered_symmetric_infonce_triton, a_all, b_all, s, 1, m, world, valid, backward=backward)
    assert (m, d) in rec.shapes, "the recorder saw no allocation"
    big = [shape for shape, nbytes in zip(rec.shapes, rec.nbytes) if nbytes >= 4 * m * world * m]
    assert not big, f"m×n fp32-sized tensors allocated: {big}"


def test_gathered_empty_batch_and_validation():
    a_all, b_all, s, _ = make_inputs(6, 6, 4, torch.float32)
    loss, grads = _run_share(gathered_symmetric_infonce_triton, a_all[:0], b_all[:0], s, 0, 0, 2, None)
    assert loss.item() == 0.0 and grads[0].shape == (0, 4) and grads[4].item() == 0.0
    a, b = a_all[:3], b_all[:3]
    with pytest.raises(ValueError, match="world"):
        gathered_symmetric_infonce_triton(a, b, a_all, b_all, s, offset=0, world=3)
    with pytest.raises(ValueError, match="offset"):
        gathered_symmetric_infonce_triton(a, b, a_all, b_all, s, offset=4, world=2)
    with pytest.raises(ValueError, match="key_valid"):
        gathered_symmetric_infonce_triton(
            a, b, a_all, b_all, s, offset=3, world=2, key_valid=torch.ones(3, dtype=torch.bool)
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels at many-tile sizes: GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gathered_many_tiles_on_gpu_match_float64_reference(dtype):
    """A rank's share over many tiles of every autotune config: 1031 local rows against 3 ranks' keys
    (the default gemm chunk at d = 200 ends inside a key tile), a presence mask, a middle rank."""
    m, world, d = 1031, 3, 200
    a_all, b_all, s, valid = make_paired_inputs(world * m, d, dtype, seed=33, masked=True)
    loss, grads = _run_share(gathered_symmetric_infonce_triton, a_all, b_all, s, 1, m, world, valid)
    ref_loss, ref_grads = _run_share(_reference_share, a_all, b_all, s, 1, m, world, valid)
    inputs = _share_inputs(a_all, b_all, s, 1, m)
    assert_loss_and_grads_close(loss, grads, ref_loss, ref_grads, inputs, dtype, SHARE_INPUTS)


def test_double_backward_is_refused_not_silently_dropped():
    a, b, s, _ = make_inputs(5, 5, 8, torch.float32)
    a.requires_grad_()
    loss_fn = lambda a, b, s: gathered_symmetric_infonce_triton(a, b, a, b, s, offset=0, world=1)  # noqa: E731
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss_fn(a, b, s), a, create_graph=True)
    (grad,) = torch.autograd.grad(loss_fn(a, b, s), a)  # the first-order gradient is unaffected
    assert torch.isfinite(grad).all()
