"""Where the time of one symmetric InfoNCE fwd+bwd goes, kernel by kernel (CUDA profiler).

Complements benchmarks/infonce.py (which times whole steps): one warmed-up step of the Triton path is
profiled with torch.profiler and the GPU kernels are listed by total device time, so that the share of
the forward kernel, the backward kernels and the cuBLAS products can be read off directly.

With ``--host`` it profiles the host instead (small batches are host-bound): the Python functions and
the torch ops of a few warmed-up steps, by self time per step, for any path of benchmarks/infonce.py
(``--world W``: one rank's share of the gathered loss).

  python benchmarks/infonce_breakdown.py --b 16384 --d 1024 --dtype bf16 --backward gemm
  python benchmarks/infonce_breakdown.py --host --b 1024 --d 512 --path triton
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.infonce import DTYPES, _inputs, _loss_fn, _step  # noqa: E402


def breakdown(b: int, d: int, dtype: torch.dtype, backward: str, top: int = 12) -> str:
    """Table of the ``top`` GPU kernels of one step: name, calls, total ms, share of the step."""
    path = "triton" if backward == "auto" else f"triton-{backward}"
    fn, leaves = _loss_fn(path), _inputs(b, d, dtype, torch.device("cuda"))
    _step(fn, leaves)  # autotune and compile outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _step(fn, leaves)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)  # µs
    lines = [f"b={b} d={d} {dtype} backward={backward}: {total / 1e3:.2f} ms of GPU kernels"]
    for e in sorted(events, key=lambda e: e.device_time_total, reverse=True)[:top]:
        share = 100 * e.device_time_total / total
        lines.append(f"  {e.device_time_total / 1e3:8.2f} ms {share:5.1f}%  ×{e.count:<3d} {e.key[:90]}")
    return "\n".join(lines)


def host_breakdown(
    path: str, b: int, d: int, dtype: torch.dtype, world: int = 1, steps: int = 50, top: int = 25
) -> str:
    """Wall time per step (synchronised), then the top Python functions (cProfile, self time) and the
    torch ops (torch.profiler CPU self time) per step of ``path``."""
    fn = _loss_fn(path, b if world > 1 else None)
    leaves = _inputs(world * b, d, dtype, torch.device("cuda"))
    for _ in range(3):
        _step(fn, leaves)  # autotune, compile, warm the allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        _step(fn, leaves)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    lines = [f"{path} b={b} d={d} {dtype} world={world}: {wall * 1e3:.3f} ms per step ({steps} steps, one sync)"]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        _step(fn, leaves)
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    lines.append(buf.getvalue())
    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        for _ in range(steps):
            _step(fn, leaves)
        torch.cuda.synchronize()
    events = sorted(tprof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    lines.append(f"torch ops per step: {sum(e.count for e in events) / steps:.1f}")
    for e in events[:top]:
        lines.append(f"  {e.self_cpu_time_total / steps:8.1f} us self  x{e.count / steps:<5.1f} {e.key[:80]}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--b", type=int, default=16384)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--backward", choices=("auto", "fused", "gemm"), default="auto")
    parser.add_argument("--host", action="store_true", help="profile host time per step instead of GPU kernels")
    parser.add_argument("--path", default="triton", help="--host: a path of benchmarks/infonce.py")
    parser.add_argument("--world", type=int, default=1, help="--host: one rank's share of this many ranks")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("infonce_breakdown profiles CUDA kernels; no GPU here")
    if args.host:
        print(host_breakdown(args.path, args.b, args.d, DTYPES[args.dtype], args.world), flush=True)
    else:
        print(breakdown(args.b, args.d, DTYPES[args.dtype], args.backward), flush=True)


if __name__ == "__main__":
    main()
