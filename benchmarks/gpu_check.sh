#!/usr/bin/env bash
# Every GPU check in one run (CI has no GPU), sized for about 10 minutes on one GPU: the CUDA test
# module, the ratio matrix at 128 tokens on CUDA, and the scale cases (1B- and 7B-shaped random
# LLaMAs in bfloat16 at 2048 tokens: run_with_cache, all heads, graph, contrastive graph; seconds
# and peak GPU memory, each case under a time limit).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default: benchmarks/results/cuda)
#        bash benchmarks/gpu_check.sh --cpu-smoke (the same scripts on a tiny model, on the CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  python3 -m benchmarks.scale --cpu-smoke --out "${TMPDIR:-/tmp}/scale_smoke.md"
  exit 0
fi
out="${1:-benchmarks/results/cuda}"
mkdir -p "$out"
python3 -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log" | tail -5
python3 -m benchmarks.run --device cuda --quick --out "$out"
python3 -m benchmarks.scale --device cuda --dtype bfloat16 --n-pos 2048 --timeout 90 \
    --out "$out/scale.md"
