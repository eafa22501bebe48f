"""Third process of the cpu-preset run: the ITN-Attack stages of the rows whose targets exist, in parallel
with the main process's remaining ψ/GAN stages (the main process skips stages found finished)."""
import os
import time
from pathlib import Path

import torch

from pp_flower.attack import network_target
from pp_flower.baselines import BASELINES
from pp_flower.checkpoints import load_transform_net
from sims.reproduce import ALPHAS, BASELINE_KEYS, PRESETS, Reproduction

torch.set_num_threads(1)
r = Reproduction(PRESETS["cpu"], Path("results/cpu-helper-attacks"), Path("runs/reproduce-cpu"),
                 os.environ["PPFLOWER_DATA_DIR"], os.environ["PPFLOWER_VGG_WEIGHTS"], "cpu", log=print)
for baseline in ("tanaka", "pixel", "pixel-per-image"):
    r.attack(baseline, BASELINES[baseline](BASELINE_KEYS[baseline]))
for alpha in ALPHAS:
    run_dir = Path(f"runs/reproduce-cpu/transform-resnet20-a{alpha:g}")
    while not (run_dir / "run.json").exists():
        time.sleep(10)
    r.attack(f"alpha{alpha:g}", network_target(load_transform_net(run_dir / "user-0" / "best.pt")[0]))
print("attack helper done")
