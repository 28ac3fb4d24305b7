#!/usr/bin/env bash
# Quality on real data (BARS hyper-parameters): DeepFM, FM and LR, 3 seeds each, on
#   * Frappe: train on frappe.validation.libfm (10 % held out for early stopping), test on frappe.test.libfm,
#     at batch 4096 (BARS) and 1024
#   * the seed's MovieLens sample (sparrow_movielens/samples.csv): time-ordered 80/20 train/test split,
#     the last 10 % (by time) of the train part held out for early stopping.
# Every run uses the CLI defaults for what BARS does not fix: fused Adam on the table (--table-optimizer
# adam: torch.optim.Adam's semantics at the cost of an update of the rows each batch touches; table
# lr = --lr), early stopping on validation AUC - logloss
# (--monitor auc-logloss, FuxiCTR's monitor {AUC: 1, logloss: -1}), batch-norm statistics recomputed
# before each validation (--precise-bn-batches 16), embedding init N(0, 1e-2) (see quality.md).
# Writes one metrics JSON per run to $OUT, then benchmarks/results/quality.{md,json} via quality_table.py.
# Usage: benchmarks/quality.sh [DATA_DIR]   (default ../shared/data beside the repository)
#        env SEEDS="2021 2022 2023" OUT=dir THREADS=n
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-$(cd .. && pwd)/shared/data}
OUT=${OUT:-benchmarks/results/quality_runs}
SEEDS=${SEEDS:-"2021 2022 2023"}
THREADS=${THREADS:+--threads $THREADS}
export OMP_WAIT_POLICY=PASSIVE
if [ ! -f "$DATA/frappe/frappe.validation.libfm" ] || [ ! -f "$DATA/sparrow_movielens/samples.csv" ]; then
  echo "quality.sh: real data not found under $DATA; skipping" >&2
  exit 0
fi
mkdir -p "$OUT"
COMMON="--embedding-dim 10 --lr 1e-3 --epochs 100 --patience 2 --init-std 1e-2
        --table-optimizer adam --monitor auc-logloss --precise-bn-batches 16 --no-progress $THREADS"
DNN="--hidden-units 400,400,400 --batch-norm"
for seed in $SEEDS; do
  # Frappe, at batch 4096 (BARS) and 1024. L2 (FuxiCTR embedding_regularizer / regularizer): DeepFM
  # 0.05, FM 5e-6, LR 1e-5.
  F="--format libfm --train $DATA/frappe/frappe.validation.libfm --valid-fraction 0.1 --test $DATA/frappe/frappe.test.libfm"
  for batch in 4096 1024; do
    name=frappe$([ $batch = 4096 ] || echo "-b$batch")
    B="--batch-size $batch"
    python -m deepfm_fast train $F $COMMON $B --model deepfm $DNN --dropout 0.2 --l2-embedding 0.05 --seed $seed --metrics-out $OUT/${name}_deepfm_$seed.json
    python -m deepfm_fast train $F $COMMON $B --model fm --l2-embedding 5e-6 --seed $seed --metrics-out $OUT/${name}_fm_$seed.json
    python -m deepfm_fast train $F $COMMON $B --model lr --l2-embedding 1e-5 --seed $seed --metrics-out $OUT/${name}_lr_$seed.json
  done
  # MovieLens sample. L2: DeepFM 0.01, FM 5e-6, LR 5e-6.
  M="--batch-size 4096 --format csv --schema sparrow_movielens --train $DATA/sparrow_movielens/samples.csv --split ordered --split-by timestamp --test-fraction 0.2 --valid-fraction 0.1"
  python -m deepfm_fast train $M $COMMON --model deepfm $DNN --dropout 0.3 --l2-embedding 0.01 --seed $seed --metrics-out $OUT/movielens_deepfm_$seed.json
  python -m deepfm_fast train $M $COMMON --model fm --l2-embedding 5e-6 --seed $seed --metrics-out $OUT/movielens_fm_$seed.json
  python -m deepfm_fast train $M $COMMON --model lr --l2-embedding 5e-6 --seed $seed --metrics-out $OUT/movielens_lr_$seed.json
done
rm -f "$OUT"/*.png  # each run's learning curves: not kept
python benchmarks/quality_table.py "$OUT"
