#!/usr/bin/env bash
# One GPU, ≤ 8 minutes on an H100: the in-process loop vs the Flower app at the paper's width (U-Net 64, batch 128,
# 1 user), 8 users on 1/8-GPU shares, and one epoch of the paper's recipe (α = 0.005, lr 0.1) with a GPU-hours
# estimate for 200 epochs. Writes benchmarks/results_gpu.json (or $OUT/results_gpu.json when $OUT is set).
#   PPFLOWER_DATA_DIR=… PPFLOWER_VGG_WEIGHTS=… benchmarks/gpu_check.sh [--classifier psi.pt]
#   benchmarks/gpu_check.sh --dry      # rehearse the same script on CPU at tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks}/results_gpu.json"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or '--dry' in sys.argv else
 'no CUDA device visible: run on a GPU machine, or pass --dry')" "$@"
python benchmarks/bench_scale.py gpu --out "$out" "$@"
echo "wrote $out"
