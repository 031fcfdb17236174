"""kernels.distributed on 2 gloo ranks: gathered losses and gradients equal the single-process ones.

The same spawned ranks also test ``kernels.gather`` (``gather_with_grad``, the ragged-batch check): one
spawn serves both modules.

Workers are spawned once per module (float64, so the comparisons are exact up to round-off), write
their results to files, and the assertions run in the parent against a single-process computation
on the global batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels.distributed import gathered_symmetric_infonce
from kernels.functional import symmetric_infonce
from kernels.gather import gather_with_grad
from kernels.infonce_reference import infonce_eager
from tests.spawn_ranks import gloo_rank, run_ranks

WORLD = 2
GLOBAL_BATCH, DIM, FEATURES = 12, 8, 5
TIMEOUT_S = 120.0  # a hang guard: spawned ranks start slowly on a busy 2-core host


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1),
        "b": F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1),
        "x_a": torch.randn(GLOBAL_BATCH, FEATURES, generator=g, dtype=torch.float64),
        "x_b": torch.randn(GLOBAL_BATCH, FEATURES, generator=g, dtype=torch.float64),
        "scale": torch.tensor([3.0], dtype=torch.float64),
        # rank 0 loses 2 pairs, rank 1 loses 1: unequal local counts exercise the N_r / N weighting
        "valid": torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool),
    }


def _tiny_model() -> dict[str, torch.Tensor]:
    """Replicated parameters: two projection heads and a log temperature of shape [1]."""
    g = torch.Generator().manual_seed(1)
    params = {
        "w_a": torch.randn(DIM, FEATURES, generator=g, dtype=torch.float64),
        "w_b": torch.randn(DIM, FEATURES, generator=g, dtype=torch.float64),
        "log_scale": torch.tensor([1.2], dtype=torch.float64),
    }
    return {name: p.requires_grad_() for name, p in params.items()}


def _model_loss(params, x_a, x_b, loss_fn, valid):
    emb_a = F.normalize(F.linear(x_a, params["w_a"]), dim=1)
    emb_b = F.normalize(F.linear(x_b, params["w_b"]), dim=1)
    return loss_fn(emb_a, emb_b, params["log_scale"].exp(), valid)


def _rank_results(rank: int) -> dict:
    data = _global_batch()
    rows = GLOBAL_BATCH // WORLD
    local = slice(rank * rows, (rank + 1) * rows)
    gathered = lambda a, b, s, v: gathered_symmetric_infonce(a, b, s, valid_local=v, backend="torch")
    out = {}
    for masked in (False, True):
        valid = data["valid"][local] if masked else None
        a, b, s = (t.clone().requires_grad_() for t in (data["a"][local], data["b"][local], data["scale"]))
        loss = gathered(a, b, s, valid)
        loss.backward()
        params = _tiny_model()
        model_loss = _model_loss(params, data["x_a"][local], data["x_b"][local], gathered, valid)
        model_loss.backward()
        grads = {}
        for name, p in params.items():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)  # DeepSpeed-style data-parallel averaging
            grads[name] = p.grad / WORLD
        out[masked] = {"loss": loss.detach(), "a": a.grad, "b": b.grad, "s": s.grad, "params": grads}

    x = torch.arange(6, dtype=torch.float64).reshape(3, 2).add(10 * rank).requires_grad_()
    y = gather_with_grad(x)
    (y * (rank + 1)).sum().backward()  # rank r weights every gathered row by r + 1
    out["gather"] = {"y": y.detach(), "x_grad": x.grad}
    for strategy in ("allgather", "ring"):
        try:
            ragged = torch.zeros(3 + rank, DIM)
            gathered_symmetric_infonce(ragged, ragged, s.detach(), strategy=strategy, backend="torch")
        except ValueError as err:
            out[f"ragged_error_{strategy}"] = str(err)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    gloo_rank(rank, WORLD, init_file, out_dir, lambda: _rank_results(rank), timeout_s=15)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    return run_ranks(_worker, lambda r: (r, str(tmp / "rendezvous"), str(tmp)), WORLD, tmp, TIMEOUT_S, "rank")


def _single_process(masked: bool) -> dict:
    """The reference: one process, global batch, float64 eager loss."""
    data = _global_batch()
    valid = data["valid"] if masked else torch.ones(GLOBAL_BATCH, dtype=torch.bool)

    def loss_fn(a, b, s, _valid):
        t = torch.where(valid, torch.arange(GLOBAL_BATCH), -1)
        return 0.5 * (infonce_eager(a, b, s, t, key_valid=valid) + infonce_eager(b, a, s, t, key_valid=valid))

    a, b, s = (t.clone().requires_grad_() for t in (data["a"], data["b"], data["scale"]))
    loss = loss_fn(a, b, s, None)
    loss.backward()
    params = _tiny_model()
    _model_loss(params, data["x_a"], data["x_b"], loss_fn, None).backward()
    return {
        "loss": loss.detach(),
        "a": a.grad,
        "b": b.grad,
        "s": s.grad,
        "params": {k: p.grad for k, p in params.items()},
    }


MASKED = pytest.mark.parametrize("masked", [False, True], ids=["full", "valid_local"])


@MASKED
def test_mean_rank_loss_equals_global_loss(rank_results, masked):
    ref = _single_process(masked)
    mean_loss = sum(r[masked]["loss"] for r in rank_results) / WORLD
    torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-10, atol=1e-12)


@MASKED
def test_local_grads_are_world_size_times_global(rank_results, masked):
    ref = _single_process(masked)
    rows = GLOBAL_BATCH // WORLD
    for rank, res in enumerate(rank_results):
        local = slice(rank * rows, (rank + 1) * rows)
        for name in ("a", "b"):
            torch.testing.assert_close(res[masked][name], WORLD * ref[name][local], rtol=1e-9, atol=1e-12)
    # logit_scale is replicated, not gathered: its rank grads sum (average x W) to W x the global grad
    torch.testing.assert_close(sum(r[masked]["s"] for r in rank_results), WORLD * ref["s"], rtol=1e-9, atol=1e-12)
    if masked:
        invalid = ~_global_batch()["valid"]
        assert torch.all(ref["a"][invalid] == 0) and torch.all(ref["b"][invalid] == 0)


@MASKED
def test_averaged_replicated_param_grads_equal_single_process(rank_results, masked):
    ref = _single_process(masked)["params"]
    for res in rank_results:
        for name, grad in res[masked]["params"].items():
            torch.testing.assert_close(grad, ref[name], rtol=1e-9, atol=1e-12)


def test_gather_with_grad_sums_gradients_across_ranks(rank_results):
    expected = torch.cat([torch.arange(6, dtype=torch.float64).reshape(3, 2) + 10 * r for r in range(WORLD)])
    for res in rank_results:
        torch.testing.assert_close(res["gather"]["y"], expected)
        # every rank r sends gradient (r + 1) to every gathered row: the sum is 1 + 2 = 3
        torch.testing.assert_close(res["gather"]["x_grad"], torch.full((3, 2), 3.0, dtype=torch.float64))


@pytest.mark.parametrize("strategy", ["allgather", "ring"])
def test_ragged_local_batches_fail_clearly(rank_results, strategy):
    """Every rank raises, naming both sizes, instead of hanging in a mismatched collective."""
    for r in rank_results:
        assert "same local batch" in r[f"ragged_error_{strategy}"]
        assert "[3, 4]" in r[f"ragged_error_{strategy}"]


def test_single_process_fallbacks():
    assert not dist.is_initialized()
    x = torch.randn(4, 3)
    assert gather_with_grad(x) is x
    data = _global_batch()
    a, b, s, valid = data["a"], data["b"], data["scale"], data["valid"]
    for v in (None, valid):
        got = gathered_symmetric_infonce(a, b, s, valid_local=v, backend="torch")
        torch.testing.assert_close(got, symmetric_infonce(a, b, s, valid=v, backend="torch"))
    with pytest.raises(ValueError, match="strategy"):
        gathered_symmetric_infonce(a, b, s, strategy="tree")
    with pytest.raises(ValueError, match="valid_local"):
        gathered_symmetric_infonce(a, b, s, valid_local=valid[:3])
