"""kernels/symmetric_infonce_triton.py (paired loss, both directions in shared launches) vs float64."""

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.infonce_blocks import forward_splits, gemm_chunk_columns  # noqa: E402
from kernels.symmetric_infonce_triton import paired_groups, symmetric_infonce_triton  # noqa: E402
from tests.kernels.triton_helpers import (  # noqa: E402
    DEVICE,
    GRAD_OUT,
    AllocationRecorder,
    assert_loss_and_grads_close,
    make_inputs,
    make_paired_inputs,
    needs_triton_runtime,
    reference_symmetric,
    rel_err,
    run_loss,
)

pytestmark = needs_triton_runtime

PAIRED_SHAPES = [(1, 5), (37, 24), (129, 64)]  # (m, d)


def test_paired_groups_cover_the_rows_with_a_bounded_grid():
    cpu = torch.device("cpu")  # 4 "SMs": at most isqrt(16) = 4 groups per axis, 32-row units
    assert paired_groups(300, cpu) == (4, 96)
    assert paired_groups(5, cpu) == (1, 32)
    groups, group = paired_groups(2**17, cpu)
    assert groups == 4 and group % 32 == 0 and (groups - 1) * group < 2**17 <= groups * group


@pytest.mark.parametrize("backward", ["gemm", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", PAIRED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_symmetric_loss_and_grads_match_float64_reference(shape, dtype, backward):
    masked = shape[0] != 37  # 37 rows: no mask (the diagonal default); the others drop ~30% of pairs
    a, b, s, valid = make_paired_inputs(*shape, dtype, seed=20, masked=masked)
    loss, grads = run_loss(symmetric_infonce_triton, a, b, s, valid=valid, backward=backward)
    ref_loss, ref_grads = run_loss(reference_symmetric, a, b, s, valid)
    assert_loss_and_grads_close(loss, grads, ref_loss, ref_grads, (a, b, s), dtype)


@pytest.mark.parametrize("forward", ["tiled", "split"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-pairs", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_symmetric_loss_over_splits_chunks_and_row_blocks(dtype, masked, forward):
    """300 pairs at d = 8, both paired forwards: the one-pass kernel over a 4×4 grid of 96-row groups
    (several row and column tiles per program, a ragged last group), or the BOTH_WAYS launch with the
    keys split in two; the loss kernel walks its rows in several blocks, and the gemm backward runs three
    chunks of 128 columns (the last ragged) with the targets, weights and mask computed in the kernel."""
    m, d = 300, 8
    if DEVICE == "cpu":
        assert paired_groups(m, torch.device(DEVICE)) == (4, 96)
        assert forward_splits(2 * m, m, torch.device(DEVICE)) == 2
    assert gemm_chunk_columns(m, d, torch.tensor([], dtype=dtype).element_size()) == 128
    a, b, s, valid = make_paired_inputs(m, d, dtype, seed=25, masked=masked)
    loss, grads = run_loss(symmetric_infonce_triton, a, b, s, valid=valid, backward="gemm", forward=forward)
    ref_loss, ref_grads = run_loss(reference_symmetric, a, b, s, valid)
    assert_loss_and_grads_close(loss, grads, ref_loss, ref_grads, (a, b, s), dtype)


@pytest.mark.parametrize("shape", PAIRED_SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_tiled_forward_on_one_and_few_tiles(shape):
    """The one-pass forward where a group is a single (partial) tile: 1 pair, and 37 pairs without a mask."""
    a, b, s, valid = make_paired_inputs(*shape, torch.float16, seed=26, masked=shape[0] == 1)
    loss, grads = run_loss(symmetric_infonce_triton, a, b, s, valid=valid, forward="tiled")
    ref_loss, ref_grads = run_loss(reference_symmetric, a, b, s, valid)
    assert_loss_and_grads_close(loss, grads, ref_loss, ref_grads, (a, b, s), torch.float16)


@pytest.mark.parametrize("backward", ["gemm", "fused"])
def test_symmetric_loss_may_be_modified_in_place(backward):
    """The loss is a tensor of its own, not a view of the kernel's buffers: ``loss.mul_(3)`` (what a
    loss-weighting caller may do) works and scales every gradient by 3."""
    a, b, s, valid = make_paired_inputs(37, 24, torch.float32, seed=27, masked=True)
    _, want = run_loss(symmetric_infonce_triton, a, b, s, valid=valid, backward=backward)
    leaves = [t.detach().clone().requires_grad_() for t in (a, b, s)]
    loss = symmetric_infonce_triton(*leaves, valid=valid, backward=backward)
    loss.mul_(3.0)
    loss.backward(torch.tensor(GRAD_OUT, device=DEVICE))
    for leaf, w in zip(leaves, want):
        assert rel_err(leaf.grad, 3.0 * w) <= 1e-5


@pytest.mark.parametrize("backward", ["gemm", "fused"])
def test_symmetric_path_never_allocates_m_by_n(backward):
    m, d = 300, 8  # m² = 90000 elements; the gemm workspace is m × 128 (chunk 128 < m)
    a, b, s, valid = make_paired_inputs(m, d, torch.float32, seed=23, masked=True)
    step = lambda *leaves: symmetric_infonce_triton(*leaves, valid=valid, backward=backward)  # noqa: E731
    run_loss(step, a, b, s)  # autotune outside the recorder (CUDA)
    leaves = [t.detach().clone().requires_grad_() for t in (a, b, s)]
    with AllocationRecorder() as rec:
        step(*leaves).backward(torch.tensor(GRAD_OUT, device=DEVICE))
    assert (m, d) in rec.shapes, "the recorder saw no allocation"
    # By bytes: the interpreter's byte copies of the kernel arguments are recorded as uint8 tensors.
    big = [shape for shape, nbytes in zip(rec.shapes, rec.nbytes) if nbytes >= 4 * m * m]
    assert not big, f"m×m fp32-sized tensors allocated: {big}"


def test_symmetric_empty_batch_and_validation():
    a, b, s, _ = make_inputs(0, 1, 6, torch.float32)
    b = b[:0]
    loss, (da, db, ds) = run_loss(symmetric_infonce_triton, a, b, s)
    assert loss.item() == 0.0 and da.shape == db.shape == (0, 6) and ds.item() == 0.0
    a, b, s, _ = make_inputs(4, 5, 6, torch.float32)
    with pytest.raises(ValueError, match="equal shapes"):
        symmetric_infonce_triton(a, b, s)
    with pytest.raises(ValueError, match="valid"):
        symmetric_infonce_triton(a, a, s, valid=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="forward"):
        symmetric_infonce_triton(a, a, s, forward="both")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels at many-tile sizes: GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_symmetric_many_tiles_on_gpu_match_float64_reference(dtype):
    """The paired kernels over many tiles of every autotune config; at d = 200 the default gemm chunk
    (768 / 1536 columns) ends inside a key tile, so the shared G tiles cross chunk borders."""
    a, b, s, valid = make_paired_inputs(2053, 200, dtype, seed=24, masked=True)
    loss, grads = run_loss(symmetric_infonce_triton, a, b, s, valid=valid)
    ref_loss, ref_grads = run_loss(reference_symmetric, a, b, s, valid)
    assert_loss_and_grads_close(loss, grads, ref_loss, ref_grads, (a, b, s), dtype)


def test_double_backward_is_refused_not_silently_dropped():
    a, b, s, _ = make_inputs(5, 5, 8, torch.float32)
    a.requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(symmetric_infonce_triton(a, b, s), a, create_graph=True)
    (grad,) = torch.autograd.grad(symmetric_infonce_triton(a, b, s), a)  # the first-order gradient is unaffected
    assert torch.isfinite(grad).all()
