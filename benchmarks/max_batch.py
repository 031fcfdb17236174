"""Largest per-rank batch that trains one step under a memory budget, with each large-batch technique.

Techniques (rows of the table), all on the recipe's model with a plain AdamW step on one process:
  one-pass (eager loss)        plain step; the loss materialises the b x b logits (``infonce_eager``)
  one-pass                    plain step; the recipe's loss backend (CPU: chunked torch; GPU: Triton)
  one-pass + checkpointing    plain step; every encoder's layers checkpointed
  two-pass                    GradCache step (``pretrain/engine/two_pass.py``), ``--chunk`` rows per chunk
  two-pass + checkpointing    both

Memory is what the step allocates on top of what exists before it (model, batch): CUDA
``max_memory_allocated``, CPU the peak bytes of live tensor storages created during the step
(``benchmarks/infonce.py``'s dispatch-mode counter), so other processes and allocator caching do
not blur it. It includes the optimizer state AdamW creates at its first step. A batch "fits" when
that peak is within ``--budget-mib``. The search doubles the batch from ``--start`` until it
stops fitting or reaches ``--max-batch``, then bisects ``--refine`` times. The step time is then
measured at the largest fitting batch in a separate step without the memory counter (it slows ops).

Inputs: proteins of exactly ``--length`` residues (demo proteins laid end to end, each piece moved
50 A away from the last so pieces are not neighbours; sequence and structure cropped together) and
the demo texts. ``--distinct`` proteins are featurised and tiled to the batch size (featurising
thousands of long proteins would dominate the run; tiled rows cost the step the same).

  python benchmarks/max_batch.py                                   # CPU: demo recipe, see --help
  python benchmarks/max_batch.py --device cuda --budget-mib 60000 --length 1022
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.infonce import _PeakMemory, device_name  # noqa: E402  (shared measuring helpers)

ALL_ENCODERS = "train.activation_checkpointing=[sequence, structure, text]"
TECHNIQUES = {
    "one-pass (eager loss)": {"eager_loss": True, "two_pass": False, "overrides": []},
    "one-pass": {"eager_loss": False, "two_pass": False, "overrides": []},
    "one-pass + checkpointing": {"eager_loss": False, "two_pass": False, "overrides": [ALL_ENCODERS]},
    "two-pass": {"eager_loss": False, "two_pass": True, "overrides": []},
    "two-pass + checkpointing": {"eager_loss": False, "two_pass": True, "overrides": [ALL_ENCODERS]},
}


# --------------------------------------------------------------------------- inputs


def _long_records(records: list, length: int, count: int) -> list:
    """``count`` proteins of at least ``length`` residues, each demo proteins laid end to end."""
    records = [r for r in records if r.sequence and r.backbone is not None and r.text]  # every modality
    out, i = [], 0
    for n in range(count):
        seq, coords, masks, total, first = [], [], [], 0, records[i % len(records)]
        while total < length:
            rec = records[i % len(records)]
            i += 1
            shift = np.array([50.0 * len(coords), 0.0, 0.0], dtype=np.float32)
            seq.append(rec.sequence)
            coords.append(rec.backbone.coords + shift)
            masks.append(rec.backbone.atom_mask)
            total += len(rec.sequence)
        backbone = dataclasses.replace(
            first.backbone, coords=np.concatenate(coords)[:length], atom_mask=np.concatenate(masks)[:length], plddt=None
        )
        out.append(dataclasses.replace(first, id=f"long{n}", sequence="".join(seq)[:length], backbone=backbone))
    return out


def _tile(batch: dict, rows: int) -> dict:
    """The collated ``batch`` repeated row-wise to ``rows`` rows (graphs re-collated)."""
    from pretrain.data.featurize import collate_graphs
    from pretrain.engine.two_pass import slice_graph

    k = batch["seq_tokens"].shape[0]
    idx = [i % k for i in range(rows)]

    def part(src: dict) -> dict:
        out = {key: src[key][idx] for key in ("seq_tokens", "text_ids", "text_attn") if key in src}
        if "graph" in src:
            graphs = [slice_graph(src["graph"], i, i + 1) for i in range(k)]
            out["graph"] = collate_graphs([graphs[i] for i in idx])
        return out

    tiled = part(batch)
    tiled["present"] = {m: v[idx] for m, v in batch["present"].items()}
    tiled["views"] = part(batch.get("views") or {})
    return tiled


# --------------------------------------------------------------------------- one step


def _eager_infonce(q, k, logit_scale, targets=None, *, key_valid=None, backend="auto"):
    from kernels.infonce_reference import infonce_eager

    return infonce_eager(q, k, logit_scale, targets, key_valid=key_valid)


def _use_eager_loss(enabled: bool) -> None:
    """Route ``kernels.functional.infonce`` (single-process loss path) to the materialising reference."""
    import kernels.functional as kf

    if not hasattr(kf, "_bench_original_infonce"):
        kf._bench_original_infonce = kf.infonce
    kf.infonce = _eager_infonce if enabled else kf._bench_original_infonce


def _train_step(cfg, batch: dict, device: torch.device, two_pass: bool, chunk: int, measure: bool) -> dict:
    """Build a fresh model and AdamW, run one step on ``batch``; peak MiB (when ``measure``) and seconds."""
    from pretrain.data.collate import batch_to_device
    from pretrain.engine.builder import build_model
    from pretrain.engine.precision import embeddings_to_fp32, forward_autocast, resolve_precision
    from pretrain.engine.two_pass import two_pass_step
    from pretrain.losses.registry import build_objective

    torch.manual_seed(0)
    objective = build_objective(cfg.loss)
    model = build_model(cfg, objective=objective).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = resolve_precision(cfg.train.precision, device)
    batch = batch_to_device(batch, device)
    peak = _PeakMemory(device) if measure else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with peak if peak is not None else _Nothing():
        if two_pass:
            terms, _ = two_pass_step(model, batch, objective, chunk, autocast_dtype=dtype)
        else:
            with forward_autocast(dtype, device):
                emb = model(batch)
            emb = embeddings_to_fp32(emb)
            terms = objective(emb, batch)
            terms["loss"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    loss = float(terms["loss"].detach())
    del model, opt, terms, batch
    gc.collect()
    return {"peak_mib": peak.peak / 2**20 if peak is not None else None, "seconds": seconds, "loss": loss}


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(err).lower()


# --------------------------------------------------------------------------- search


def search(args, technique: str, base_batch: dict, device: torch.device) -> dict:
    """Largest fitting batch of one technique: doubling, then ``args.refine`` bisection steps."""
    from pretrain.config import load_config

    spec = TECHNIQUES[technique]
    overrides = [*args.set, *spec["overrides"]]
    cfg = load_config(args.recipe, overrides)
    _use_eager_loss(spec["eager_loss"])
    trials: dict[int, dict] = {}

    def fits(rows: int) -> bool:
        try:
            res = _train_step(cfg, _tile(base_batch, rows), device, spec["two_pass"], args.chunk, measure=True)
        except Exception as err:  # only an out-of-memory error counts as "does not fit"
            if not _is_oom(err):
                raise
            res = {"peak_mib": float("inf"), "seconds": None, "loss": None}
        trials[rows] = res
        ok = res["peak_mib"] <= args.budget_mib
        print(f"  {technique:<26} batch {rows:>6}: peak {res['peak_mib']:9.1f} MiB  {'fits' if ok else 'over'}")
        return ok

    lo, hi = 0, None
    rows = args.start
    while rows <= args.max_batch:
        if not fits(rows):
            hi = rows
            break
        lo = rows
        rows *= 2
    if hi is not None and lo > 0:
        for _ in range(args.refine):
            mid = (lo + hi) // 2
            if mid in (lo, hi):
                break
            if fits(mid):
                lo = mid
            else:
                hi = mid
    result = {"technique": technique, "max_batch": lo, "capped": hi is None, "trials": trials}
    if lo > 0:
        timed = _train_step(cfg, _tile(base_batch, lo), device, spec["two_pass"], args.chunk, measure=False)
        result.update(peak_mib=trials[lo]["peak_mib"], seconds=timed["seconds"])
    _use_eager_loss(False)
    return result


# --------------------------------------------------------------------------- report


def markdown(args, results: list[dict], device: torch.device, machine: str, precision: str) -> str:
    """The BENCHMARKS.md section: settings, one row per technique, growth relative to one-pass."""
    base = next((r for r in results if r["technique"] == "one-pass" and r["max_batch"]), None)
    today = datetime.date.today().isoformat()
    recipe = Path(args.recipe).name if args.recipe else "demo.yaml"
    cmd = "python benchmarks/max_batch.py " + " ".join(sys.argv[1:])
    lines = [
        f"## Largest per-rank batch under a memory budget ({today})",
        "",
        f"Device: **{machine}** ({device_name(device)}); torch {torch.__version__}; command: `{cmd}`.",
        f"Recipe `{recipe}` with {', '.join(args.set) or 'no overrides'}; "
        f"proteins of {args.length} residues, {args.distinct} distinct ones tiled; memory budget "
        f"**{args.budget_mib:.0f} MiB** of step memory (allocated on top of model and batch, optimizer state "
        f"included); two-pass chunk {args.chunk} rows; one process, plain AdamW step; forward {precision}, loss fp32.",
        "",
        "| technique | max per-rank batch | vs one-pass | step peak MiB at that batch | step s | samples/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        b = r["max_batch"]
        shown = f"≥ {b} (search cap)" if r["capped"] else str(b)
        ratio = f"{b / base['max_batch']:.1f}×" if base and b else "n/a"
        if b:
            lines.append(
                f"| {r['technique']} | {shown} | {ratio} | {r['peak_mib']:.0f} | {r['seconds']:.2f} "
                f"| {b / r['seconds']:.1f} |"
            )
        else:
            lines.append(f"| {r['technique']} | none fits (batch {args.start} over budget) | n/a | | | |")
    lines += ["", "Measured trials (batch: step peak MiB):", ""]
    for r in results:
        trials = ", ".join(f"{b}: {t['peak_mib']:.0f}" for b, t in sorted(r["trials"].items()))
        lines.append(f"- {r['technique']}: {trials}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="recipe YAML (default: the demo recipe)")
    p.add_argument("--set", action="append", default=[], help="recipe override section.key=value (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--budget-mib", type=float, default=1024.0, help="step memory budget in MiB")
    p.add_argument("--length", type=int, default=400, help="residues per protein (sets model.sequence.max_length)")
    p.add_argument("--distinct", type=int, default=8, help="distinct proteins featurised, then tiled")
    p.add_argument("--chunk", type=int, default=8, help="rows per chunk of the two-pass step")
    p.add_argument("--start", type=int, default=2, help="first batch size tried")
    p.add_argument("--max-batch", type=int, default=1024, help="search cap")
    p.add_argument("--refine", type=int, default=3, help="bisection steps after the doubling")
    p.add_argument("--techniques", default=",".join(TECHNIQUES), help="comma-separated subset of the rows")
    p.add_argument("--machine", default=None, help="machine description for the table (default: device name)")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file (e.g. BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.set = [*args.set, f"model.sequence.max_length={args.length}"]
    unknown = sorted(set(args.techniques.split(",")) - set(TECHNIQUES))
    if unknown:
        p.error(f"unknown techniques {unknown}; known: {list(TECHNIQUES)}")

    from data_shards.demo_corpus import build_demo_corpus
    from data_shards.reader import iter_records
    from pretrain.config import load_config
    from pretrain.data.collate import BatchBuilder
    from pretrain.engine.precision import resolve_precision
    from pretrain.losses.registry import build_objective

    with tempfile.TemporaryDirectory() as tmp:  # a small demo corpus, a few seconds to build
        build_demo_corpus(Path(tmp), num_train=96, num_heldout=48, samples_per_shard=48, seed=0)
        demo = list(iter_records(sorted((Path(tmp) / "train").glob("*.tar"))[0]))
    cfg = load_config(args.recipe, args.set)
    records = _long_records(demo, args.length, args.distinct)
    builder = BatchBuilder(cfg, views=build_objective(cfg.loss).needs_views())
    base_batch = builder.build(records, np.random.default_rng(0), train=True)

    results = []
    for technique in args.techniques.split(","):
        print(f"{technique}:", flush=True)
        results.append(search(args, technique, base_batch, device))
    dtype = resolve_precision(cfg.train.precision, device)
    precision = "fp32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
    section = markdown(args, results, device, args.machine or device_name(device), precision)
    print(section)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
