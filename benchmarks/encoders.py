"""Forward + backward of each encoder at real layer sizes: time and activation memory per sequence length.

Encoders (random weights, training mode, fp32 on CPU; ``--dtype bf16`` autocast on CUDA):

- ``sequence-reference`` / ``sequence-fused``: ESM-2 (``--seq-preset``, default the 650M recipe's
  ``esm2_t33_650M``: width 1280, 20 heads) with ``--layers`` layers, fair-esm's attention or the fused
  SDPA path (``model.sequence.attention``, ``pretrain/models/esm_attention.py``), same weights;
  tokens = BOS + L residues + EOS; pooled output as in training (``SequenceEncoder.forward``).
- ``text``: BERT (``--text-preset``, default PubMedBERT-base: 768 wide, 12 heads, 3072 feed-forward)
  with ``--layers`` layers through transformers' SDPA attention; L tokens, all attended. BERT holds
  512 positions, so longer L is reported as not applicable.
- ``structure``: the recipes' GVP-GNN ((100, 16) nodes, (32, 1) edges, 3 layers: already real size)
  on a k = 16 nearest-neighbour graph of an ideal helix of L residues (``backbone_graph``, the
  training featuriser; the FLOPs depend on L and k, not on the fold).

Each point: ``--batch`` proteins of length L; the backward of a fixed random functional of the
pooled output. Time: wall seconds of forward + backward after one warm-up, median, min and max over
``--repeats``, and the process CPU time of the same calls (steadier on a shared machine; with
several threads it adds them up). Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over one forward +
backward above what was allocated before it; on CPU (no allocator statistics) the bytes autograd
saves for the backward in one forward (saved-tensor hooks, distinct storages, parameters excluded:
``benchmarks/_common.py``), the part of the peak that grows with L.

    python benchmarks/encoders.py --lengths 128 512 1022 --layers 2 --repeats 5 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

ENCODERS = ("sequence-reference", "sequence-fused", "text", "structure")
BERT_POSITIONS = 512


def helix_backbone(length: int) -> torch.Tensor:
    """N, CA, C, O coordinates (L, 4, 3) of an ideal α-helix (100° and 1.5 Å per residue, CA radius 2.3 Å).

    N and C sit a third of the way to the neighbouring CA atoms (peptide bonds ≈ 1.3 Å), O 1.23 Å off C.
    """
    i = torch.arange(length + 2, dtype=torch.float64) - 1  # one extra CA at each end for N and C
    angle = i * math.radians(100.0)
    ca = torch.stack([2.3 * torch.cos(angle), 2.3 * torch.sin(angle), 1.5 * i], dim=-1)  # (L + 2, 3)
    mid = ca[1:-1]
    n = mid + (ca[:-2] - mid) / 3
    c = mid + (ca[2:] - mid) / 3
    axis = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(c)
    o = c + 1.23 * torch.nn.functional.normalize(torch.cross(c - mid, axis, dim=-1), dim=-1)
    return torch.stack([n, mid, c, o], dim=1).float()  # (L, 4, 3)


def _build(name: str, args: argparse.Namespace, length: int, device: torch.device):
    """(module, inputs, layers) of one encoder at one length, or None when the length does not apply."""
    torch.manual_seed(0)
    b = args.batch
    gen = torch.Generator().manual_seed(0)
    if name.startswith("sequence"):
        from pretrain.models.sequence_encoder import SequenceEncoder, SequenceEncoderConfig

        cfg = SequenceEncoderConfig(preset=args.seq_preset, num_layers=args.layers, max_length=length)
        enc = SequenceEncoder(cfg)
        enc.set_attention(name.split("-", 1)[1])
        tokens = torch.randint(4, 24, (b, length + 2), generator=gen)  # amino acids between BOS and EOS
        tokens[:, 0], tokens[:, -1] = enc.alphabet.cls_idx, enc.alphabet.eos_idx
        return enc, (tokens,), enc.esm.num_layers
    if name == "text":
        if length > BERT_POSITIONS:
            return None
        from pretrain.models.text_encoder import TextEncoder, TextEncoderConfig

        enc = TextEncoder(TextEncoderConfig(preset=args.text_preset, num_layers=args.layers, max_length=length))
        ids = torch.randint(5, enc.bert.config.vocab_size, (b, length), generator=gen)
        return enc, (ids, torch.ones_like(ids)), enc.bert.config.num_hidden_layers
    from pretrain.data.featurize import backbone_graph, collate_graphs
    from pretrain.models.structure_encoder import StructureEncoder, StructureEncoderConfig

    cfg = StructureEncoderConfig()
    coords = helix_backbone(length)
    graph = backbone_graph(coords, torch.ones(length, 4, dtype=torch.bool), k_neighbors=cfg.k_neighbors)
    enc = StructureEncoder(cfg)
    return enc, (collate_graphs([graph] * b),), cfg.num_layers


def measure(name: str, args: argparse.Namespace, length: int, device: torch.device) -> dict | None:
    """Time and memory of one encoder's forward + backward at one length (module docstring)."""
    from pretrain.data.collate import batch_to_device

    built = _build(name, args, length, device)
    if built is None:
        return None
    enc, inputs, layers = built
    enc = enc.to(device).train()
    inputs = batch_to_device(inputs, device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and args.dtype == "bf16" else None
    probe = enc(*inputs)
    weights = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1)).to(device)
    del probe

    def run() -> torch.Tensor:
        with autocast or contextlib.nullcontext():
            return enc(*inputs)

    def step() -> None:
        enc.zero_grad(set_to_none=True)
        (run().float() * weights).sum().backward()
        if cuda:
            torch.cuda.synchronize()

    cpu_times: list[float] = []

    def timed_step() -> None:  # process CPU time too: steadier than wall time on a shared machine
        start = time.process_time()
        step()
        cpu_times.append(time.process_time() - start)

    timing = _common.time_runs(timed_step, args.repeats)
    cpu = cpu_times[1:]  # the first call is time_runs' warm-up
    if cuda:
        enc.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        memory, kind = torch.cuda.max_memory_allocated() - base, "peak"
    else:
        memory, kind = _common.saved_activation_bytes(run, _common.parameter_storages(enc)), "saved"
    enc.zero_grad(set_to_none=True)
    return {
        "encoder": name,
        "length": length,
        "batch": args.batch,
        "layers": layers,
        **timing,
        "cpu_median_s": statistics.median(cpu),
        "cpu_min_s": min(cpu),
        "cpu_max_s": max(cpu),
        "memory_bytes": memory,
        "memory_kind": kind,
    }


def section(rows: list[dict], machine: str, command: str, args: argparse.Namespace) -> str:
    """The BENCHMARKS.md section: one row per encoder and length."""
    kind = rows[0]["memory_kind"] if rows else "saved"
    mem = "peak MiB above the weights" if kind == "peak" else "saved for backward MiB"
    intro = [
        f"Device: **{machine}**; torch {torch.__version__}, {torch.get_num_threads()} threads; command: `{command}`.",
        f"Batch {args.batch}; ESM-2 `{args.seq_preset}` and BERT `{args.text_preset}` widths with {args.layers} "
        "layers, GVP-GNN at the recipes' size; random weights, training mode. Time: median of "
        f"{args.repeats} repeats after a warm-up (min–max in brackets); CPU seconds: the process's CPU time "
        f"of the same calls (all threads). Memory: {mem}.",
    ]
    table = [
        f"| encoder | L | layers | seconds | CPU seconds | {mem} | vs sequence-reference (time, memory) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    ref = {r["length"]: r for r in rows if r["encoder"] == "sequence-reference"}
    for r in rows:
        base = ref.get(r["length"])
        vs = ""
        if r["encoder"] == "sequence-fused" and base:
            vs = f"{r['median_s'] / base['median_s']:.2f}×, {r['memory_bytes'] / max(base['memory_bytes'], 1):.2f}×"
        table.append(
            f"| {r['encoder']} | {r['length']} | {r['layers']} "
            f"| {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) "
            f"| {r['cpu_median_s']:.3f} ({r['cpu_min_s']:.3f}–{r['cpu_max_s']:.3f}) "
            f"| {r['memory_bytes'] / 2**20:.1f} | {vs} |"
        )
    return _common.markdown_section("Encoders: forward + backward per length", intro, table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1022], help="residues (text: tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=2, help="transformer layers of ESM-2 and BERT (fewer: faster)")
    p.add_argument("--seq-preset", default="esm2_t33_650M")
    p.add_argument("--text-preset", default="pubmedbert-base")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--machine", default=None, help="machine description for the table")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file (e.g. BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or args.layers < 1 or min(args.lengths) < 1:
        p.error("--repeats, --batch, --layers and every length must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows: list[dict] = []
    for length in args.lengths:
        for name in args.encoders:
            row = measure(name, args, length, device)
            if row is None:
                print(f"{name} L={length}: n/a (BERT holds {BERT_POSITIONS} positions)", flush=True)
                continue
            rows.append(row)
            print(
                f"{name} L={length}: {row['median_s']:.3f} s ({row['min_s']:.3f}-{row['max_s']:.3f}), "
                f"CPU {row['cpu_median_s']:.3f} s ({row['cpu_min_s']:.3f}-{row['cpu_max_s']:.3f}), "
                f"{row['memory_bytes'] / 2**20:.1f} MiB {row['memory_kind']}",
                flush=True,
            )
    machine = _common.machine_name(device, args.machine)
    command = _common.command_line("benchmarks/encoders.py", argv)
    text = section(rows, machine, command, args)
    _common.publish(text, args.out, args.json, {"machine": machine, "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
