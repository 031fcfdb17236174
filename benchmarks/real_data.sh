#!/usr/bin/env bash
# Train the demo-size model on shards built from ../shared/data, evaluate it on the held-out proteins
# and run the benchmark suite configs/benchmarks/shared_data.yaml on its export (with the base-encoder
# row), plus EC on the run's own split (test = the annotated chains of the held-out shards, which
# pretraining never saw; the suite's other EC splits may hold chains the model was trained on), and
# GO-MF/BP/CC in the same protocol on a GO file built from the chains' own GO terms (propagated with
# the OBO; vocabulary: terms of >= 5 chains; pretrain.benchmark.go_annotations) into OUT/<split>/,
# scored on the MMseqs2 cluster split (as the EC cluster task) and on the run's own split:
# the figures of README "Trained on real data".
#
# Splits (SPLITS, default "cluster accession": both, each trained and reported under OUT/<split>/):
#   cluster    held-out proteins share < 30 % identity (over 50 % coverage) with every training
#              protein's cluster: MMseqs2 easy-cluster of all chains, whole clusters to one side;
#   accession  the shard builder's own split: proteins sharing a UniProt accession or an identical
#              sequence stay together (close homologues may straddle it).
# CPU: about 13 min per split on 2 cores, the benchmark step (GO tasks included) about 3 of them; both
# splits 25 min 20 s (measured 2026-12-06 on the 2-core AMD EPYC machine, README "Trained on real data").
# Usage: bash benchmarks/real_data.sh [OUT_DIR]   (default runs/real);  SPLITS=cluster bash ... for one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/real}
SPLITS=${SPLITS:-cluster accession}
DATA=../shared/data
PY=.venv/bin/python
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
test -d "$DATA/structures" || { echo "real_data.sh: $DATA not found" >&2; exit 2; }
BUILD=(--structures "$DATA/structures" --annotations "$DATA/annotations/pdb_chains.tsv"
       --go-obo "$DATA/annotations/go-basic_2021-12-15.obo.gz" --workers 2 --overwrite)

for SPLIT in $SPLITS; do
  D="$OUT/$SPLIT"
  mkdir -p "$D"
  start=$(date +%s)
  case "$SPLIT" in
    cluster)
      MMSEQS=$($PY -c 'from pretrain.benchmark.mmseqs import mmseqs_binary; print(mmseqs_binary())')
      $PY -m data_shards build --out "$D/all" "${BUILD[@]}"
      $PY -m data_shards fasta "$D/all" --out "$D/all.fasta"
      "$MMSEQS" easy-cluster "$D/all.fasta" "$D/clusters" "$D/mmseqs_tmp" --min-seq-id 0.3 -c 0.5 --cov-mode 0 \
          --threads 2 -v 1
      rm -rf "$D/mmseqs_tmp"
      CLUSTERS=(--split-clusters "$D/clusters_cluster.tsv") ;;
    accession) CLUSTERS=() ;;
    *) echo "real_data.sh: unknown split $SPLIT (cluster or accession)" >&2; exit 2 ;;
  esac
  $PY -m data_shards build --out "$D/shards" "${BUILD[@]}" --split-heldout 0.2 --split-seed 0 ${CLUSTERS[@]+"${CLUSTERS[@]}"}
  PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  .venv/bin/deepspeed --num_gpus 1 --master_port "$PORT" launch/pretrain.py --config zero2.json --run-dir "$D/run" \
      --set data.train_shards="$D/shards/train" --set data.eval_shards="$D/shards/heldout" \
      --set data.loader=local --set train.max_steps=400 --set train.stage1_steps=40 --set train.validate_every=100 \
      --set train.checkpoint_every=100 --set optim.warmup_steps=20 --set train.eval_at_end=false
  $PY -m pretrain.eval --run-dir "$D/run" --tasks all --go-obo "$DATA/annotations/go-basic_2021-12-15.obo.gz" \
      --ec-names "$DATA/annotations/ec_descriptions.tsv" --no-progress > /dev/null
  bench_start=$(date +%s)
  # DeepFRI-format GO file from the chains' GO terms (DeepFRI's own nrPDB-GO file is not bundled)
  $PY -m pretrain.benchmark.go_annotations --chains "$DATA/annotations/pdb_chains.tsv" \
      --obo "$DATA/annotations/go-basic_2021-12-15.obo.gz" --out "$D/nrPDB-GO_pdb_chains_annot.tsv" --min-chains 5
  # the suite of configs/benchmarks/shared_data.yaml plus EC and GO on this run's own split: test = the
  # annotated chains of the held-out shards (never seen in pretraining), train = those of the training
  # shards; and GO on the MMseqs2 cluster split of the suite's EC cluster task
  $PY - "$D" "$DATA" "$D/nrPDB-GO_pdb_chains_annot.tsv" <<'PYEOF'
import copy
import sys
from pathlib import Path

import yaml

from pretrain.eval.embed import read_annotations

d, data, go_file = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), str(Path(sys.argv[3]).resolve())
for split, name in (("train", "train"), ("heldout", "test")):
    meta = read_annotations(d / "shards" / split).meta
    chains = sorted({f"{m['pdb_id'].upper()}-{m['chain']}" for m in meta if m.get("pdb_id") and m.get("chain")})
    (d / f"{name}_chains.txt").write_text("".join(c + "\n" for c in chains))
suite = yaml.safe_load(Path("configs/benchmarks/shared_data.yaml").read_text())
suite["name"] = f"shared_data ({d.name} split of the pretraining run)"
suite["data_root"] = str(data)
ec_file = next(t["annotations"] for t in suite["tasks"] if t["type"] == "function")
own = {"name": "EC (pretraining held-out split)", "type": "function", "annotations": ec_file,
       "split": {"method": "lists", "train": str((d / "train_chains.txt").resolve()),
                 "test": str((d / "test_chains.txt").resolve())},
       "features": ["sequence", "structure"], "baselines": ["mmseqs", "kmer"]}
ec_cluster = next(t for t in suite["tasks"] if t["type"] == "function" and t["split"]["method"] == "cluster")
go = [{**copy.deepcopy(own), "name": "GO (pretraining held-out split)", "annotations": go_file},
      {**copy.deepcopy(ec_cluster), "name": "GO (MMseqs2 clusters <30%)", "annotations": go_file}]
last_function = max(i for i, t in enumerate(suite["tasks"]) if t["type"] == "function")
suite["tasks"][last_function + 1 : last_function + 1] = go  # after the EC tasks
suite["tasks"].insert(0, own)
(d / "benchmark_suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
PYEOF
  $PY -m pretrain.benchmark --export "$D/run/export" --suite "$D/benchmark_suite.yaml" \
      --out "$D/benchmark" --base > /dev/null
  end=$(date +%s)
  echo "$SPLIT split: eval $D/run/eval.json, benchmark $D/benchmark/results.md" \
       "(wall: $((end - start)) s in all, benchmark $((end - bench_start)) s)"
done
