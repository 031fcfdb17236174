"""The stage-1 -> stage-2 switch (pretrain/engine/trainer.py) on one spawned gloo rank, real DeepSpeed engines.

In stage 1 the encoders stay in the optimizer with lr 0 and no gradient. Under ZeRO their flat
partitions still get (zero) gradients, so AdamW counts those steps; unless the trainer resets the
encoder state at the switch, the bias corrections of stage 2 start at t = stage1_steps + 1 and the
first encoder updates are about half the scheduled learning rate. A fresh AdamW's first update
moves every parameter with a non-negligible gradient by lr (the update is lr * g / (|g| + eps)),
and the encoders' no-decay parameters (biases, norm gains) feel no weight decay: the largest
move of one of them on the first stage-2 step must equal that group's learning rate.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import free_port
from tests.pretrain.engine.trainer_ranks import train_rank
from tests.spawn_ranks import run_ranks

pytestmark = pytest.mark.slow

STAGE1 = 3
GROUP = "encoder_sequence_no_decay"


def _worker(rank: int, port: int, out: str, shards: str, run_dir: str, ds_json: str) -> None:
    moves = []

    def probe(trainer):
        import deepspeed

        # Its parameters by their full shapes: ZeRO-3 leaves empty 1-D placeholders in the module.
        encoder = trainer.model.sequence_encoder.parameters()
        params = [p for p in encoder if len(getattr(p, "ds_shape", p.shape)) < 2]
        real_step = trainer._optimizer_step

        def optimizer_step():
            with deepspeed.zero.GatheredParameters(params):
                before = [p.detach().clone() for p in params]
            lr = next(g["lr"] for g in trainer.engine.optimizer.param_groups if g["name"] == GROUP)
            applied = real_step()
            with deepspeed.zero.GatheredParameters(params):
                moved = max(float((p.detach() - b).abs().max()) for p, b in zip(params, before))
            moves.append((lr, moved))
            return applied

        trainer._optimizer_step = optimizer_step
        return lambda trainer: {"moves": moves}

    over = [
        "optim.warmup_steps=2",
        f"train.stage1_steps={STAGE1}",
        f"train.max_steps={STAGE1 + 1}",
        "train.checkpoint_every=1000",
    ]
    train_rank(rank, 1, port, out, shards, run_dir, ds_json, over, probe)


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_first_stage2_encoder_update_is_the_scheduled_learning_rate(tmp_path, small_demo, zero):
    ds_json = tmp_path / f"zero{zero}.json"
    ds_json.write_text(
        json.dumps(
            {"zero_optimization": {"stage": zero}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
        )
    )
    port = free_port()
    args = (0, port, str(tmp_path), str(small_demo), str(tmp_path / "run"), str(ds_json))
    (result,) = run_ranks(_worker, lambda r: args, 1, tmp_path, 300.0, "rank")
    moves = result["moves"]
    assert len(moves) == STAGE1 + 1
    assert all(lr == 0.0 and moved == 0.0 for lr, moved in moves[:STAGE1])  # stage 1: frozen, bit for bit
    lr, moved = moves[STAGE1]
    assert lr > 0 and moved == pytest.approx(lr, rel=0.02), f"ZeRO-{zero}: moved {moved:.3e}, lr {lr:.3e}"


def _frozen_worker(rank: int, port: int, out: str, shards: str, run_dir: str) -> None:
    def probe(trainer):
        import deepspeed

        encoders = {"sequence": trainer.model.sequence_encoder, "text": trainer.model.text_encoder}

        def snapshot() -> dict[str, list[torch.Tensor]]:
            params = [p for enc in encoders.values() for p in enc.parameters()]
            with deepspeed.zero.GatheredParameters(params):
                return {name: [p.detach().clone() for p in enc.parameters()] for name, enc in encoders.items()}

        before = snapshot()

        def finish(trainer) -> dict:
            after = snapshot()
            return {"moved": {n: max(float((a - b).abs().max()) for a, b in zip(after[n], before[n])) for n in after}}

        return finish

    over = ["train.stage1_steps=1", "train.max_steps=3", "train.checkpoint_every=1000", "train.frozen_encoders=[text]"]
    train_rank(rank, 1, port, out, shards, run_dir, "zero3.json", over, probe)


def test_frozen_encoders_stay_frozen_in_stage_2(tmp_path, small_demo):
    """train.frozen_encoders=[text] (ProtCLIP's frozen PubMedBERT): bit-identical text encoder after
    two stage-2 steps under ZeRO-3, while the sequence encoder trains."""
    port = free_port()
    args = (0, port, str(tmp_path), str(small_demo), str(tmp_path / "run"))
    (result,) = run_ranks(_frozen_worker, lambda r: args, 1, tmp_path, 300.0, "rank")
    assert result["step"] == 3
    assert result["moved"]["text"] == 0.0 and result["moved"]["sequence"] > 0.0
