#!/usr/bin/env bash
# Where the quality of the fast path goes: DeepFM on Frappe (batch 1024 and 4096) and the MovieLens
# sample, 3 seeds, one change at a time from the CLI defaults (fused Adam with dense-Adam semantics,
# L2 on the rows each batch uses, PyTorch's DNN init, embedding init N(0, 1e-2), monitor AUC - logloss):
#   adam                     the default
#   lazy_adam                Adam on the touched rows only (torch.optim.SparseAdam semantics)
#   dense                    dense gradients + torch Adam, L2 on the used rows
#   dense-l2table            dense gradients + torch Adam, L2 on the whole table (FuxiCTR)
#   dense-l2table-xavier     ... and Xavier-normal DNN init (FuxiCTR; the plain-PyTorch recipe)
#   adam-xavier              Xavier-normal DNN init
#   adam-init1e-4            embedding init N(0, 1e-4) (FuxiCTR)
#   adam-monitor-auc         early stopping on validation AUC alone
# The rest is quality.sh's protocol (BARS hyper-parameters). One metrics JSON per run in $OUT, then
# benchmarks/results/quality_ablation.{json,_table.md} via quality_table.py.
# Usage: benchmarks/quality_ablation.sh [DATA_DIR]   env SEEDS="2021 2022 2023" OUT=dir JOBS=2 VARIANTS="..."
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-$(cd .. && pwd)/shared/data}
OUT=${OUT:-benchmarks/results/quality_ablation_runs}
SEEDS=${SEEDS:-"2021 2022 2023"}
JOBS=${JOBS:-2}
VARIANTS=${VARIANTS:-"adam lazy_adam dense dense-l2table dense-l2table-xavier adam-xavier adam-init1e-4 adam-monitor-auc"}
export OMP_WAIT_POLICY=PASSIVE
if [ ! -f "$DATA/frappe/frappe.validation.libfm" ] || [ ! -f "$DATA/sparrow_movielens/samples.csv" ]; then
  echo "quality_ablation.sh: real data not found under $DATA; skipping" >&2
  exit 0
fi
mkdir -p "$OUT"
COMMON="--model deepfm --embedding-dim 10 --lr 1e-3 --epochs 100 --patience 2 --hidden-units 400,400,400 --batch-norm
        --precise-bn-batches 16 --no-progress --threads 1"
FRAPPE="--format libfm --train $DATA/frappe/frappe.validation.libfm --valid-fraction 0.1 --test $DATA/frappe/frappe.test.libfm
        --dropout 0.2 --l2-embedding 0.05"
MOVIELENS="--format csv --schema sparrow_movielens --train $DATA/sparrow_movielens/samples.csv --split ordered
           --split-by timestamp --test-fraction 0.2 --valid-fraction 0.1 --dropout 0.3 --l2-embedding 0.01 --batch-size 4096"
variant_flags() {
  case "$1" in
    adam) echo "--table-optimizer adam" ;;
    lazy_adam) echo "--table-optimizer lazy_adam" ;;
    dense) echo "--table-optimizer dense" ;;
    dense-l2table) echo "--table-optimizer dense --l2-scope table" ;;
    dense-l2table-xavier) echo "--table-optimizer dense --l2-scope table --dnn-init xavier_normal" ;;
    adam-xavier) echo "--table-optimizer adam --dnn-init xavier_normal" ;;
    adam-init1e-4) echo "--table-optimizer adam --init-std 1e-4" ;;
    adam-monitor-auc) echo "--table-optimizer adam --monitor auc" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}
jobs_file=$(mktemp)
for seed in $SEEDS; do
  for variant in $VARIANTS; do
    flags=$(variant_flags "$variant")
    # Unquoted: the flag lists' newlines become spaces, one command per line.
    echo python -m deepfm_fast train $FRAPPE --batch-size 1024 $COMMON $flags --seed $seed \
      --metrics-out "$OUT/frappe-b1024_${variant}_$seed.json" >> "$jobs_file"
    echo python -m deepfm_fast train $FRAPPE --batch-size 4096 $COMMON $flags --seed $seed \
      --metrics-out "$OUT/frappe-b4096_${variant}_$seed.json" >> "$jobs_file"
    echo python -m deepfm_fast train $MOVIELENS $COMMON $flags --seed $seed \
      --metrics-out "$OUT/movielens_${variant}_$seed.json" >> "$jobs_file"
  done
done
# Runs are independent and single-threaded: JOBS at a time. Each writes its own JSON (and PNG).
tr '\n' '\0' < "$jobs_file" | xargs -0 -P "$JOBS" -I{} sh -c '{} > /dev/null 2>&1 || { echo "failed: {}" >&2; exit 255; }'
rm -f "$jobs_file"
rm -f "$OUT"/*.png  # the learning curves of each run: not kept
python benchmarks/quality_table.py "$OUT" quality_ablation
