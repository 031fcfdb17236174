#!/usr/bin/env bash
# Train the demo-size model on shards built from ../shared/data and evaluate it on the held-out
# clusters: the figures of README "Trained on real data". CPU: about 10 min of training + 5 of eval
# on 2 cores. Usage: bash benchmarks/real_data.sh [OUT_DIR]   (default runs/real)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/real}
DATA=../shared/data
PY=.venv/bin/python
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
test -d "$DATA/structures" || { echo "real_data.sh: $DATA not found" >&2; exit 2; }
$PY -m data_shards build --out "$OUT/shards" --structures "$DATA/structures" \
    --annotations "$DATA/annotations/pdb_chains.tsv" --go-obo "$DATA/annotations/go-basic_2021-12-15.obo.gz" \
    --workers 2 --split-heldout 0.2 --split-seed 0 --overwrite
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/deepspeed --num_gpus 1 --master_port "$PORT" launch/pretrain.py --config zero2.json --run-dir "$OUT/run" \
    --set data.train_shards="$OUT/shards/train" --set data.eval_shards="$OUT/shards/heldout" \
    --set data.loader=local --set train.max_steps=400 --set train.stage1_steps=40 --set train.validate_every=100 \
    --set train.checkpoint_every=100 --set optim.warmup_steps=20 --set train.eval_at_end=false
$PY -m pretrain.eval --run-dir "$OUT/run" --tasks all --go-obo "$DATA/annotations/go-basic_2021-12-15.obo.gz" \
    --ec-names "$DATA/annotations/ec_descriptions.tsv" --no-progress > /dev/null
echo "results: $OUT/run/eval.json"
