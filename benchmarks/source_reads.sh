#!/bin/bash
# How many times one `fit --model.init_from FOLDER` of one step opens each file of its source (strace's openat).
#   bash benchmarks/source_reads.sh path/to/transformers-folder path/to/corpus.txt
set -euo pipefail
folder=$(realpath "$1"); corpus=$(realpath "$2"); root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"
MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db" LM_LIGHTNING_CACHE="$work/cache" strace -f -e trace=openat -o "$work/trace" \
  "$(dirname "$(command -v python)")/python" -m lm_lightning.cli fit --config "$root/conf/finetune.yaml" --model.init_from "$folder" \
  --data.path "$corpus" --trainer.max_steps 1 --trainer.val_check_interval 1 --trainer.limit_val_batches 1 \
  --samples.prompts '[]' --trainer.enable_progress_bar false --trainer.logger.init_args.log_model false > "$work/fit.log" 2>&1
for f in "$folder"/*; do
  echo "$(basename "$f") $(grep -F "\"$f\"" "$work/trace" | grep -vc ENOENT || true)"
done
