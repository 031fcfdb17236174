"""Time the fused tri-modal loss step against the present per-term calls (forward + backward).

Both paths compute align_pro's six InfoNCE terms (three cross-modal pairs, three intra-modal view pairs; the
three that contrast texts with false negatives deduplicated), each with its own logit scale, with presence
masks (about 10% of each modality missing) and group ids with duplicates:

  fused     kernels.trimodal.rank_trimodal_infonce: every term from one plan; torch: the group GEMMs of
            kernels.trimodal_blocks, triton: one forward launch for every direction
            (kernels.trimodal_triton)
  per-term  what the six per-term calls compute after their gathers: kernels.rank_symmetric_infonce
            (plain terms) and kernels.grouped_symmetric_infonce's body (representatives, two
            kernels.infonce calls, the rank rescale) per term

--world W simulates one rank of W (as benchmarks/infonce.py does): the rank's b_local rows as queries
against keys of W·b_local rows per key, on one device. No collective runs, so the communication the
fused step saves (one gather of all keys instead of two per term, one backward all-reduce instead of
two per term, one mask gather instead of one or two per term) is NOT in these times: they compare compute.

Each point reports the median, min and max over --repeats timed steps (after one warm-up step), and the
per-term time over the fused time. Points predicted to overrun --max-seconds are skipped.

  python benchmarks/trimodal_loss.py --device cpu --b-local 64,128 --world 4 --dim 128 --dtype fp32
  python benchmarks/trimodal_loss.py --b-local 1024,2048,4096 --world 8 --dim 512 --dtype bf16   # GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels import infonce, rank_symmetric_infonce  # noqa: E402
from kernels.grouped import representatives  # noqa: E402
from kernels.trimodal import ALIGN_PRO_TERMS, Term, rank_trimodal_infonce  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TERMS = ALIGN_PRO_TERMS
WEIGHTS = (1.0, 1.0, 1.0, 0.1, 0.1, 0.1)
KEYS = tuple(dict.fromkeys(k for t in TERMS for k in (t.a_key, t.b_key)))


def _inputs(n_all: int, d: int, dtype, device) -> dict:
    g = torch.Generator().manual_seed(0)
    emb = {
        k: torch.nn.functional.normalize(torch.randn(n_all, d, generator=g), dim=1).to(device, dtype).requires_grad_()
        for k in KEYS
    }
    present = {k: (torch.rand(n_all, generator=g) > 0.1).to(device) for k in ("sequence", "structure", "text")}
    groups = torch.randint(0, max(1, n_all * 9 // 10), (n_all,), generator=g).to(device)  # ~10% share an id
    scales = [torch.tensor([10.0 + i], device=device, requires_grad=True) for i in range(len(TERMS))]
    return {"emb": emb, "present": present, "groups": groups, "scales": scales}


def _valid(term: Term, present: dict) -> torch.Tensor:
    keys = term.presence_keys()
    valid = present[keys[0]]
    for k in keys[1:]:
        valid = valid & present[k]
    return valid


def fused(inputs, world, backend):
    return rank_trimodal_infonce(
        inputs["emb"], TERMS, inputs["scales"], world=world, rank=0, present_all=inputs["present"],
        groups_all=inputs["groups"], backend=backend,
    )  # fmt: skip


def per_term(inputs, world, backend):
    """Rank 0's share of each term, as the per-term functions compute it once their keys are gathered."""
    emb, groups = inputs["emb"], inputs["groups"]
    b = emb["sequence"].shape[0] // world
    out = {}
    for term, s in zip(TERMS, inputs["scales"]):
        a_all, b_all = emb[term.a_key], emb[term.b_key]
        valid_all = _valid(term, inputs["present"])
        if not term.grouped:
            out[term.name] = rank_symmetric_infonce(
                a_all[:b], b_all[:b], a_all, b_all, s, offset=0, world=world, key_valid=valid_all, backend=backend
            )
            continue
        rep = representatives(groups, valid_all)
        key_valid = valid_all & (rep == torch.arange(rep.shape[0], device=rep.device))
        targets = rep[:b]
        loss = 0.5 * (
            infonce(a_all[:b], b_all, s, targets, key_valid=key_valid, backend=backend)
            + infonce(b_all[:b], a_all, s, targets, key_valid=key_valid, backend=backend)
        )
        out[term.name] = loss * (world * valid_all[:b].sum().to(loss.dtype) / valid_all.sum().clamp(min=1))
    return out


PATHS = {"fused": fused, "per-term": per_term}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(path, inputs, world, backend):
    for t in [*inputs["emb"].values(), *inputs["scales"]]:
        t.grad = None
    losses = PATHS[path](inputs, world, backend)
    sum(w * losses[t.name] for w, t in zip(WEIGHTS, TERMS)).backward()


def measure(path, b_local, world, d, dtype, device, backend, repeats):
    """Seconds of each timed fwd+bwd step (after one warm-up step)."""
    inputs = _inputs(world * b_local, d, dtype, device)
    _step(path, inputs, world, backend)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        _step(path, inputs, world, backend)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def run(args) -> list[tuple]:
    device = torch.device(args.device)
    backends = [b for b in args.backends if b != "triton" or device.type == "cuda"]
    deadline = time.monotonic() + args.max_seconds
    rows, last = [], {}
    print(f"# device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; {' '.join(sys.argv[1:])}")
    print("| backend | path | dtype | b_local | world | d | median ms | min ms | max ms | per-term / fused |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for backend in backends:
        for b in args.b_local:
            medians = {}
            for path in ("per-term", "fused"):
                prev = last.get((backend, path))
                guess = prev[1] * (b / prev[0]) ** 2 * (args.repeats + 1) if prev else 0.0
                if time.monotonic() + guess > deadline:
                    row = (backend, path, args.dtype, b, args.world, args.dim, "skipped (time budget)")
                else:
                    try:
                        times = measure(
                            path, b, args.world, args.dim, DTYPES[args.dtype], device, backend, args.repeats
                        )
                    except torch.OutOfMemoryError:
                        row = (backend, path, args.dtype, b, args.world, args.dim, "OOM")
                    else:
                        med = statistics.median(times)
                        medians[path], last[(backend, path)] = med, (b, med)
                        ratio = f"{medians['per-term'] / med:.2f}×" if path == "fused" and "per-term" in medians else ""
                        cells = (f"{med * 1e3:.1f}", f"{min(times) * 1e3:.1f}", f"{max(times) * 1e3:.1f}", ratio)
                        row = (backend, path, args.dtype, b, args.world, args.dim, *cells)
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                rows.append(row)
                print("| " + " | ".join(map(str, row)) + " |", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--b-local", type=ints, default=[1024, 2048, 4096], help="rows per rank")
    parser.add_argument("--world", type=int, default=8, help="simulated ranks: keys have world·b_local rows")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backends", type=lambda s: s.split(","), default=["torch", "triton"], help="triton runs on CUDA only"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per point (median, min, max)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="skip points predicted to overrun it")
    args = parser.parse_args(argv)
    if args.world < 1 or min(args.b_local) < 1:
        raise SystemExit("--world and --b-local must be >= 1")
    return run(args)


if __name__ == "__main__":
    main()
