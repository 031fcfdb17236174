"""``data.hard_negatives: previous_epoch`` in real Trainer runs (pretrain/engine/epoch_embeddings.py).

One spawned rank runs several short trainings one after another on a 32-protein demo corpus (4
batches of 8 per epoch, so 10 steps cross two epoch ends): an uninterrupted run, a run stopped
inside epoch 1 and resumed, a run stopped exactly at epoch 0's end (its file is computed on
resume), and resumes whose epoch file is missing or changed (refused, naming it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import free_port
from tests.spawn_ranks import launched_rank, run_ranks, trainer_overrides

pytestmark = pytest.mark.slow  # seven short trainings on one spawned rank, a 2-rank ZeRO-3 pass

STEPS, PER_EPOCH, N = 10, 4, 32
OVERRIDES = [
    "data.hard_negatives=previous_epoch",
    "data.hard_negative_ratio=0.5",
    "data.hard_negative_k=8",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
    "train.stage1_steps=2",
    "train.validate_every=0",
    "eval.batch_size=12",  # the epoch pass: chunks of 12, 12 and 8 rows
]
ZERO0 = {"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> Path:
    """32 train proteins in 4 shards of 8, 8 held out."""
    from data_shards.demo_corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("tiny_demo")
    build_demo_corpus(out, num_train=N, num_heldout=8, samples_per_shard=8, seed=0)
    return out


def _train(run_dir: Path, shards: str, ds_json: str, probe=None):
    from pretrain.run import prepare, run_trainer

    plan = prepare(None, [*trainer_overrides(shards), *OVERRIDES, f"train.max_steps={STEPS}"], ds_json, run_dir, 1)
    return run_trainer(plan, probe)


def _sigterm_after(step: int):
    """A probe that sends the trainer its SIGTERM during step ``step``: it saves a checkpoint after that
    step and returns, as a preempted run does (same recipe, so the same learning-rate schedule)."""

    def probe(trainer):
        import signal

        real = trainer.train_step

        def train_step(batch):
            if trainer.step == step - 1:
                trainer._on_sigterm(signal.SIGTERM, None)
            return real(batch)

        trainer.train_step = train_step

    return probe


def _direct_embedding_probe(direct: dict):
    """Wrap the trainer's epoch-end write: beside each file, embed the manifest directly with the module's
    weights at that moment (pretrain.eval.embed, encoder calls, one process, no chunking or gathering)."""

    def probe(trainer):
        from pretrain.eval.embed import embed_shards

        write = trainer.epoch_embeddings.write

        def checked_write(model, epoch):
            path = write(model, epoch)
            want = embed_shards(trainer.model, trainer.cfg, trainer.cfg.data.train_shards, 5, modalities=("sequence",))
            trainer.model.train()
            written = np.load(path, allow_pickle=False)  # tensors: the result is read back with weights_only
            direct[epoch] = (torch.from_numpy(written), torch.from_numpy(want["sequence"]), trainer.step)
            return path

        trainer.epoch_embeddings.write = checked_write

    return probe


def _worker(rank: int, port: int, out: str, shards: str, tmp: str) -> None:
    launched_rank(rank, 1, port, out, lambda: _resume_runs(shards, Path(tmp)))


def _resume_runs(shards: str, tmp_dir: Path) -> dict:
    import os

    from pretrain.config import ConfigError
    from pretrain.engine.run_files import RECORD_ENV
    from pretrain.run import init_process_group

    os.environ[RECORD_ENV] = "1"
    ds_json = tmp_dir / "zero0.json"
    ds_json.write_text(json.dumps(ZERO0))
    result: dict = {}
    init_process_group()
    direct: dict = {}
    _train(tmp_dir / "a", shards, str(ds_json), _direct_embedding_probe(direct))
    result["direct"] = direct
    # preempted inside epoch 1 (step 6: cursor (1, 2)), then resumed
    assert _train(tmp_dir / "b", shards, str(ds_json), _sigterm_after(PER_EPOCH + 2)).preempted
    for name in ("changed", "missing"):
        shutil.copytree(tmp_dir / "b", tmp_dir / name)
    _train(tmp_dir / "b", shards, str(ds_json))
    # preempted at epoch 0's very end (step 4: no time for the file, none written), then resumed
    assert _train(tmp_dir / "e", shards, str(ds_json), _sigterm_after(PER_EPOCH)).preempted
    result["e_files_at_stop"] = sorted(p.name for p in (tmp_dir / "e").glob("hard_negatives/*.npy"))
    _train(tmp_dir / "e", shards, str(ds_json))
    emb = np.load(tmp_dir / "changed" / "hard_negatives" / "epoch0.npy")
    np.save(tmp_dir / "changed" / "hard_negatives" / "epoch0.npy", emb[::-1].copy(), allow_pickle=False)
    (tmp_dir / "missing" / "hard_negatives" / "epoch0.npy").unlink()
    for name in ("changed", "missing"):
        try:
            _train(tmp_dir / name, shards, str(ds_json))
            result[name] = "resumed"
        except ConfigError as e:
            result[name] = str(e)
    return result


def _consumed(run: Path) -> list[tuple]:
    lines = [json.loads(x) for x in (run / "consumed" / "rank_0.jsonl").read_text().splitlines()]
    return [(x["epoch"], x["batch"], tuple(x["ids"])) for x in lines]


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_demo):
    tmp = tmp_path_factory.mktemp("epoch_embeddings")
    args = (0, free_port(), str(tmp), str(tiny_demo), str(tmp))
    (result,) = run_ranks(_worker, lambda r: args, 1, tmp, 300.0, "rank")
    return tmp, result


def test_epoch_file_is_the_manifest_embedded_with_the_weights_at_the_epoch_end(runs):
    tmp, result = runs
    direct = result["direct"]
    assert sorted(direct) == [0, 1]  # epochs 0 and 1 ended inside the 10 steps
    for epoch, (written, want, step) in direct.items():
        written, want = written.numpy(), want.numpy()
        assert step == (epoch + 1) * PER_EPOCH
        assert written.dtype == np.float32 and written.shape == want.shape and written.shape[0] == N
        np.testing.assert_allclose(written, want, atol=2e-6)
    assert not torch.allclose(direct[0][0], direct[1][0], atol=1e-4)  # the weights moved: new neighbours
    assert sorted(p.name for p in (tmp / "a" / "hard_negatives").glob("*.npy")) == ["epoch0.npy", "epoch1.npy"]


def test_batches_after_an_epoch_end_are_the_export_plan_of_its_file(runs, tiny_demo):
    from data_shards.manifest import load_manifest
    from data_shards.reader import ShardReader
    from pretrain.config import load_config
    from pretrain.data.stream import EpochPlan, plan_for

    tmp, result = runs
    cfg = load_config(
        overrides=[*trainer_overrides(tiny_demo), *OVERRIDES, f"data.hard_negatives={tmp / 'epoch1.npy'}"]
    )
    np.save(tmp / "epoch1.npy", result["direct"][0][0].numpy(), allow_pickle=False)  # epoch 0's file: epoch 1's plan
    plan = plan_for(cfg, load_manifest(cfg.data.train_shards), 1, 0)
    readers: dict = {}

    def ids(refs):
        return tuple(readers.setdefault(p, ShardReader(p)).read(i).id for p, i in refs)

    want = [ids(plan.batch_refs(1, i)) for i in range(PER_EPOCH)]
    got = [x[2] for x in _consumed(tmp / "a") if x[0] == 1]
    assert got == want
    plain = EpochPlan(plan.manifest, 1, 0, 8, 0)
    assert [x[2] for x in _consumed(tmp / "a") if x[0] == 0] == [ids(plain.batch_refs(0, i)) for i in range(PER_EPOCH)]
    assert got != [ids(plain.batch_refs(1, i)) for i in range(PER_EPOCH)]


@pytest.mark.parametrize("run", ["b", "e"])
def test_a_resumed_run_sees_the_uninterrupted_batches_and_losses(runs, run):
    """b: stopped inside epoch 1 (reuses epoch0.npy); e: stopped at epoch 0's end (recomputes it)."""
    tmp, result = runs
    assert _consumed(tmp / run) == _consumed(tmp / "a")
    want, got = _losses(tmp / "a"), _losses(tmp / run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    if run == "e":
        assert result["e_files_at_stop"] == []  # the last step wrote nothing: the resume computed it
    for name in ("epoch0.npy", "epoch1.npy"):  # e: epoch0.npy recomputed from the checkpoint, the same bytes
        assert (tmp / run / "hard_negatives" / name).read_bytes() == (tmp / "a" / "hard_negatives" / name).read_bytes()


@pytest.mark.parametrize(
    "name, problem", [("changed", "has digest [0-9a-f]{16}, not [0-9a-f]{16}"), ("missing", "is missing")]
)
def test_a_resume_inside_an_epoch_without_its_file_is_refused_naming_it(runs, name, problem):
    _, result = runs
    assert re.search(f"{name}/hard_negatives/epoch0.npy {problem};", result[name]), result[name]
    assert "cannot be recomputed" in result[name]


def _zero3_worker(rank: int, port: int, out: str, shards: str, run_dir: str) -> None:
    launched_rank(rank, 2, port, out, lambda: _zero3_write(rank, shards, run_dir))


def _zero3_write(rank: int, shards: str, run_dir: str) -> dict:
    import deepspeed

    from data_shards.manifest import load_manifest
    from pretrain.config import load_config
    from pretrain.data.stream import plan_for
    from pretrain.engine.builder import build_model
    from pretrain.engine.ds_config import load_deepspeed_config, resolve_deepspeed_config
    from pretrain.engine.epoch_embeddings import EpochEmbeddings
    from pretrain.eval.embed import embed_shards
    from pretrain.run import init_process_group

    torch.set_num_threads(1)
    init_process_group()
    cfg = load_config(overrides=[*trainer_overrides(shards), *OVERRIDES, "data.hard_negative_modality=structure"])
    torch.manual_seed(0)
    model = build_model(cfg)  # the same weights on both ranks
    want = embed_shards(model, cfg, cfg.data.train_shards, 5, modalities=("structure",))["structure"]
    model.train()
    ds = resolve_deepspeed_config(load_deepspeed_config("zero3.json"), cfg, 2, use_cuda=False)
    groups = [{"params": ps, "name": name} for name, ps in model.parameter_groups().items()]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds)
    plan = plan_for(cfg, load_manifest(cfg.data.train_shards), 2, rank, run_dir=run_dir)
    path = EpochEmbeddings(cfg, Path(run_dir), plan, torch.device("cpu")).write(engine, 0)
    written = np.load(path, allow_pickle=False)  # rank 1 reads what rank 0 wrote, after the barrier
    return {"written": torch.from_numpy(written), "want": torch.from_numpy(want), "training": engine.training}


def test_two_zero3_ranks_write_the_manifest_embedding(tmp_path, tiny_demo):
    """Two gloo ranks under ZeRO-3 (every forward gathers the partitions): 3 chunks of 12 rows over 2
    ranks (rank 1 repeats a chunk in the second round); the file is the one-process embedding."""
    args = lambda r: (r, port, str(tmp_path), str(tiny_demo), str(tmp_path / "run"))  # noqa: E731
    port = free_port()
    results = run_ranks(_zero3_worker, args, 2, tmp_path, 300.0, "rank")
    want = results[0]["want"].numpy()
    assert want.shape[0] == N and want.dtype == np.float32
    assert (np.abs(want).sum(1) == 0).any() and (np.abs(want).sum(1) > 0).sum() > N // 2  # some lack a structure
    for r in results:
        assert r["training"]  # train mode restored
        np.testing.assert_allclose(r["written"].numpy(), want, atol=2e-6)
    assert [p.name for p in (tmp_path / "run" / "hard_negatives").iterdir()] == ["epoch0.npy"]  # no temporary left
