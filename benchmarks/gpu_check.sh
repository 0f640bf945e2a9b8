#!/usr/bin/env bash
# Every GPU check in one run (CI has no GPU): the CUDA test module, the 1024-token forward-mode
# memory check under a 4 GiB working budget, and the benchmark matrix on CUDA.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default: benchmarks/results/cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/cuda}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" | tail -5
python3 -m benchmarks.long_prompt --device cuda --n-pos 1024 --memory-budget-gib 4 \
    | tee "$out/long_prompt.json"
python3 -m benchmarks.run --device cuda --out "$out"
