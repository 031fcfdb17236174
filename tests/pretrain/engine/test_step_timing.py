"""Per-step time split, encoder FLOPs and the loss backend in RUN/metrics.jsonl (pretrain/engine/step_timing.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import load_config
from pretrain.engine.step_timing import PHASES, EncoderFlops, StepTimer, device_peak_flops
from tests.conftest import TINY_OVERRIDES, free_port
from tests.pretrain.engine.trainer_ranks import train_rank
from tests.spawn_ranks import run_ranks

CPU = torch.device("cpu")


def test_phases_are_disjoint_parts_of_the_step_wall_time():
    timer = StepTimer(CPU)
    waits = iter([0.02, 0.01])

    def stream():
        for i in range(2):
            time.sleep(next(waits))
            yield i

    for _ in timer.iterate(stream()):
        for name, secs in (("forward", 0.01), ("loss", 0.005), ("backward", 0.01), ("optimizer", 0.005)):
            with timer.phase(name):
                time.sleep(secs)
        time.sleep(0.01)  # outside every phase, inside the step
        timer.end_step()
    numbers, others = timer.summary()
    assert numbers["time_data_s"] == pytest.approx(0.015, abs=0.01)  # mean of the two waits
    assert numbers["time_forward_s"] >= 0.01 and numbers["time_loss_s"] >= 0.005
    phases = sum(numbers[f"time_{p}_s"] for p in PHASES)
    assert phases + 0.009 <= numbers["time_step_s"]  # the 10 ms outside the phases is in the step only
    assert others == {"encoder_tflops": None, "mfu_encoders": None, "peak_mem_gb": None}  # no FLOP model, CPU
    again, _ = timer.summary()  # a summary starts afresh
    assert again["time_step_s"] == 0.0


def test_unknown_phase_and_bad_peak_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown step phase"):
        with StepTimer(CPU).phase("fwd"):
            pass
    monkeypatch.setenv("ALIGN_PRO_PEAK_TFLOPS", "fast")
    with pytest.raises(ValueError, match="ALIGN_PRO_PEAK_TFLOPS"):
        device_peak_flops(CPU, torch.bfloat16)
    monkeypatch.setenv("ALIGN_PRO_PEAK_TFLOPS", "500")
    assert device_peak_flops(CPU, None) == 500e12
    monkeypatch.delenv("ALIGN_PRO_PEAK_TFLOPS")
    assert device_peak_flops(CPU, torch.bfloat16) is None  # no table entry for a CPU


def _tiny_model_and_batch(small_demo: Path):
    from pretrain.data.stream import local_stream, plan_for
    from pretrain.engine.builder import build_model
    from pretrain.losses.registry import build_objective

    over = [
        f"data.train_shards={small_demo}/train",
        f"data.eval_shards={small_demo}/heldout",
        "data.loader=local",
        *TINY_OVERRIDES,
        "model.sequence.num_layers=2",
        "model.text.num_layers=2",
        "model.structure.num_layers=2",
    ]
    cfg = load_config(None, over)
    from data_shards.manifest import load_manifest

    objective = build_objective(cfg.loss)
    plan = plan_for(cfg, load_manifest(cfg.data.train_shards), 1, 0)
    from pretrain.data.stream import Cursor

    batch = next(iter(local_stream(cfg, plan, Cursor(), objective.needs_views())))[0]
    torch.manual_seed(0)
    return build_model(cfg, objective=objective), batch


def _counted(run) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run()
    return counter.get_total_flops()


def _gvp_formula_flops(enc, nodes: int, edges: int) -> int:
    """torch's count of the GVP-GNN as published (Jing et al.): every message GVP on every edge's
    ([s_j, edge_s, s_i], [v_j, edge_v, v_i]), the feed-forward and read-out on every node. The model's
    own forward may reorganise that algebra (fewer multiply-adds); model FLOPs are the formula's."""

    def tup(rows: int, dims) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rows, dims[0]), torch.randn(rows, dims[1], 3)

    node_in = (enc.embed_nodes[1].si, enc.embed_nodes[1].vi)
    edge_in = (enc.embed_edges[1].si, enc.embed_edges[1].vi)
    node_h, edge_h = tuple(enc.cfg.node_hidden), tuple(enc.cfg.edge_hidden)
    message_in = (2 * node_h[0] + edge_h[0], 2 * node_h[1] + edge_h[1])

    def run():
        enc.embed_nodes(tup(nodes, node_in))
        enc.embed_edges(tup(edges, edge_in))
        for layer in enc.layers:
            layer.conv.message_gvps(tup(edges, message_in))
            layer.feed_forward(tup(nodes, node_h))
        enc.readout(tup(nodes, node_h))

    return _counted(run)


def test_encoder_flops_match_torch_flop_counter(small_demo):
    """The analytic FLOP model against torch's own count of every matrix product of one forward.

    ESM-2 runs its reference attention here: torch's counter does not count the CPU flash kernel that
    the fused path runs (the FLOPs are the same, q·kᵀ and the product with v).
    """
    model, batch = _tiny_model_and_batch(small_demo)
    model.sequence_encoder.set_attention("reference")  # (training mode: BERT's SDPA takes the counted math path)
    flops = EncoderFlops(model).forward(batch)
    sources = [src for src in (batch, batch.get("views") or {}) if src]
    seq = sum(_counted(lambda s=s: model.sequence_encoder(s["seq_tokens"])) for s in sources if "seq_tokens" in s)
    text = sum(
        _counted(lambda s=s: model.text_encoder(s["text_ids"], s["text_attn"])) for s in sources if "text_ids" in s
    )
    graphs = [s["graph"] for s in sources if "graph" in s]
    struct = sum(
        _gvp_formula_flops(model.structure_encoder, g["node_s"].shape[0], g["edge_index"].shape[1]) for g in graphs
    )
    for name, measured in (("sequence", seq), ("text", text), ("structure", struct)):
        assert measured > 0
        assert flops[name] == pytest.approx(measured, rel=0.03), name
    trained = EncoderFlops(model).training(batch)
    frozen = EncoderFlops(model).training(batch, {"sequence", "text", "structure"})
    assert trained == pytest.approx(3 * frozen)


def _worker(rank: int, port: int, out: str, shards: str, run_dir: str) -> None:
    walls = []

    def probe(trainer):
        real_step = trainer.train_step

        def train_step(batch):  # the wall time of train_step alone: data wait is outside it
            start = time.perf_counter()
            values = real_step(batch)
            walls.append(time.perf_counter() - start)
            return values

        trainer.train_step = train_step
        return lambda trainer: {"walls": walls}

    over = ["train.stage1_steps=1", "train.max_steps=4", "train.log_every=2", "train.checkpoint_every=1000"]
    over.append("loss.temperature=per_term")  # also: what a per-term run logs of its scales
    train_rank(rank, 1, port, out, shards, run_dir, "zero2.json", over, probe)


@pytest.mark.slow
def test_metrics_lines_carry_the_time_split_and_the_loss_backend(tmp_path, small_demo):
    """A real DeepSpeed run on CPU: each logged line has the five phases, non-negative, summing to no
    more than the step's wall time (itself covering train_step), and the first names the torch loss.
    The run learns one temperature per term: each line logs them and not the shared scale no term used.
    The run directory holds lines of an attempt killed before its first checkpoint: they are dropped."""
    args = (0, free_port(), str(tmp_path), str(small_demo), str(tmp_path / "run"))
    # lines an attempt killed before its first checkpoint left behind: the fresh start drops them
    (tmp_path / "run" / "bad_samples").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 99.0}) + "\n")
    (tmp_path / "run" / "bad_samples" / "rank_0.jsonl").write_text(json.dumps({"step": 1, "key": "old"}) + "\n")
    (result,) = run_ranks(_worker, lambda r: args, 1, tmp_path, 300.0, "rank")
    assert "old" not in (tmp_path / "run" / "bad_samples" / "rank_0.jsonl").read_text()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    walls = result["walls"]
    for i, row in enumerate(rows):
        split = [row[f"time_{p}_s"] for p in PHASES]
        assert all(v >= 0 for v in split) and row["time_forward_s"] > 0 and row["time_backward_s"] > 0
        assert sum(split) <= row["time_step_s"] + 1e-9
        # the step's wall time covers train_step (mean of the two steps of this line)
        assert row["time_step_s"] >= 0.999 * sum(walls[2 * i : 2 * i + 2]) / 2
        assert row["encoder_tflops"] > 0 and row["mfu_encoders"] is None and row["peak_mem_gb"] is None
        assert 0.0 <= row["padding_fraction"] < 1.0  # pretrain.data.batching.padding_fraction, per step
    assert rows[0]["loss_backend"] == "torch" and "loss_backend" not in rows[1]
    for row in rows:
        assert "logit_scale" not in row  # stays at its init under per_term: logging it would mislead
        assert all(row[f"temp_{t}"] > 0 for t in ("seq_struct", "seq_text", "struct_text", "intra_seq", "intra_text"))
