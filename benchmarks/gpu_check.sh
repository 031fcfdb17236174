#!/usr/bin/env bash
# The prepared checks for a lent GPU machine (one call, every step under its own `timeout`, everything
# kept under $OUT as it goes, so a run cut short still returns what it measured). Run from the repo root:
#
#   bash benchmarks/gpu_check.sh MODE[,MODE...] [SPEC...]    on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run [MODE[,MODE...]]  on a CPU: build the bundle, rehearse, check
#
# Modes (an unknown one exits 2):
#   tests     versions, measured matmul ceilings, the Triton kernel tests compiled (no TRITON_INTERPRET)
#   train     `deepspeed --num_gpus 1 launch/pretrain.py` (ZeRO-2 and ZeRO-3, bf16, data.loader=local) on
#             shards built from ../shared/data, the 35M recipe and the 650M one with activation
#             checkpointing; asserts from each run's metrics.jsonl that the Triton loss ran; samples/s,
#             time split, MFU, peak memory against benchmarks/memory.py (benchmarks/gpu_report.py)
#   resume    fp32: an uninterrupted run, and one SIGKILLed mid-run and relaunched; losses compared
#   trimodal  benchmarks/trimodal_loss.py (the fused tri-modal loss step against eager), when present
#   bench     benchmarks/infonce.py once per SPEC "SECONDS:ARGS" (spaces in ARGS written as ';')
#   all       tests,train,resume,trimodal
#
# What the machine lacks travels in build/gpu_bundle (benchmarks/gpu_bundle.py: DeepSpeed as a
# pure-Python wheel with its ops off, its missing dependencies, fair-esm, webdataset, the shards), which
# the device tool carries; it is installed with pip --no-index --target. The dry run prints the exact call.
# Knobs (environment): OUT, BUNDLE, PY, GPU_CHECK_BUDGET_S (whole script; later steps are skipped when
# it runs out), B35 / STEPS35 / B650 / STEPS650 (train), RESUME_STEPS / RESUME_BATCH / RESUME_RECIPE,
# TRIMODAL_ARGS, and each step's seconds: T_TESTS, T35, T650, T35Z3, T_RESUME, T_TRIMODAL.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
DRY=0
if [ "${1:-}" = --dry-run ]; then
  DRY=1
  shift
fi
MODE=${1:-all}
shift || true
MODES=()
IFS=, read -ra REQ <<< "$MODE"
for m in "${REQ[@]}"; do
  case "$m" in
    tests | train | resume | trimodal | bench) MODES+=("$m") ;;
    all) MODES+=(tests train resume trimodal) ;;
    -h | --help)
      sed -n '2,25p' "$0"
      exit 0
      ;;
    *)
      echo "gpu_check.sh: unknown mode '$m' (expected tests, train, resume, trimodal, bench or all; several comma-separated)" >&2
      exit 2
      ;;
  esac
done
[ ${#MODES[@]} -gt 0 ] || { echo "gpu_check.sh: no mode given" >&2; exit 2; }
want() { [[ " ${MODES[*]} " == *" $1 "* ]]; }

OUT=${OUT:-/tmp/gpu_out}
BUNDLE=${BUNDLE:-build/gpu_bundle}
SHARDS=${SHARDS:-$BUNDLE/shards}
WORK=${WORK:-/tmp/gpu_check_work}
BUDGET=${GPU_CHECK_BUDGET_S:-570}
mkdir -p "$OUT" "$WORK"
SUMMARY=$OUT/summary.txt  # one line per step; with report.md, report.jsonl, runs.log, env.txt, tests.txt,
REPORT=$OUT/report.md     # trimodal.txt and bench.txt: at most the 8 files the device tool returns
RUNLOG=$OUT/runs.log
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }
# Seconds left for a step that wants $1: min($1, what the budget leaves); 0 when under 30 s remain.
limit() {
  local left=$((BUDGET - ($(date +%s) - START) - 10))
  [ "$left" -lt 30 ] && { echo 0; return; }
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
step_result() {  # NAME RC SECONDS
  if [ "$2" -eq 0 ]; then note "PASS $1 ($3 s)"; else note "FAIL $1 (exit $2, $3 s)"; FAILED=1; fi
}

# ------------------------------------------------------------------ environment
if [ "$DRY" = 1 ]; then
  HOSTPY=${HOSTPY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  note "== dry run on $(hostname): bash -n, bundle, rehearsal install, every command parsed"
  bash -n "$0" || { note "FAIL bash -n $0"; exit 1; }
  $HOSTPY benchmarks/gpu_bundle.py build --out "$BUNDLE" 2>&1 | tail -n 12 | tee -a "$SUMMARY"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { note "FAIL bundle build"; exit 1; }
  # What the device tool sends: the tracked and untracked-not-ignored files, plus the carried bundle.
  tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
  bundle=$(du -sb "$BUNDLE" | cut -f1)
  total_mib=$(((tree + bundle) / 1048576))
  note "transfer: working tree $((tree / 1048576)) MiB + bundle $((bundle / 1048576)) MiB = ${total_mib} MiB (limit 64)"
  [ "$total_mib" -lt 64 ] || { note "FAIL transfer over 64 MiB"; exit 1; }
  sim=$($HOSTPY benchmarks/gpu_bundle.py simulate --bundle "$BUNDLE" --env "${SIM_ENV:-build/gpu_sim}" 2>&1)
  rc=$?
  echo "$sim" | tail -n 4 | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || { note "FAIL rehearsal install"; exit 1; }
  PY=$(echo "$sim" | sed -n 's/^PYTHON=//p')
  export PYTHONPATH
  PYTHONPATH=$(echo "$sim" | sed -n 's/^PYTHONPATH=//p')
  $PY -c "import deepspeed, esm, webdataset, torch, pretrain.run, pretrain.engine.trainer" 2>&1 | tail -n 3
  [ "${PIPESTATUS[0]}" -eq 0 ] || { note "FAIL imports in the rehearsal environment"; exit 1; }
  note "PASS rehearsal environment imports deepspeed, esm, webdataset, the trainer ($PY)"
  for f in benchmarks/gpu_run.py benchmarks/gpu_report.py; do  # (launch/pretrain.py runs below; memory.py in gpu_report)
    $PY -m py_compile "$f" && $PY "$f" --help > /dev/null || { note "FAIL $f (py_compile / --help)"; FAILED=1; }
  done
  $PY -m py_compile launch/pretrain.py benchmarks/memory.py benchmarks/infonce.py || { note "FAIL py_compile"; FAILED=1; }
  note "checked: py_compile of the Python scripts the modes run, --help of gpu_run.py and gpu_report.py"
  LAUNCHES=$WORK/launches.jsonl  # every launch's arguments, validated together at the end (one interpreter)
  : > "$LAUNCHES"
else
  PY=${PY:-python3}
  unset TRITON_INTERPRET
  SITE=${SITE:-/tmp/gpu_site}
  if want train || want resume; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$BUNDLE"/wheels/*.whl 2>&1 | tail -n 5 | tee -a "$SUMMARY"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { note "FAIL installing $BUNDLE/wheels (carry build/gpu_bundle)"; exit 1; }
  fi
  export PYTHONPATH=$PWD:$SITE
fi
DS=("$PY" -m deepspeed.launcher.runner)  # the `deepspeed` command, whichever interpreter holds the bundle
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Overrides of every launch: the carried shards, no weight files (the encoders start from scratch), no
# evaluation, a line per step, no checkpoint before the SIGKILL that ends the run at its last step.
COMMON=(--set "data.train_shards=$SHARDS/train" --set "data.eval_shards=$SHARDS/heldout" --set data.loader=local
  --set model.sequence.weights=null --set model.text.pretrained_dir=null --set train.eval_at_end=false
  --set train.validate_every=0 --set train.tensorboard=false --set train.log_every=1 --set optim.warmup_steps=2)
# The dry run trains each launch it runs at this size on the CPU.
TINY=(--set model.sequence.num_layers=1 --set model.text.num_layers=1 --set model.structure.num_layers=1
  --set data.batch_size=4 --set model.sequence.max_length=64 --set model.text.max_length=64)

# launch NAME RUN_DIR KILL_AT TIMEOUT -- ARGS...: one `deepspeed --num_gpus 1` launch, SIGKILLed once
# KILL_AT is logged (benchmarks/gpu_run.py); its output goes to runs.log.
launch() {
  local name=$1 run=$2 kill_at=$3 secs=$4
  shift 5
  echo "===== $name: $run" >> "$RUNLOG"
  $PY benchmarks/gpu_run.py --timeout "$secs" --log "$RUNLOG" --metrics "$run/metrics.jsonl" --kill-at-step "$kill_at" \
    -- "${DS[@]}" --num_gpus 1 --master_port "$(free_port)" launch/pretrain.py --run-dir "$run" "$@"
}

# ------------------------------------------------------------------ tests
KERNEL_TESTS=(tests/kernels/test_infonce_triton.py tests/kernels/test_infonce_blocks.py
  tests/kernels/test_symmetric_infonce_triton.py tests/kernels/test_gathered_infonce_triton.py tests/kernels/test_ring.py)
[ -f tests/kernels/test_trimodal.py ] && KERNEL_TESTS+=(tests/kernels/test_trimodal.py)
if want tests; then
  if [ "$DRY" = 1 ]; then
    $PY -m pytest --collect-only -q -p no:cacheprovider "${KERNEL_TESTS[@]}" > "$WORK/collect.txt" 2>&1
    rc=$?
    step_result "tests: collect ${KERNEL_TESTS[*]} ($(grep -c '::' "$WORK/collect.txt") tests)" $rc 0
  elif [ "$(limit "${T_TESTS:-240}")" -eq 0 ]; then
    note "SKIP tests (budget)"
  else
    $PY - << 'EOF' 2>&1 | tee "$OUT/env.txt"
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
    t0=$(date +%s)
    # Compiling every autotune config dominates (H100, triton 3.6: over 230 s for 24 tests serially,
    # 10 tests in 24 s with 4 xdist workers), so spread the tests over workers when xdist is there.
    xdist=$($PY -c "import xdist" 2> /dev/null && echo "-n 4")
    # shellcheck disable=SC2086
    timeout "$(limit "${T_TESTS:-240}")" $PY -m pytest -q -p no:cacheprovider $xdist -m "not slow" --durations=8 \
      "${KERNEL_TESTS[@]}" > "$OUT/tests.txt" 2>&1
    rc=$?
    step_result "tests: ${KERNEL_TESTS[*]}" $rc $(($(date +%s) - t0))
  fi
fi

# ------------------------------------------------------------------ train
# NAME|RECIPE|DEEPSPEED JSON|BATCH|STEPS|SECONDS|EXTRA OVERRIDES (space-separated)
# In order of importance: the budget (GPU_CHECK_BUDGET_S) skips what no longer fits.
TRAIN_RUNS=(
  "align_pro_35M-zero2|configs/recipes/align_pro_35M.yaml|zero2.json|${B35:-256}|${STEPS35:-8}|${T35:-120}|"
  "align_pro_650M-zero3|configs/recipes/align_pro_650M.yaml|zero3.json|${B650:-16}|${STEPS650:-8}|${T650:-150}|train.activation_checkpointing=[sequence,text]"
  "align_pro_35M-zero3|configs/recipes/align_pro_35M.yaml|zero3.json|${B35:-256}|6|${T35Z3:-90}|"
)
if want train; then
  first=1
  for spec in "${TRAIN_RUNS[@]}"; do
    IFS='|' read -r name recipe json batch steps secs extra <<< "$spec"
    args=(--config "$json" --recipe "$recipe" "${COMMON[@]}" --set "data.batch_size=$batch"
      --set "train.max_steps=$((steps + 100))" --set train.checkpoint_every=100000 --set train.stage1_steps=0)
    for e in $extra; do args+=(--set "$e"); done
    run=$WORK/train/$name
    rm -rf "$run"
    if [ "$DRY" = 1 ]; then
      $PY -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${args[@]}" >> "$LAUNCHES"
      [ "$first" = 1 ] || continue
      first=0  # the first launch runs for real, CPU-sized, through the same launcher, kill and report
      t0=$(date +%s)
      launch "$name (CPU rehearsal)" "$run" 3 300 -- "${args[@]}" "${TINY[@]}"
      rc=$?
      $PY benchmarks/gpu_report.py train "$run" --name "$name (CPU rehearsal)" --skip 1 --expect-backend torch \
        --out "$REPORT" --json "$WORK/report.json" > /dev/null
      rc=$((rc | $?))
      step_result "train: $name launched on CPU, killed at step 3, report read (torch loss)" $rc $(($(date +%s) - t0))
      continue
    fi
    secs=$(limit "$secs")
    [ "$secs" -gt 0 ] || { note "SKIP train $name (budget)"; continue; }
    t0=$(date +%s)
    launch "$name" "$run" "$steps" "$secs" -- "${args[@]}"
    rc=$?
    {
      echo "===== $name metrics.jsonl"
      cat "$run/metrics.jsonl" 2> /dev/null
    } >> "$RUNLOG"
    $PY benchmarks/gpu_report.py train "$run" --name "$name (batch $batch, $json, bf16)" --expect-backend triton \
      --out "$REPORT" --json "$WORK/report.json" > /dev/null
    rc=$((rc | $?))
    cat "$WORK/report.json" >> "$OUT/report.jsonl" 2> /dev/null
    step_result "train: $name" $rc $(($(date +%s) - t0))
  done
fi

# ------------------------------------------------------------------ resume
if want resume; then
  steps=${RESUME_STEPS:-8}
  every=$((steps / 2))
  fp32=$WORK/zero2_fp32.json  # configs/zero2.json with its bf16 block off: train.precision=fp32 needs that
  $PY -c "import json, sys; d = json.load(open('configs/zero2.json')); d['bf16'] = {'enabled': False}; \
json.dump(d, open(sys.argv[1], 'w'))" "$fp32"
  args=(--config "$fp32" --recipe "${RESUME_RECIPE:-configs/recipes/align_pro_35M.yaml}" "${COMMON[@]}"
    --set "data.batch_size=${RESUME_BATCH:-32}" --set train.precision=fp32 --set "train.max_steps=$((steps + 100))"
    --set "train.checkpoint_every=$every" --set train.stage1_steps=2)
  if [ "$DRY" = 1 ]; then
    $PY -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "${args[@]}" >> "$LAUNCHES"
    [ "${DRY_FULL:-0}" = 1 ] && args+=("${TINY[@]}")  # DRY_FULL=1: the whole flow, CPU-sized
  fi
  if [ "$DRY" = 0 ] || [ "${DRY_FULL:-0}" = 1 ]; then
    secs=$(limit "${T_RESUME:-150}")
    if [ "$secs" -eq 0 ]; then
      note "SKIP resume (budget)"
    else
      t0=$(date +%s)
      ref=$WORK/resume/uninterrupted
      cut=$WORK/resume/killed
      rm -rf "$ref" "$cut"
      launch "resume: uninterrupted" "$ref" "$steps" "$((secs / 3))" -- "${args[@]}"
      rc=$?
      launch "resume: killed mid-run" "$cut" $((every + 1)) "$((secs / 3))" -- "${args[@]}"
      rc=$((rc | $?))
      launch "resume: relaunched" "$cut" "$steps" "$((secs / 3))" -- "${args[@]}"
      rc=$((rc | $?))
      grep -q "resumed from step $every" "$RUNLOG" || { note "resume: no 'resumed from step $every' in runs.log"; rc=1; }
      $PY benchmarks/gpu_report.py resume "$ref" "$cut" --out "$REPORT" --json "$WORK/report.json" > /dev/null
      rc=$((rc | $?))
      cat "$WORK/report.json" >> "$OUT/report.jsonl" 2> /dev/null
      step_result "resume: SIGKILL after step $((every + 1)), relaunch from step $every, losses of steps 1-$steps compared" $rc $(($(date +%s) - t0))
    fi
  fi
fi

# ------------------------------------------------------------------ trimodal
if want trimodal; then
  if [ ! -f benchmarks/trimodal_loss.py ]; then
    note "SKIP trimodal: benchmarks/trimodal_loss.py is not in this tree"
  elif [ "$DRY" = 1 ]; then
    $PY -m py_compile benchmarks/trimodal_loss.py && $PY benchmarks/trimodal_loss.py --help > /dev/null
    step_result "trimodal: benchmarks/trimodal_loss.py compiles and parses --help" $? 0
  else
    secs=$(limit "${T_TRIMODAL:-90}")
    if [ "$secs" -eq 0 ]; then
      note "SKIP trimodal (budget)"
    else
      t0=$(date +%s)
      # shellcheck disable=SC2086
      timeout "$secs" $PY benchmarks/trimodal_loss.py \
        ${TRIMODAL_ARGS:---b-local 1024,2048,4096 --world 8 --dim 512 --dtype bf16 --max-seconds $((secs - 20))} \
        > "$OUT/trimodal.txt" 2>&1
      rc=$?
      step_result "trimodal: benchmarks/trimodal_loss.py ${TRIMODAL_ARGS:-}" $rc $(($(date +%s) - t0))
    fi
  fi
fi

# ------------------------------------------------------------------ bench
if want bench; then
  i=0
  for spec in "$@"; do
    i=$((i + 1))
    secs=${spec%%:*}
    bargs=${spec#*:}
    bargs=${bargs//;/ }
    if [ "$DRY" = 1 ]; then
      # shellcheck disable=SC2086
      $PY benchmarks/infonce.py $bargs --help > /dev/null
      step_result "bench $i: $bargs parses" $? 0
      continue
    fi
    t0=$(date +%s)
    echo "== bench $i: $bargs (limit ${secs}s)" >> "$OUT/bench.txt"
    # shellcheck disable=SC2086
    timeout "$secs" $PY benchmarks/infonce.py $bargs --max-seconds $((secs - 20)) --out "$WORK/bench.md" \
      >> "$OUT/bench.txt" 2>&1
    rc=$?
    step_result "bench $i: $bargs" $rc $(($(date +%s) - t0))
  done
  [ -f "$WORK/bench.md" ] && cat "$WORK/bench.md" >> "$OUT/bench.txt"
fi

if [ "$DRY" = 1 ]; then
  if [ -s "$LAUNCHES" ]; then
    $PY benchmarks/gpu_report.py check --from "$LAUNCHES" 2>&1 | tee -a "$SUMMARY"
    step_result "every launch's recipe + overrides + DeepSpeed JSON + shards load (pretrain.run.prepare)" "${PIPESTATUS[0]}" 0
  fi
  cat << EOF | tee -a "$SUMMARY"
The device call (run tool), from the repository root here:
  run(command="bash benchmarks/gpu_check.sh train,resume,trimodal", carry=["build/gpu_bundle"], timeout_s=600)
  then, with 5 minutes of device time left: run(command="GPU_CHECK_BUDGET_S=250 bash benchmarks/gpu_check.sh tests",
  carry=["build/gpu_bundle"], timeout_s=280); the files come back from \$OUT: summary.txt, report.md, report.jsonl,
  runs.log, env.txt, tests.txt, trimodal.txt (bench.txt with bench).
EOF
fi
note "gpu_check.sh ${MODE}: $([ "$FAILED" = 0 ] && echo all passed || echo FAILURES) after $(($(date +%s) - START)) s"
exit $FAILED
