"""kernels.sigmoid_distributed on 2 gloo ranks: the gathered SigLIP loss (all-gather and ring) equals the
single-process loss over the global batch, and so do the gradients (local ones ×W, averaged ones ×1);
with false-negative group ids too (same-group pairs across ranks excluded).

Workers are spawned once per module (float64, so comparisons are exact up to round-off), save their
results, and the assertions run in the parent against ``sigmoid_loss_reference`` on the global batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import gathered_sigmoid_loss, sigmoid_loss
from kernels.sigmoid_reference import sigmoid_loss_reference
from tests.spawn_ranks import gloo_rank, run_ranks

WORLD = 2
GLOBAL_BATCH, DIM, FEATURES = 12, 8, 5
TIMEOUT_S = 120.0  # a hang guard: spawned ranks start slowly on a busy 2-core host
STRATEGIES = ("allgather", "ring")
CASE_KINDS = ((False, False), (True, False), (False, True), (True, True))  # (masked, grouped)


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1),
        "b": F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=1),
        "x_a": torch.randn(GLOBAL_BATCH, FEATURES, generator=g, dtype=torch.float64),
        "x_b": torch.randn(GLOBAL_BATCH, FEATURES, generator=g, dtype=torch.float64),
        "scale": torch.tensor([3.0], dtype=torch.float64),
        "bias": torch.tensor([-2.0], dtype=torch.float64),
        # rank 0 loses 2 pairs, rank 1 loses 1: unequal local counts exercise the N_r / N weighting
        "valid": torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool),
        # false-negative groups across the two ranks (rows 0-5 | 6-11); -1: no group
        "groups": torch.tensor([5, -1, 5, 7, 7, -1, 5, 3, 7, -1, 9, 9]),
    }


def _tiny_model() -> dict[str, torch.Tensor]:
    """Replicated parameters: two projection heads, a log temperature and a bias, both of shape [1]."""
    g = torch.Generator().manual_seed(1)
    params = {
        "w_a": torch.randn(DIM, FEATURES, generator=g, dtype=torch.float64),
        "w_b": torch.randn(DIM, FEATURES, generator=g, dtype=torch.float64),
        "log_scale": torch.tensor([1.2], dtype=torch.float64),
        "bias": torch.tensor([-1.5], dtype=torch.float64),
    }
    return {name: p.requires_grad_() for name, p in params.items()}


def _model_loss(params, x_a, x_b, loss_fn, valid):
    emb_a = F.normalize(F.linear(x_a, params["w_a"]), dim=1)
    emb_b = F.normalize(F.linear(x_b, params["w_b"]), dim=1)
    return loss_fn(emb_a, emb_b, params["log_scale"].exp(), params["bias"], valid)


def _rank_results(rank: int) -> dict:
    data = _global_batch()
    rows = GLOBAL_BATCH // WORLD
    local = slice(rank * rows, (rank + 1) * rows)
    out = {}
    for strategy in STRATEGIES:
        for masked, grouped in CASE_KINDS:
            valid = data["valid"][local] if masked else None
            groups = data["groups"][local] if grouped else None

            def loss_fn(a, b, s, t, v, groups=groups, strategy=strategy):
                return gathered_sigmoid_loss(
                    a, b, s, t, valid_local=v, groups_local=groups, strategy=strategy, backend="torch"
                )

            leaves = (data["a"][local], data["b"][local], data["scale"], data["bias"])
            a, b, s, t = (x.clone().requires_grad_() for x in leaves)
            loss = loss_fn(a, b, s, t, valid)
            loss.backward()
            params = _tiny_model()
            _model_loss(params, data["x_a"][local], data["x_b"][local], loss_fn, valid).backward()
            grads = {}
            for name, p in params.items():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)  # DeepSpeed-style data-parallel averaging
                grads[name] = p.grad / WORLD
            out[strategy, masked, grouped] = {
                "loss": loss.detach(),
                "a": a.grad,
                "b": b.grad,
                "s": s.grad,
                "t": t.grad,
                "params": grads,
            }
        try:
            ragged = torch.zeros(3 + rank, DIM)
            gathered_sigmoid_loss(ragged, ragged, 1.0, 0.0, strategy=strategy)
        except ValueError as err:
            out[f"ragged_error_{strategy}"] = str(err)
    # bf16 inputs on the ring: same as the all-gather up to fp32 round-off (both compute in fp32)
    a16, b16 = data["a"][local].bfloat16(), data["b"][local].bfloat16()
    s32, t32 = data["scale"].float(), data["bias"].float()
    out["bf16"] = {
        strategy: gathered_sigmoid_loss(a16, b16, s32, t32, strategy=strategy).detach() for strategy in STRATEGIES
    }
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    gloo_rank(rank, WORLD, init_file, out_dir, lambda: _rank_results(rank))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo_sigmoid")
    return run_ranks(_worker, lambda r: (r, str(tmp / "rendezvous"), str(tmp)), WORLD, tmp, TIMEOUT_S, "rank")


def _single_process(masked: bool, grouped: bool) -> dict:
    """The reference: one process, global batch, float64 materialised loss."""
    data = _global_batch()
    valid = data["valid"] if masked else torch.ones(GLOBAL_BATCH, dtype=torch.bool)
    groups = data["groups"] if grouped else None

    def loss_fn(a, b, s, t, _valid):
        targets = torch.where(valid, torch.arange(GLOBAL_BATCH), -1)
        return sigmoid_loss_reference(a, b, s, t, targets, key_valid=valid, groups=groups)

    a, b, s, t = (x.clone().requires_grad_() for x in (data["a"], data["b"], data["scale"], data["bias"]))
    loss = loss_fn(a, b, s, t, None)
    loss.backward()
    params = _tiny_model()
    _model_loss(params, data["x_a"], data["x_b"], loss_fn, None).backward()
    return {
        "loss": loss.detach(),
        "a": a.grad,
        "b": b.grad,
        "s": s.grad,
        "t": t.grad,
        "params": {k: p.grad for k, p in params.items()},
    }


CASES = pytest.mark.parametrize(
    "strategy,masked,grouped",
    [(s, m, g) for s in STRATEGIES for m, g in CASE_KINDS],
    ids=lambda x: {False: "-", True: "+"}.get(x, x) if isinstance(x, bool) else str(x),
)


@CASES
def test_mean_rank_loss_equals_global_loss(rank_results, strategy, masked, grouped):
    ref = _single_process(masked, grouped)
    mean_loss = sum(r[strategy, masked, grouped]["loss"] for r in rank_results) / WORLD
    torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-10, atol=1e-12)
    if grouped:  # the groups matter in this batch: the ungrouped loss differs
        assert abs(mean_loss - _single_process(masked, False)["loss"]) > 1e-3


@CASES
def test_local_grads_are_world_size_times_global(rank_results, strategy, masked, grouped):
    ref = _single_process(masked, grouped)
    rows = GLOBAL_BATCH // WORLD
    for rank, res in enumerate(rank_results):
        local = slice(rank * rows, (rank + 1) * rows)
        for name in ("a", "b"):
            got = res[strategy, masked, grouped][name]
            torch.testing.assert_close(got, WORLD * ref[name][local], rtol=1e-9, atol=1e-12)
    # logit_scale and bias are replicated, not gathered: rank grads sum to W x the global grad
    for name in ("s", "t"):
        got = sum(r[strategy, masked, grouped][name] for r in rank_results)
        torch.testing.assert_close(got, WORLD * ref[name], rtol=1e-9, atol=1e-12)
    if masked:
        invalid = ~_global_batch()["valid"]
        assert torch.all(ref["a"][invalid] == 0) and torch.all(ref["b"][invalid] == 0)


@CASES
def test_averaged_replicated_param_grads_equal_single_process(rank_results, strategy, masked, grouped):
    ref = _single_process(masked, grouped)["params"]
    for res in rank_results:
        for name, grad in res[strategy, masked, grouped]["params"].items():
            torch.testing.assert_close(grad, ref[name], rtol=1e-9, atol=1e-12)


def test_ring_matches_allgather_in_bf16(rank_results):
    for res in rank_results:
        assert res["bf16"]["ring"].dtype == torch.float32
        torch.testing.assert_close(res["bf16"]["ring"], res["bf16"]["allgather"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ragged_local_batches_fail_clearly(rank_results, strategy):
    for r in rank_results:
        assert "same local batch" in r[f"ragged_error_{strategy}"]
        assert "[3, 4]" in r[f"ragged_error_{strategy}"]


def test_single_process_fallbacks():
    assert not dist.is_initialized()
    data = _global_batch()
    a, b, s, t, valid = data["a"], data["b"], data["scale"], data["bias"], data["valid"]
    for strategy in STRATEGIES:
        for v in (None, valid):
            for groups in (None, data["groups"]):
                got = gathered_sigmoid_loss(a, b, s, t, valid_local=v, groups_local=groups, strategy=strategy)
                targets = None if v is None else torch.where(v, torch.arange(GLOBAL_BATCH), -1)
                torch.testing.assert_close(got, sigmoid_loss(a, b, s, t, targets, key_valid=v, groups=groups))
    with pytest.raises(ValueError, match="strategy"):
        gathered_sigmoid_loss(a, b, s, t, strategy="tree")
    with pytest.raises(ValueError, match="valid_local"):
        gathered_sigmoid_loss(a, b, s, t, valid_local=valid[:3])
    with pytest.raises(ValueError, match="groups_local"):
        gathered_sigmoid_loss(a, b, s, t, groups_local=data["groups"][:3])
