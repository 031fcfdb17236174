"""kernels.grouped: representatives and the deduplicated InfoNCE (false negatives, a group is one class).

The fused path (kernels.infonce with retargeted rows and a column mask) must equal the materialised
N x N reference, in value and gradients, on one process and on 2 gloo ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import symmetric_infonce
from kernels.grouped import (
    NO_GROUP,
    grouped_symmetric_infonce,
    grouped_symmetric_infonce_reference,
    representatives,
)
from tests.spawn_ranks import gloo_rank, run_ranks

N, DIM, WORLD, TIMEOUT_S = 12, 6, 2, 120.0  # a hang guard: spawned ranks start slowly on a busy 2-core host
# groups: 100 x3 (rows 1, 4, 9), 200 x2 (rows 2, 10; row 2 invalid -> 10 represents), 300 x2 across
# ranks (rows 5, 6), singletons and NO_GROUP elsewhere.
GROUPS = torch.tensor([7, 100, 200, NO_GROUP, 100, 300, 300, 8, NO_GROUP, 100, 200, 9], dtype=torch.int64)
VALID = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": F.normalize(torch.randn(N, DIM, generator=g, dtype=torch.float64), dim=1),
        "b": F.normalize(torch.randn(N, DIM, generator=g, dtype=torch.float64), dim=1),
        "s": torch.tensor([4.0], dtype=torch.float64),
    }


def _loss_and_grads(fn, data, groups, valid):
    a, b, s = (data[k].clone().requires_grad_() for k in ("a", "b", "s"))
    loss = fn(a, b, s, groups, valid)
    (loss * 1.7).backward()  # grad_output != 1
    return loss.detach(), a.grad, b.grad, s.grad


def _fused(a, b, s, groups, valid):
    return grouped_symmetric_infonce(a, b, s, groups, valid_local=valid, backend="torch")


def test_representatives_pick_the_first_valid_member():
    rep = representatives(GROUPS, VALID)
    expected = torch.tensor([0, 1, -1, 3, 1, 5, 5, 7, 8, 1, 10, -1])
    assert torch.equal(rep, expected)


# ----------------------------------------------------------------------------- single process


def test_fused_equals_materialised_reference_with_duplicates():
    data = _data()
    got = _loss_and_grads(_fused, data, GROUPS, VALID)
    ref = _loss_and_grads(grouped_symmetric_infonce_reference, data, GROUPS, VALID)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert torch.all(got[1][~VALID] == 0) and torch.all(got[2][~VALID] == 0)


def test_without_duplicates_it_is_plain_clip():
    data = _data(1)
    groups = torch.arange(N, dtype=torch.int64) + 1000
    got = _loss_and_grads(_fused, data, groups, VALID)
    plain = _loss_and_grads(
        lambda a, b, s, g, v: symmetric_infonce(a, b, s, valid=v, backend="torch"), data, groups, VALID
    )
    for x, y in zip(got, plain):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_same_group_rows_are_never_negatives():
    """Moving a non-representative duplicate's keys changes nothing but its own query terms."""
    data = _data(2)
    base = grouped_symmetric_infonce(data["a"], data["b"], data["s"], GROUPS, valid_local=VALID, backend="torch")
    # Row 4 is a non-representative member of group 100: as a key it is masked everywhere, so
    # swapping its embeddings for anything only changes its own query rows (2 of 2·N_valid terms).
    moved = {k: v.clone() for k, v in data.items()}
    moved["a"][4] = moved["a"][0]
    moved["b"][4] = moved["b"][0]
    valid_no4 = VALID.clone()
    valid_no4[4] = False
    n = VALID.sum().item()
    # loss with row 4 as a query removed, re-weighted from N-1 rows back to N rows
    rest = grouped_symmetric_infonce(data["a"], data["b"], data["s"], GROUPS, valid_local=valid_no4, backend="torch")

    def own(d):  # row 4's own two terms; its positive is the representative, row 1
        s, keys = d["s"][0], _keys()
        ab = torch.logsumexp(s * d["b"][keys] @ d["a"][4], 0) - s * d["a"][4] @ d["b"][1]
        ba = torch.logsumexp(s * d["a"][keys] @ d["b"][4], 0) - s * d["b"][4] @ d["a"][1]
        return 0.5 * (ab + ba)

    torch.testing.assert_close(base, (rest * (n - 1) + own(data)) / n, rtol=1e-10, atol=1e-12)
    moved_loss = grouped_symmetric_infonce(
        moved["a"], moved["b"], data["s"], GROUPS, valid_local=VALID, backend="torch"
    )
    torch.testing.assert_close(moved_loss, (rest * (n - 1) + own(moved)) / n, rtol=1e-10, atol=1e-12)


def _keys() -> torch.Tensor:
    rep = representatives(GROUPS, VALID)
    return torch.nonzero(VALID & (rep == torch.arange(N))).squeeze(1)


# ----------------------------------------------------------------------------- 2 gloo ranks


def _rank_results(rank: int, strategy: str) -> dict[str, torch.Tensor]:
    """This rank's loss and gradients on its half of the rows (inside the gloo group)."""
    data = _data()
    rows = N // WORLD
    local = slice(rank * rows, (rank + 1) * rows)
    a, b, s = (t.clone().requires_grad_() for t in (data["a"][local], data["b"][local], data["s"]))
    loss = grouped_symmetric_infonce(
        a, b, s, GROUPS[local], valid_local=VALID[local], backend="torch", strategy=strategy
    )
    (loss * 1.7).backward()
    return {"loss": loss.detach(), "a": a.grad, "b": b.grad, "s": s.grad}


def _worker(rank: int, init_file: str, out_dir: str, strategy: str = "allgather") -> None:
    gloo_rank(rank, WORLD, init_file, out_dir, lambda: _rank_results(rank, strategy), timeout_s=20, stem="r")


# The all-gather runs the torch backend in the inputs' float64; the ring's block products are fp32.
STRATEGY_TOLERANCE = {"allgather": (1e-9, 1e-12), "ring": (1e-5, 1e-6)}


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_two_gloo_ranks_match_the_global_reference(strategy, tmp_path):
    """Rows 5 (rank 0) and 6 (rank 1) share group 300: on the ring, rank 1's row 6 finds its positive
    (row 5, the representative) in rank 0's block, and that key's gradient travels back to rank 0."""
    res = run_ranks(
        _worker, lambda r: (r, str(tmp_path / "rdv"), str(tmp_path), strategy), WORLD, tmp_path, TIMEOUT_S, "r"
    )
    ref = _loss_and_grads(grouped_symmetric_infonce_reference, _data(), GROUPS, VALID)
    rtol, atol = STRATEGY_TOLERANCE[strategy]
    torch.testing.assert_close(sum(r["loss"].double() for r in res) / WORLD, ref[0], rtol=rtol / 10, atol=atol)
    rows = N // WORLD
    for rank, r in enumerate(res):
        local = slice(rank * rows, (rank + 1) * rows)
        # gather_with_grad convention: local grads are W x the global ones (DeepSpeed averages)
        torch.testing.assert_close(r["a"].double(), WORLD * ref[1][local], rtol=rtol, atol=atol)
        torch.testing.assert_close(r["b"].double(), WORLD * ref[2][local], rtol=rtol, atol=atol)
    torch.testing.assert_close(sum(r["s"] for r in res).double(), WORLD * ref[3], rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ring_strategy_on_one_process_matches_the_reference(backend):
    """The ring's retargeted rows and key mask (kernels.ring, world of one) give the deduplicated loss."""
    if backend == "triton":
        pytest.importorskip("triton")
        from kernels.infonce_tiles import interpreter_ready

        if not (torch.cuda.is_available() or interpreter_ready()):
            pytest.skip("no GPU and Triton imported before TRITON_INTERPRET=1 was set")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    data = {k: v.float().to(device) for k, v in _data(5).items()}

    def ring(a, b, s, groups, valid):
        return grouped_symmetric_infonce(
            a, b, s, groups.to(device), valid_local=valid.to(device), backend=backend, strategy="ring"
        )

    got = _loss_and_grads(ring, data, GROUPS, VALID)
    ref = _loss_and_grads(grouped_symmetric_infonce_reference, _data(5), GROUPS, VALID)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x.double().cpu(), y, rtol=1e-5, atol=1e-6)


def test_unknown_strategy_is_an_error():
    data = _data()
    with pytest.raises(ValueError, match="strategy must be 'allgather' or 'ring'"):
        grouped_symmetric_infonce(data["a"], data["b"], data["s"], GROUPS, strategy="tree")


def test_triton_kernel_path_matches_the_reference():
    """The fused path on the Triton kernel (interpreter on CPU): no N x N tensor, same loss and grads."""
    pytest.importorskip("triton")
    from kernels.infonce_tiles import interpreter_ready

    if not (torch.cuda.is_available() or interpreter_ready()):
        pytest.skip("no GPU and Triton imported before TRITON_INTERPRET=1 was set")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = {k: v.float().to(device) for k, v in _data(3).items()}

    def fused(a, b, s, groups, valid):
        return grouped_symmetric_infonce(a, b, s, groups.to(device), valid_local=valid.to(device), backend="triton")

    got = _loss_and_grads(fused, data, GROUPS, VALID)
    ref = _loss_and_grads(grouped_symmetric_infonce_reference, _data(3), GROUPS, VALID)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x.double().cpu(), y, rtol=1e-4, atol=1e-5)
