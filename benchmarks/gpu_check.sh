#!/usr/bin/env bash
# GPU readiness in one command (under 8 minutes on one H100/H200-class GPU; installs nothing):
# trains GPT-2 small (124M, block 1024, bf16, torch.compile) for 200 steps on synthetic tokens,
# through lm_lightning's Trainer and through a plain PyTorch loop on the same batches, and prints
# tokens/s, MFU against the GPU's datasheet bf16 peak, and the ratio of the two.
#
#   bash benchmarks/gpu_check.sh            # from the project root, in the project's environment
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(0), torch.__version__)"
"$PY" benchmarks/train_throughput.py --device cuda --shapes gpt2-small --precisions bf16-mixed \
  --compile_only --steps "${STEPS:-200}" --repeats 1
