"""Sequence-encoder throughput with and without length-aware batching, on real protein lengths.

``benchmarks/padding.py`` counts padded positions; this script times what they cost. It writes
the chains of ``../shared/data/annotations/pdb_chains.tsv`` as sequence-only shards (as padding.py
does; without the shared data it falls back to the bundled demo corpus and says so), builds the
epoch plan of one rank for ``data.length_grouping: none`` and for ``window`` (``data.length_window``
batches per sorted window), and collates the first ``--windows`` windows of batches of each plan
with the local loader: the batches training would see. Grouping only rearranges the rows inside a
window, so both settings' timed batches hold exactly the same proteins (checked), and the ratio of
their times is the ratio of their throughputs.

Each batch runs the sequence encoder's forward + backward (``SequenceEncoder.forward``, the pooled
output, and the backward of a fixed random functional of it) with the recipes' ESM-2 widths
(``--seq-preset``, default the align_pro_35M recipe's ``esm2_t12_35M``: 480 wide, 20 heads) but
``--layers`` layers, fused attention (``model.sequence.attention: fused``), random weights, fp32,
training mode. The two settings are interleaved batch by batch (A/B/A/B..., the order swapped every
other batch), ``--repeats`` times over the same batches, so load from other jobs on a shared machine
hits both alike. Reported: padding of each setting (timed batches and whole epoch), seconds per
repeat (median [min, max]), throughput in real (non-pad) tokens per second, and the per-repeat
ratio window / none of the throughput (median [min, max]). Wall time and process CPU time are both
recorded.

The structure encoder needs no such measurement: GVP-GNN batches concatenate the residue graphs
(``collate_graphs``), so there is no padding and grouping changes none of its work. The text
encoder pads to the longest text of a batch; grouping sorts by sequence length, not text length,
and the shards here carry no text, so it is not measured.

    python benchmarks/length_grouping_speed.py --work /tmp/lg --window 16 --batch 32 --repeats 3
    python benchmarks/length_grouping_speed.py --work /tmp/lg --quick   # seconds: demo data, tiny sizes
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import padding  # noqa: E402

from pretrain.data.batching import SEQ_PAD_INDEX, padding_fraction  # noqa: E402
from pretrain.data.stream import Cursor, local_stream  # noqa: E402

QUICK = {"batch": 4, "window": 2, "windows": 1, "max_length": 1022, "layers": 1, "repeats": 1, "demo_samples": 48}
QUICK_MODEL = {"embed_dim": 64, "attention_heads": 4}  # --quick only: a tiny ESM-2 (real sizes are too slow)


def shard_set(work: Path, table: Path, demo_samples: int, force_demo: bool) -> tuple[Path, str]:
    """(train shard directory, a line naming the data): the table's chains, else the demo corpus."""
    if not force_demo and table.is_file():
        seqs = padding.read_sequences(table)
        padding.write_shards(seqs, work / "train")
        return work / "train", f"{len(seqs)} chains of {table}"
    from data_shards.demo_corpus import build_demo_corpus

    demo = work / "demo"
    if not (demo / "train" / "manifest.json").is_file():
        build_demo_corpus(demo, num_train=demo_samples, num_heldout=8, samples_per_shard=max(8, demo_samples // 4))
    why = "--quick" if force_demo else f"{table} is absent"
    return demo / "train", f"the bundled demo corpus ({demo_samples} train samples; {why}), NOT real chains"


def plan_batches(shards: Path, cache: Path, args: argparse.Namespace, setting: list[str]) -> dict:
    """The first ``windows * window`` collated batches of epoch 0 under ``setting``, and the epoch's padding.

    Returns:
        {"tokens": [(B, Ls) int64], "ids": [sorted sample ids of the timed batches], "padding": timed
        batches' pad share, "epoch_padding": mean pad share of every batch of the epoch, "batches": per epoch}
    """
    cfg, plan = padding.one_rank_plan(shards, cache, args.batch, args.max_length, setting)
    n_epoch = plan.batches_per_epoch(0)
    n = args.windows * args.window
    if n > n_epoch:
        raise SystemExit(f"--windows {args.windows} x --window {args.window} = {n} batches > {n_epoch} in the epoch")
    tokens, ids, fractions = [], [], []
    for i, (b, _, _) in enumerate(itertools.islice(local_stream(cfg, plan, Cursor(), {}), n_epoch)):
        fractions.append(padding_fraction(b))
        if i < n:
            tokens.append(b["seq_tokens"].clone())  # (B, Ls)
            ids.extend(b["ids"])
    pad = sum(int((t == SEQ_PAD_INDEX).sum()) for t in tokens) / sum(t.numel() for t in tokens)
    return {
        "tokens": tokens,
        "ids": sorted(ids),
        "padding": pad,
        "epoch_padding": float(np.mean(fractions)),
        "batches": n_epoch,
    }


def build_encoder(args: argparse.Namespace):
    """The sequence encoder (fused attention, training mode) and the weights of the functional it backpropagates."""
    from pretrain.models.sequence_encoder import SequenceEncoder, SequenceEncoderConfig

    torch.manual_seed(0)
    extra = QUICK_MODEL if args.quick else {}
    enc = SequenceEncoder(
        SequenceEncoderConfig(preset=args.seq_preset, num_layers=args.layers, max_length=args.max_length, **extra)
    )
    enc.set_attention("fused")
    enc.train()
    weights = torch.randn(args.batch, enc.output_dim, generator=torch.Generator().manual_seed(1))  # (B, D)
    return enc, weights


def measure(batches: dict[str, list[torch.Tensor]], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Seconds (wall, process CPU) of each setting's batches, per repeat, interleaved batch by batch."""
    enc, weights = build_encoder(args)

    def step(tokens: torch.Tensor) -> None:
        enc.zero_grad(set_to_none=True)
        (enc(tokens) * weights[: tokens.shape[0]]).sum().backward()

    names = list(batches)
    for name in names:  # warm-up: one batch of each setting
        step(batches[name][0])
    out = {name: [] for name in names}
    for _ in range(args.repeats):
        wall = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for i in range(len(batches[names[0]])):
            for name in names if i % 2 == 0 else names[::-1]:
                w0, c0 = time.perf_counter(), time.process_time()
                step(batches[name][i])
                wall[name] += time.perf_counter() - w0
                cpu[name] += time.process_time() - c0
        for name in names:
            out[name].append({"wall_s": wall[name], "cpu_s": cpu[name]})
        print(
            f"repeat {len(out[names[0]])}: "
            + ", ".join(f"{n} wall {wall[n]:.2f} s, CPU {cpu[n]:.2f} s" for n in names),
            flush=True,
        )
    return out


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def summarize(plans: dict[str, dict], times: dict[str, list[dict]]) -> dict:
    """Per setting: padding, positions, real tokens, seconds and tokens/s per repeat; ratios window/none."""
    rows = {}
    for name, p in plans.items():
        positions = sum(t.numel() for t in p["tokens"])
        real = sum(int((t != SEQ_PAD_INDEX).sum()) for t in p["tokens"])
        rows[name] = {
            "batches_timed": len(p["tokens"]),
            "batches_per_epoch": p["batches"],
            "padding": p["padding"],
            "epoch_padding": p["epoch_padding"],
            "positions": positions,
            "real_tokens": real,
            "wall_s": [r["wall_s"] for r in times[name]],
            "cpu_s": [r["cpu_s"] for r in times[name]],
            "tokens_per_s": [real / r["wall_s"] for r in times[name]],
            "tokens_per_cpu_s": [real / r["cpu_s"] for r in times[name]],
        }
    none, window = rows["none"], rows["window"]
    ratios = {
        "wall": [n / w for n, w in zip(none["wall_s"], window["wall_s"])],  # same real tokens: time ratio
        "cpu": [n / w for n, w in zip(none["cpu_s"], window["cpu_s"])],
    }
    return {"rows": rows, "speedup": ratios}


def section(result: dict, args: argparse.Namespace, data: str, machine: str, command: str) -> str:
    """The BENCHMARKS.md section."""
    model = "tiny ESM-2 (64 wide, 4 heads; --quick)" if args.quick else f"ESM-2 `{args.seq_preset}` widths"
    intro = [
        f"Device: **{machine}**; torch {torch.__version__}, {torch.get_num_threads()} threads; command: `{command}`.",
        f"Data: {data}. Batch {args.batch}, crop {args.max_length}, one rank; `data.length_grouping: window` "
        f"with `data.length_window: {args.window}`. Timed: the first {args.windows * args.window} batches of "
        "epoch 0 of each plan (the same proteins in both settings). Encoder: "
        f"{model} with {args.layers} layer(s), fused attention, fp32, random weights, forward + backward "
        f"of the pooled output; settings interleaved batch by batch, {args.repeats} repeats after a warm-up. "
        "Tokens/s counts real (non-pad) positions, BOS and EOS included. Median [min, max] over repeats.",
    ]
    table = [
        "| data.length_grouping | padding (timed batches) | padding (whole epoch) | positions | real tokens "
        "| wall s | CPU s | real tokens/s (wall) | real tokens per CPU s |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for name, r in result["rows"].items():
        table.append(
            f"| {name} | {100 * r['padding']:.1f} % | {100 * r['epoch_padding']:.1f} % | {r['positions']:,} "
            f"| {r['real_tokens']:,} | {_spread(r['wall_s'])} | {_spread(r['cpu_s'])} "
            f"| {_spread(r['tokens_per_s'], '{:,.0f}')} | {_spread(r['tokens_per_cpu_s'], '{:,.0f}')} |"
        )
    s = result["speedup"]
    tail = [
        "",
        f"Throughput window / none, per repeat: wall {_spread(s['wall'])}×, process CPU time {_spread(s['cpu'])}× "
        f"(the range is over {args.repeats} repeats, not a confidence interval).",
    ]
    return _common.markdown_section("Sequence-encoder tokens/s with length-aware batching", intro, table, tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, default=padding.DEFAULT_TABLE, help="TSV with a 'sequence' column")
    p.add_argument("--work", type=Path, required=True, help="folder for the shards and the lengths cache")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--window", type=int, default=16, help="data.length_window (batches per sorted window)")
    p.add_argument("--windows", type=int, default=1, help="windows of batches timed per setting")
    p.add_argument("--max-length", type=int, default=1022, help="model.sequence.max_length (crop)")
    p.add_argument("--seq-preset", default="esm2_t12_35M")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="seconds: demo corpus, tiny model, batch 4, window 2")
    p.add_argument("--machine", default=None, help="machine description for the table")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    demo_samples = 256
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        demo_samples = args.demo_samples
    if min(args.batch, args.window, args.windows, args.layers, args.repeats, args.max_length) < 1:
        p.error("--batch, --window, --windows, --layers, --repeats and --max-length must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    shards, data = shard_set(args.work, args.table, demo_samples, force_demo=args.quick)
    print(f"# data: {data}", flush=True)
    settings = {
        "none": ["data.length_grouping=none"],
        "window": ["data.length_grouping=window", f"data.length_window={args.window}"],
    }
    plans = {name: plan_batches(shards, args.work / "cache", args, s) for name, s in settings.items()}
    if plans["none"]["ids"] != plans["window"]["ids"]:
        raise SystemExit("the timed batches of the two settings hold different proteins: compare whole windows")
    result = summarize(plans, measure({name: p["tokens"] for name, p in plans.items()}, args))
    machine = _common.machine_name(torch.device("cpu"), args.machine)
    command = _common.command_line("benchmarks/length_grouping_speed.py", argv)
    text = section(result, args, data, machine, command)
    settings_used = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"machine": machine, "torch": torch.__version__, "data": data, "args": settings_used, **result}
    _common.publish(text, args.out, args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
