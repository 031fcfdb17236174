"""ESM-2 forward + backward with fair-esm's attention vs the fused (SDPA) path: time and saved activations.

Each configuration builds one randomly initialised ESM-2 (a preset, optionally with fewer layers)
in training mode and runs ``mlm_forward`` on random amino-acid tokens (BOS + L residues + EOS) and
the backward of a fixed random functional of the logits, first on ``model.sequence.attention:
reference`` then on ``fused`` (same weights, ``SequenceEncoder.set_attention``).

- **time**: wall-clock seconds of forward + backward, after one warm-up; median, min and max over
  ``--repeats`` runs.
- **activation memory**: bytes of the tensors autograd saves for the backward during one forward
  (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, parameters excluded.
  Nothing is freed before the backward starts, so this is the peak of what the pass holds for it;
  it works on CPU, where no allocator statistics exist.

    python benchmarks/esm_attention.py --lengths 128 512 1022 --batch 2 --repeats 5 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from pretrain.models.sequence_encoder import SequenceEncoder, SequenceEncoderConfig  # noqa: E402

MODES = ("reference", "fused")


def _tokens(enc: SequenceEncoder, batch: int, length: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(4, 24, (batch, length + 2), generator=gen)  # amino-acid tokens
    toks[:, 0], toks[:, -1] = enc.alphabet.cls_idx, enc.alphabet.eos_idx
    return toks.to(device)


def measure(preset: str, layers: int | None, batch: int, length: int, repeats: int, device: torch.device) -> dict:
    """Time and saved bytes of both attention modes for one shape (same weights for both)."""
    torch.manual_seed(0)
    cfg = SequenceEncoderConfig(preset=preset, num_layers=layers, max_length=length)
    enc = SequenceEncoder(cfg).to(device).train()
    tokens = _tokens(enc, batch, length, device)
    grad = torch.randn(batch, length + 2, len(enc.alphabet), generator=torch.Generator().manual_seed(1)).to(device)
    params = _common.parameter_storages(enc)
    row = {"preset": preset, "layers": enc.esm.num_layers, "batch": batch, "length": length, "tokens": length + 2}

    def step():
        enc.zero_grad(set_to_none=True)
        logits = enc.mlm_forward(tokens)[1]
        (logits * grad).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for mode in MODES:
        enc.set_attention(mode)
        row[mode] = {
            **_common.time_runs(step, repeats),
            "saved_bytes": _common.saved_activation_bytes(lambda: enc.mlm_forward(tokens)[1], params),
        }
    enc.zero_grad(set_to_none=True)
    return row


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _secs(m: dict) -> str:
    return f"{m['median_s']:.3f} ({m['min_s']:.3f}–{m['max_s']:.3f})"


def section(rows: list[dict], machine: str, command: str, repeats: int, threads: int) -> str:
    """The BENCHMARKS.md section for ``rows``."""
    r0 = rows[0]
    intro = [
        f"Device: **{machine}**; torch {torch.__version__}, {threads} threads; command: `{command}`.",
        f"`{r0['preset']}` architecture with {r0['layers']} layers, random weights, fp32, training mode; "
        "tokens = BOS + L residues + EOS. Time: forward + backward of `mlm_forward` (median over "
        f"{repeats} repeats after one warm-up, min–max in brackets). Saved: bytes autograd keeps for the "
        "backward after one forward (saved-tensor hooks, distinct storages, parameters excluded).",
    ]
    table = [
        "| L | batch | reference s | fused s | time fused/ref | reference saved MiB | fused saved MiB "
        "| memory fused/ref |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ref, fused = r["reference"], r["fused"]
        table.append(
            f"| {r['length']} | {r['batch']} | {_secs(ref)} | {_secs(fused)} "
            f"| {fused['median_s'] / ref['median_s']:.2f}× | {_mib(ref['saved_bytes'])} "
            f"| {_mib(fused['saved_bytes'])} | {fused['saved_bytes'] / ref['saved_bytes']:.2f}× |"
        )
    return _common.markdown_section("ESM-2 attention: fair-esm reference vs fused SDPA", intro, table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="esm2_t6_8M", help="ESM-2 preset (pretrain/models/sequence_encoder.py)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layers (fewer: faster)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1022], help="residues per sequence")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per mode (>= 5 for the table)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--machine", default=None, help="machine description for the table")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file (e.g. BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for length in args.lengths:
        row = measure(args.preset, args.layers, args.batch, length, args.repeats, device)
        rows.append(row)
        ref, fused = row["reference"], row["fused"]
        print(
            f"L={length} b={args.batch}: reference {_secs(ref)} s {_mib(ref['saved_bytes'])} MiB | "
            f"fused {_secs(fused)} s {_mib(fused['saved_bytes'])} MiB",
            flush=True,
        )
    machine = _common.machine_name(device, args.machine)
    command = _common.command_line("benchmarks/esm_attention.py", argv)
    text = section(rows, machine, command, args.repeats, torch.get_num_threads())
    _common.publish(text, args.out, args.json, {"machine": machine, "torch": torch.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
