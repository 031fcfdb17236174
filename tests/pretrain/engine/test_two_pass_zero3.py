"""The two-pass step under 2-rank ZeRO-3 (gloo, CPU) gives the one-pass step's gradients and update.

Both modes run on the same two spawned ranks, one after the other, each on a fresh model and engine
built from the same seed, with the same per-rank batches, dropout on (one spawn instead of one per
mode: a rank's start-up, imports and process group cost more than both steps on 2 cores; the first
engine is destroyed before the second is built, and neither reads the other's tensors).
The reference ("one_pass") embeds chunk by chunk with grad and calls ``engine.backward`` once, so
its dropout masks are drawn in the same order as the two-pass step's; the two-pass step
back-propagates twice per rank through ``engine.backward`` with the accumulation boundary on the
last chunk. Full gradients are read with ``deepspeed.utils.safe_get_full_grad`` (a collective that
all-gathers the ZeRO-3 partitions), the updated parameters with ``safe_get_full_fp32_param``.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from tests.spawn_ranks import run_ranks

pytestmark = pytest.mark.slow

WORLD, ROWS, CHUNK = 2, 4, 2
TIMEOUT_S = 300.0
OVERRIDES = ["model.head_dropout=0.1", f"data.batch_size={ROWS}", "train.activation_checkpointing=[sequence, text]"]
MODES = ("one_pass", "two_pass")  # run in this order on the same ranks, each on a fresh engine


def _worker(rank: int, init_file: str, port: int, demo_root: str, out_dir: str) -> None:
    os.environ.update(
        DS_ACCELERATOR="cpu",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        from pretrain.config import load_config
        from pretrain.engine.builder import build_model
        from pretrain.engine.ds_config import load_deepspeed_config, resolve_deepspeed_config
        from pretrain.engine.two_pass import slice_model_batch, two_pass_step
        from pretrain.losses.align_pro import AlignProLoss
        from tests.pretrain.engine.two_pass_helpers import demo_batch

        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
        )
        deepspeed.init_distributed(dist_backend="gloo")
        cfg = load_config(overrides=OVERRIDES)
        ds = resolve_deepspeed_config(load_deepspeed_config("zero3.json"), cfg, WORLD, use_cuda=False)
        results = {}
        for mode in MODES:  # each from the same start: seed, model, engine, batch, loss
            torch.manual_seed(0)
            model = build_model(cfg).train()
            groups = [{"params": ps, "name": name} for name, ps in model.parameter_groups().items()]
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
            batch = demo_batch(cfg, Path(demo_root), ROWS, offset=ROWS * rank)
            loss_fn = AlignProLoss(cfg.loss)
            torch.manual_seed(100)  # the same dropout stream in both modes
            if mode == "two_pass":
                terms, _ = two_pass_step(
                    engine,
                    batch,
                    loss_fn,
                    CHUNK,
                    backward=engine.backward,
                    set_boundary=engine.set_gradient_accumulation_boundary,
                )
            else:
                parts = [engine(slice_model_batch(batch, s, s + CHUNK)) for s in range(0, ROWS, CHUNK)]
                emb = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "logit_scale"}
                terms = loss_fn.compute(emb, batch["present"], parts[0]["logit_scale"])
                engine.backward(terms["loss"])
            grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
            engine.step()
            params = {n: safe_get_full_fp32_param(p) for n, p in model.named_parameters()}
            results[mode] = {
                "loss": float(terms["loss"].detach()),
                "grads": {n: g.clone() for n, g in grads.items() if g is not None},
                "params": {n: p.clone() for n, p in params.items()},
            }
            engine.destroy()  # the next mode's engine starts from nothing of this one
            del engine, model
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(tmp_path: Path, demo_root: Path) -> dict[str, list[dict]]:
    """Both modes on one 2-rank spawn: ``{mode: [rank 0's result, rank 1's]}``."""
    out = tmp_path / "ranks"
    out.mkdir()
    port = free_port()
    ranks = run_ranks(
        _worker, lambda r: (r, str(out / "rdv"), port, str(demo_root), str(out)), WORLD, out, TIMEOUT_S, "rank"
    )
    return {mode: [r[mode] for r in ranks] for mode in MODES}


def test_two_pass_matches_one_pass_under_zero3(tmp_path):
    from data_shards.demo_corpus import build_demo_corpus
    from pretrain.config import load_config

    demo_root = tmp_path / "demo"
    build_demo_corpus(demo_root, num_train=96, num_heldout=48, samples_per_shard=48, seed=0)
    results = _run(tmp_path, demo_root)
    ref, got = results["one_pass"], results["two_pass"]
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-6)
    # Gradients and parameters are the full (gathered) tensors: identical on both ranks.
    want, have = ref[0]["grads"], got[0]["grads"]
    assert want.keys() == have.keys()
    nonzero = [n for n, w in want.items() if w.abs().sum() > 0]  # ZeRO-3 gives unused parameters zeros
    for prefix in ("sequence_encoder.", "structure_encoder.", "text_encoder.", "heads.", "log_logit_scale"):
        assert any(n.startswith(prefix) for n in nonzero), prefix
    for name, w in want.items():
        scale = float(w.abs().max())
        torch.testing.assert_close(have[name], w, rtol=1e-5, atol=1e-5 * scale + 1e-9, msg=name)
    # The first AdamW step moves a parameter by lr·ĝ/(|ĝ| + eps) plus the decay, ĝ = c·g the clipped
    # gradient (c = min(1, grad_clip/‖g‖)). Where |ĝ| is near eps the update is steep in g: a gradient
    # difference Δg of float noise moves it by up to lr·c·Δg·eps/(c·|g|_min + eps)² (|g|_min = 0 where the
    # signs differ), added to the tolerance element by element, with a factor 2 of margin. A wrong update
    # (applied twice, or from a partial gradient) still differs by about lr per element.
    optim = load_config(overrides=OVERRIDES).optim
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in want.values())))
    c = min(1.0, optim.grad_clip / norm)
    for name, w in ref[0]["params"].items():
        extra = torch.zeros_like(w)
        if name in want:
            g1, g2 = want[name], have[name]
            g_min = torch.where(g1 * g2 > 0, torch.minimum(g1.abs(), g2.abs()), torch.zeros_like(g1))
            extra = 2 * optim.lr * c * (g1 - g2).abs() * optim.eps / (c * g_min + optim.eps) ** 2
        tolerance = 1e-7 + 1e-5 * w.abs() + extra
        for rank in range(WORLD):
            excess = (got[rank]["params"][name] - w).abs() - tolerance
            assert float(excess.max()) <= 0, f"{name} (rank {rank}): exceeds the tolerance by {float(excess.max()):.3g}"


def _losses(run_dir: Path) -> list[float]:
    import json

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r["loss"] for r in rows if "loss" in r]


def test_trainer_two_pass_run_matches_one_pass_run(tmp_path, small_demo, reference_run):
    """The real launcher (2 ranks, ZeRO-3): ``train.grad_cache_chunk`` equal to the per-rank batch (one
    chunk, so the dropout stream is the one-pass one) gives the one-pass run's losses, step after step;
    smaller chunks plus checkpointing train too."""
    from tests.conftest import run_launcher

    # checkpoint_every=3 changes nothing here (the last step is always saved); it makes the one-pass
    # run the very recipe test_multinode compares with, so the session launches it once for both.
    common = [
        "train.max_steps=3",
        "train.checkpoint_every=3",
        "train.stage1_steps=1",
        "data.loader=local",
        "train.eval_at_end=false",
    ]
    runs = {
        "two_pass": ["train.grad_cache_chunk=8"],
        "chunks": ["train.grad_cache_chunk=3", "train.activation_checkpointing=[sequence, structure, text]"],
    }
    losses = {"one_pass": _losses(reference_run(common))}
    for name, extra in runs.items():
        p = run_launcher(tmp_path / name, small_demo, common + extra)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        losses[name] = _losses(tmp_path / name)
    assert len(losses["one_pass"]) == 3
    assert losses["two_pass"] == pytest.approx(losses["one_pass"], rel=1e-5)
    assert len(losses["chunks"]) == 3 and all(x == x for x in losses["chunks"])
