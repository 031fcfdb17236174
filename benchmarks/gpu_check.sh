#!/usr/bin/env bash
# One call on a lent GPU machine: versions, measured matmul ceilings, the Triton kernel tests compiled
# (no TRITON_INTERPRET), then benchmarks/infonce.py. Everything is written under $OUT as it goes, so a
# run cut short still returns what it measured. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh tests           # versions + ceilings + compiled-mode tests
#   bash benchmarks/gpu_check.sh bench SPEC...   # benchmark invocations, SPEC = seconds:args (see below)
#   bash benchmarks/gpu_check.sh all SPEC...
#
# Each SPEC is "SECONDS:ARGS" (ARGS comma-free spaces as ';'), e.g. "150:--dtypes bf16 --dims 1024".
# Every invocation is killed after SECONDS (hard `timeout`) and also gets --max-seconds SECONDS-20.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PY:-python3}
MODE=${1:-all}
shift || true

if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  $PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch, triton
from triton.testing import do_bench
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
p = torch.cuda.get_device_properties(0)
print(torch.cuda.get_device_name(0), f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
n = 8192
for name, dt in (("bf16", torch.bfloat16), ("fp32 (no tf32)", torch.float32)):
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device="cuda", dtype=dt), torch.randn(n, n, device="cuda", dtype=dt)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    print(f"ceiling: torch.matmul {n}^3 {name}: {2 * n**3 / ms / 1e9:.1f} TFLOP/s (median {ms:.2f} ms)")
EOF
  start=$(date +%s)
  # Compiling every autotune config dominates (H100, triton 3.6: over 230 s for 24 tests serially,
  # 10 tests in 24 s with 4 xdist workers), so spread the tests over workers when xdist is there.
  xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
  # shellcheck disable=SC2086
  timeout 300 $PY -m pytest -q -p no:cacheprovider $xdist -m "not slow" --durations=8 \
    tests/kernels/test_infonce_triton.py tests/kernels/test_infonce_blocks.py \
    tests/kernels/test_symmetric_infonce_triton.py tests/kernels/test_gathered_infonce_triton.py \
    tests/kernels/test_ring.py 2>&1 | tee "$OUT/pytest.txt"
  echo "pytest exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest.txt"
fi

if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  i=0
  for spec in "$@"; do
    i=$((i + 1))
    secs=${spec%%:*}
    args=${spec#*:}
    args=${args//;/ }
    start=$(date +%s)
    echo "== bench $i: $args (limit ${secs}s)" | tee -a "$OUT/bench_log.txt"
    # shellcheck disable=SC2086
    timeout "$secs" $PY benchmarks/infonce.py $args --max-seconds $((secs - 20)) --out "$OUT/bench.md" \
      2>&1 | tee -a "$OUT/bench_log.txt"
    echo "== bench $i exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/bench_log.txt"
  done
fi
