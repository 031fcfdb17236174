"""Time and peak memory of the symmetric InfoNCE forward + backward: Triton kernel vs torch paths.

Paths (each computes 0.5 · (infonce(a, b) + infonce(b, a)) over a batch of b pairs of dimension d):
  triton   kernels.symmetric_infonce_triton.symmetric_infonce_triton (GPU only: the interpreter is not a speed):
           both directions from one forward (launch or pass over the tiles) and, with the gemm
           backward, one shared backward
  triton-split / triton-tiled   the same with its forward forced: the BOTH_WAYS launch (each tile
           computed once per direction) or the one-pass kernel ("auto" picks by batch size)
  triton-fused / triton-gemm   the same with its backward method forced ("auto" is gemm on CUDA)
  triton-unpaired   two kernels.infonce_triton.infonce_triton calls, one per direction (auto backward):
           this path before the paired kernels existed, and (--world) the gathered loss's rank share
           before kernels.gathered_infonce_triton.gathered_symmetric_infonce_triton, which "triton" runs there
  chunked  kernels.infonce_reference.infonce_torch  (bounded memory, chunked torch)
  eager    kernels.infonce_reference.infonce_eager  (materialised logits + F.cross_entropy)

TFLOP/s counts 8·b²·d per fwd+bwd of the symmetric loss (four b×b×d matmuls: logits, logits again in
the backward, dA, dB); with --world W, one rank's share of the gathered loss (b local queries against
n = W·b keys in each direction), counted as 8·b·n·d, whatever a path really computes. Peak memory is
what the step allocates on top of its inputs (CUDA: max_memory_allocated; CPU: peak bytes of live tensor
storages created during the step, tracked by a TorchDispatchMode). Rows are appended to BENCHMARKS.md as
one markdown table, with each row's time and memory relative to eager at the same size. Points predicted
to overrun --max-seconds are listed as skipped; on CPU so are eager points whose b×n buffers would not
fit, on CUDA eager is always tried and an allocation failure is recorded as OOM. A path that raises anything
else is recorded as "error (...)" and the run goes on.

  python benchmarks/infonce.py                                   # GPU: every path, b 1k..128k
  python benchmarks/infonce.py --sizes 1024,2048 --dims 256 --max-seconds 150   # CPU smoke figures
  python benchmarks/infonce.py --world 8 --sizes 512,2048 --dims 512     # one rank of 8, gathered keys
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("triton", "chunked", "eager")
EXTRA_PATHS = ("triton-fused", "triton-gemm", "triton-unpaired", "triton-split", "triton-tiled")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{model} ({torch.get_num_threads()} threads)"


def _loss_fn(path: str, local_rows: int | None = None):
    """Symmetric loss of ``path`` on (a, b, s); with ``local_rows``, one rank's share of the gathered
    loss: its first ``local_rows`` rows of a and b as queries against every row of the other (the keys
    a rank holds after the all-gather), positives on the diagonal."""
    if path.startswith("triton"):
        from kernels.gathered_infonce_triton import gathered_symmetric_infonce_triton
        from kernels.infonce_triton import infonce_triton
        from kernels.symmetric_infonce_triton import symmetric_infonce_triton

        variant = path.partition("-")[2]  # "", fused/gemm (backward), split/tiled (forward), unpaired
        forward = variant if variant in ("split", "tiled") else "auto"
        backward = variant if variant in ("fused", "gemm") else "auto"
        if local_rows is None and variant != "unpaired":
            return functools.partial(symmetric_infonce_triton, backward=backward, forward=forward)
        if local_rows is not None and variant != "unpaired":  # rank 0's share: a, b are views of a_all, b_all
            world = lambda a: a.shape[0] // local_rows  # noqa: E731
            return lambda a, b, s: gathered_symmetric_infonce_triton(
                a[:local_rows], b[:local_rows], a, b, s, offset=0, world=world(a), backward=backward
            )
        fn = functools.partial(infonce_triton, backward=backward)
    else:
        from kernels.infonce_reference import infonce_eager, infonce_torch

        fn = infonce_torch if path == "chunked" else infonce_eager
    if local_rows is None:
        return lambda a, b, s: 0.5 * (fn(a, b, s) + fn(b, a, s))

    def rank_share(a, b, s):
        t = torch.arange(local_rows, device=a.device)
        return 0.5 * (fn(a[:local_rows], b, s, t) + fn(b[:local_rows], a, s, t))

    return rank_share


class _LiveTensorBytes(TorchDispatchMode):
    """CPU peak: bytes of tensor storages created by ops inside the block and alive at the same time.

    Every aten op (forward and the autograd backward, which runs in this thread on CPU) passes through
    the mode; a storage is counted once when it first appears and released when its last tensor dies.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs = {}  # data_ptr -> [tensors alive, bytes]

    def _release(self, ptr):
        entry = self.refs[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().nbytes():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.refs:
                    self.refs[ptr] = [0, t.untyped_storage().nbytes()]
                    self.live += self.refs[ptr][1]
                    self.peak = max(self.peak, self.live)
                self.refs[ptr][0] += 1
                weakref.finalize(t, self._release, ptr)
        return out


class _PeakMemory:
    """Extra bytes allocated at peak during the block (CUDA caching allocator, or live CPU tensors)."""

    def __init__(self, device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.mode = _LiveTensorBytes().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.mode.__exit__(*exc)
            self.peak = self.mode.peak


def _inputs(b, d, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(device, dtype)
    bb = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).to(device, dtype)
    s = torch.tensor(14.285, device=device)
    return [t.requires_grad_() for t in (a, bb, s)]


def _step(fn, leaves):
    for t in leaves:
        t.grad = None
    fn(*leaves).backward()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(path, b, d, dtype, device, repeats, world=1):
    """(median seconds per fwd+bwd, peak extra bytes) of one path at one size (b rows per rank)."""
    fn = _loss_fn(path, b if world > 1 else None)
    leaves = _inputs(world * b, d, dtype, device)
    _step(fn, leaves)  # warm-up (autotune / allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        _step(fn, leaves)
        _sync(device)
        times.append(time.perf_counter() - start)
    with _PeakMemory(device) as mem:
        _step(fn, leaves)
    return statistics.median(times), mem.peak


def _eager_fits(b, device, world=1):
    """CPU: eager holds ~3 b×n fp32 tensors per direction (logits, its fp32 copy, softmax grad); an
    overrun would swap or kill the process, so such points are skipped. CUDA: always tried, since an
    allocation failure is cheap and is recorded as OOM (measured, not predicted)."""
    need = 6 * b * world * b * 4
    if device.type == "cuda":
        return True
    avail_kib = next(
        int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable:")
    )
    return need < avail_kib * 1024 * 0.5


def run(args):
    device = torch.device(args.device)
    unknown = set(args.paths) - set(PATHS) - set(EXTRA_PATHS)
    if unknown:
        raise SystemExit(f"unknown paths {sorted(unknown)}; choose from {PATHS + EXTRA_PATHS}")
    paths = [p for p in args.paths if not p.startswith("triton") or device.type == "cuda"]
    deadline = time.monotonic() + args.max_seconds
    rows, last = [], {}  # last[(path, dtype, d)] = (b, seconds) for budget extrapolation
    for dtype_name in args.dtypes:
        for d in args.dims:
            for b in args.sizes:
                eager = None
                for path in sorted(paths, key=lambda p: p != "eager"):  # eager first: the ratio base
                    status, secs, peak = "ok", None, None
                    prev = last.get((path, dtype_name, d))
                    guess = prev[1] * (b / prev[0]) ** 2 * (args.repeats + 2) if prev else 0.0
                    if time.monotonic() + guess > deadline:
                        status = "skipped (time budget)"
                    elif path == "eager" and not _eager_fits(b, device, args.world):
                        status = "skipped (memory)"
                    else:
                        try:
                            secs, peak = measure(path, b, d, DTYPES[dtype_name], device, args.repeats, args.world)
                            last[(path, dtype_name, d)] = (b, secs)
                        except torch.OutOfMemoryError:
                            status = "OOM"
                        except Exception as err:  # a failing path (e.g. a kernel compile error) is a row
                            status = f"error ({type(err).__name__})"
                            print(f"{path} {dtype_name} b={b} d={d}: {err!r}", file=sys.stderr, flush=True)
                        finally:
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                    if path == "eager" and secs is not None:
                        eager = (secs, peak)
                    rows.append((path, dtype_name, b, d, status, secs, peak, eager, args.world))
                    print(_format_row(rows[-1]), flush=True)
    return rows


def counted_flops(b: int, d: int, world: int = 1) -> int:
    """FLOPs credited to one fwd+bwd: 8·b·n·d, n = world·b keys per direction (8·b²·d when world = 1)."""
    return 8 * b * (world * b) * d


def _format_row(row):
    path, dtype_name, b, d, status, secs, peak, eager, world = row
    if secs is None:
        return f"| {path} | {dtype_name} | {b} | {d} | {status} | | | | |"
    tflops = counted_flops(b, d, world) / secs / 1e12
    t_ratio = f"{secs / eager[0]:.2f}×" if eager else "n/a"
    m_ratio = f"{peak / eager[1]:.3f}×" if eager and peak is not None and eager[1] else "n/a"
    mib = f"{peak / 2**20:.1f}" if peak is not None else "n/a"
    cells = [path, dtype_name, b, d, f"{secs * 1e3:.1f}", f"{tflops:.3f}", mib, t_ratio, m_ratio]
    return "| " + " | ".join(map(str, cells)) + " |"


def append_markdown(rows, args, out: Path):
    device = torch.device(args.device)
    head = [
        "",
        f"## Fused InfoNCE, symmetric loss fwd+bwd ({datetime.date.today().isoformat()})",
        "",
        f"Device: **{device_name(device)}**; torch {torch.__version__}; "
        f"command: `python benchmarks/infonce.py {' '.join(sys.argv[1:])}`. "
        + (
            f"One rank's share of the gathered loss: b local rows against n = {args.world}·b keys per direction; "
            if args.world > 1
            else ""
        )
        + "TFLOP/s counts 8·b·n·d (n = keys per direction); peak MiB is allocated on top of the inputs"
        + (" (CPU: peak of live tensor storages)" if device.type == "cpu" else "")
        + "; ratios are time and peak memory relative to eager at the same size."
        + (" Triton is not timed on CPU (interpreter)." if device.type == "cpu" else ""),
        "",
        "| path | dtype | b | d | fwd+bwd ms | TFLOP/s | peak MiB | time vs eager | memory vs eager |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if not out.exists():
        out.write_text("# Benchmarks\n\nMeasured figures; each section names its device and command.\n")
    with out.open("a") as fh:
        fh.write("\n".join(head + [_format_row(r) for r in rows]) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]
    parser.add_argument("--sizes", type=ints, default=[1 << i for i in range(10, 18)], help="batch sizes b")
    parser.add_argument("--dims", type=ints, default=[256, 512, 1024])
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES))
    parser.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (median reported)")
    parser.add_argument(
        "--world",
        type=int,
        default=1,
        help="time one rank's share of the loss gathered over this many ranks (b local rows, world·b keys)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=1800.0,
        help="total budget: points predicted to overrun it are skipped",
    )
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cpu" and any(p.startswith("triton") for p in args.paths):
        print("CPU: the Triton path only runs under the interpreter and is not timed", file=sys.stderr)
    rows = run(args)
    if not args.no_write:
        append_markdown(rows, args, args.out)


if __name__ == "__main__":
    main()
