#!/usr/bin/env bash
# GPU readiness in one command, under 8 minutes on one H100/H200-class GPU (installs nothing; needs the `test`
# extra for transformers). Four checks, each under its own time limit, then which of them ran:
#   train     GPT-2 small (124M, block 1024, bf16, torch.compile), lm_lightning's Trainer against a plain PyTorch
#             loop on the same synthetic batches: tokens/s and MFU against the GPU's datasheet bf16 peak
#   lora      a Qwen3-0.6B-shaped random folder, full fine-tuning against LoRA r=8 (base in bf16), block 256,
#             batch 8: tokens/s, max_memory_allocated, checkpoint size
#   generate  a 124M GPT-2-shaped model, ours against transformers' generate: decode tokens/s at batch 1 and 32
#   serve     `lm-lightning serve` of a 124M-shaped model on the GPU: 1 to 32 streaming clients, tokens/s
#
#   bash benchmarks/gpu_check.sh                  # from the project root, in the project's environment
#   CHECKS="train lora" bash benchmarks/gpu_check.sh   # some of them
# Each check's output goes to stdout and, where OUT is set (the device tool's folder), to $OUT/<check>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 1
LOG=${OUT:-$(mktemp -d)}
mkdir -p "$LOG"
declare -A STATUS

check() {  # check NAME SECONDS COMMAND...: run it under a time limit, keep its output, note how it ended
  local name=$1 limit=$2
  shift 2
  case " ${CHECKS:-train lora generate serve} " in *" $name "*) ;; *) STATUS[$name]="skipped"; return ;; esac
  echo "== $name (at most ${limit} s)"
  PYTHONUNBUFFERED=1 timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v "Warning" | tee "$LOG/$name.txt"  # kept if timed out
  local rc=${PIPESTATUS[0]}
  case $rc in 0) STATUS[$name]="ran" ;; 124|137) STATUS[$name]="timed out after ${limit} s" ;; *) STATUS[$name]="failed (exit $rc)" ;; esac
}

check train 180 "$PY" benchmarks/train_throughput.py --device cuda --shapes gpt2-small --precisions bf16-mixed \
  --compile_only --steps "${STEPS:-100}" --repeats 1
check lora 150 "$PY" benchmarks/lora.py --part speed --shape qwen3-0.6b --accelerator gpu --precision bf16-mixed --steps 30
check generate 60 "$PY" benchmarks/generate_speed.py --device cuda --batch_sizes 1 32 --repeats 3 \
  --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --vocab_size 50257
check serve 90 "$PY" benchmarks/serve_load.py --shape 124m --device cuda --max_tokens 32 --requests_per_client 2 --bounded 0

echo "== checks"
for name in train lora generate serve; do echo "$name: ${STATUS[$name]}"; done | tee "$LOG/checks.txt"
! grep -qv ": ran$\|: skipped$" "$LOG/checks.txt"  # the exit status: 1 if a check failed or timed out
