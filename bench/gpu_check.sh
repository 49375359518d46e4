#!/usr/bin/env bash
# The checks that need a GPU, in under 8 minutes on one (each step has its own time limit):
#   1. the memory planner against the GPU: bench/memory.py's estimate beside the CUDA caching allocator's
#      measured peak (torch.cuda.max_memory_allocated) for a few SD 1.5 training steps (ours at 256 px batch 8
#      and 512 px batch 4, with 8-bit AdamW, and diffusers' fp32 settings at batch 1);
#   2. ours vs diffusers' train_controlnet step, samples/s at 256 and 512 px in bf16 (batch 8), with the
#      fraction of the GPU's bf16 peak each reaches (bench/train_step.py's table).
#
#   bash bench/gpu_check.sh                      # on a machine with a CUDA GPU
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh  # the same commands on the CPU with the tiny model (~1 minute)
#
# PYTHON selects the interpreter (default .venv/bin/python). The output is plain text for the README.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TINY_CONFIG=tests/data/reference/tiny/config.yaml

if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
  echo "== dry run on the CPU (tiny model): the commands of the GPU check, not its figures"
  timeout 300 "$PYTHON" -m bench.memory --check-device cpu --config "$TINY_CONFIG" --resolution 64
  timeout 300 "$PYTHON" -m bench.train_step --preset cpu --size tiny --resolution 64 --batch 2 --precision bf16 \
    --no-checkpointing --warmup 1 --steps 2
  exit 0
fi

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: use GPU_CHECK_DRY_RUN=1')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

echo "== 1. memory planner: estimate vs measured peak (allocated), SD 1.5"
timeout 200 "$PYTHON" -m bench.memory --check-device cuda

echo "== 2. ours vs diffusers' train_controlnet: samples/s and fraction of bf16 peak, SD 1.5, bf16"
timeout 260 "$PYTHON" -m bench.train_step --preset gpu --resolution 256 512 --batch 8 --no-max-batch \
  --no-encode-images --warmup 2 --steps 5
