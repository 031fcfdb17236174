"""Where the time of one symmetric InfoNCE fwd+bwd goes, kernel by kernel (CUDA profiler).

Complements benchmarks/infonce.py (which times whole steps): one warmed-up step of the Triton path is
profiled with torch.profiler and the GPU kernels are listed by total device time, so that the share of
the forward kernel, the backward kernels and the cuBLAS products can be read off directly.

  python benchmarks/infonce_breakdown.py --b 16384 --d 1024 --dtype bf16 --backward gemm
"""

from __future__ import annotations

import argparse
import sys
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--b", type=int, default=16384)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--backward", choices=("auto", "fused", "gemm"), default="auto")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("infonce_breakdown profiles CUDA kernels; no GPU here")
    print(breakdown(args.b, args.d, DTYPES[args.dtype], args.backward), flush=True)


if __name__ == "__main__":
    main()
