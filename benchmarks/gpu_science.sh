#!/usr/bin/env bash
# One GPU run that settles "budget or method" (issue 25), in ≤ 9 minutes on one H200:
#   1. ψ = ResNet-20 with a fast recipe (one-cycle, bf16 autocast, channels-last; target ≥ 91 %), and an observer
#      (a second ResNet-20, seed 1) that measures how recognisable x̂ is;
#   2. h_θ at the paper's width 64 with the authors' exact recipe (SGD lr 0.1, batch 128, 200-epoch step schedule,
#      α = 0.005) for as many steps as the remaining budget allows, writing the same learning curve as
#      `ppflower curve` on the CPU;
#   3. the ITN-Attack and the stronger attacker (MSE + VGG16 features) on the selected h_θ.
# Everything lands in $OUT (default runs/gpu_science/out): psi/, observer/ metrics, curve/ (curve.json,
# fig_curve.png, fig_grid.png), attack/ (summary.json, fig7_psnr_boxplot.png) and science.json (timings, device).
#
#   PPFLOWER_DATA_DIR=… PPFLOWER_VGG_WEIGHTS=… benchmarks/gpu_science.sh
#   benchmarks/gpu_science.sh --dry     # the same steps on CPU at tiny sizes (CI runs this)
# BUDGET_S (default 540) is the whole script's wall budget; the curve gets what ψ, the observer and the attacks
# (ATTACK_RESERVE_S, default 200 s) leave. Resumable: rerunning continues every stage from its resume point in $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
for arg in "$@"; do
  case "$arg" in
    --dry) dry=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$arg' (expected --dry)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-runs/gpu_science/out}"
WORK="${WORK:-runs/gpu_science/work}"
BUDGET_S="${BUDGET_S:-540}"
mkdir -p "$OUT" "$WORK"
start=$SECONDS

if [ "$dry" = 1 ]; then
  device=cpu
  psi=(--epochs 1 --batch-size 64 --limit-train 512 --limit-eval 200)
  observer=(--epochs 1 --batch-size 64 --limit-train 512 --limit-eval 200)
  curve=(--unet-base 4 --batch-size 16 --steps 6 --eval-every 3 --eval-images 32 --precision fp32)
  attack=(--epochs 1 --unet-base 4 --batch-size 64 --limit-train 128 --limit-eval 64)
  attack_reserve=0
else
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
 'error: no CUDA device visible; run on a GPU machine, or pass --dry')"
  device=cuda
  # ResNet-20 in ~2 min: one-cycle to lr 0.4 at batch 512, label smoothing; checkpoints only at epoch ends
  psi=(--epochs 60 --batch-size 512 --lr 0.4 --schedule onecycle --label-smoothing 0.1 --fast --checkpoint-every 0)
  observer=(--epochs 15 --batch-size 512 --lr 0.4 --schedule onecycle --label-smoothing 0.1 --fast --seed 1
            --checkpoint-every 0)
  curve=(--unet-base 64 --batch-size 128 --steps 70400 --eval-every 200 --eval-images 1000 --precision bf16)
  attack=(--epochs 10 --unet-base 64 --batch-size 128 --limit-train 20000)   # three attackers, fp32
  attack_reserve="${ATTACK_RESERVE_S:-200}"   # seconds kept for the attackers
fi

stage() { echo "== $1 ($((SECONDS - start)) s into the run)"; }

stage "ψ"
ppflower train-classifier --model resnet20 "${psi[@]}" --out "$WORK/psi" --device "$device"
stage "observer"
ppflower train-classifier --model resnet20 "${observer[@]}" --out "$WORK/observer" --device "$device"

stage "h_θ curve"
left=$(( BUDGET_S - (SECONDS - start) - attack_reserve ))
minutes=$(python -c "print(max($left, 30) / 60)")
[ "$dry" = 1 ] && minutes=0
ppflower curve --classifier "$WORK/psi/best.pt" --observer "$WORK/observer/best.pt" --alpha 0.005 "${curve[@]}" \
  --max-minutes "$minutes" --out "$OUT/curve" --workdir "$WORK/curve" --device "$device"

stage "attacks"
ppflower attack --transform "$WORK/curve/best.pt" --strong "${attack[@]}" --out "$OUT/attack" --device "$device"

stage "summary"
cp "$WORK/psi/metrics.json" "$OUT/psi-metrics.json"
cp "$WORK/observer/metrics.json" "$OUT/observer-metrics.json"
python - "$OUT" "$((SECONDS - start))" "$device" "$dry" <<'EOF'
import json, sys
from pathlib import Path

import torch

out, seconds, device, dry = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
curve = json.loads((out / "curve" / "curve.json").read_text())
best = next(p for p in curve["points"] if p["step"] == curve["best-step"])
summary = {
    "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (--dry: tiny sizes, numbers meaningless)",
    "dry": dry, "wall-seconds": seconds,
    "psi-test-accuracy": json.loads((out / "psi-metrics.json").read_text())["test-accuracy"],
    "observer-test-accuracy": json.loads((out / "observer-metrics.json").read_text())["test-accuracy"],
    "curve-steps": curve["points"][-1]["step"], "curve-epochs": curve["points"][-1]["epoch"],
    "selected-step": curve["best-step"], "selected-point": best,
    "attacks": json.loads((out / "attack" / "summary.json").read_text()),
}
(out / "science.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if k not in ("selected-point", "attacks")}, indent=1))
EOF
echo "wrote $OUT/science.json"
