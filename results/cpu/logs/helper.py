"""Second process of the cpu-preset run: the baseline ψ stages (and the GAN), in parallel with the α stages."""
import os
from pathlib import Path

import torch

from sims.reproduce import PRESETS, Reproduction

torch.set_num_threads(1)
r = Reproduction(PRESETS["cpu"], Path("results/cpu-helper"), Path("runs/reproduce-cpu"),
                 os.environ["PPFLOWER_DATA_DIR"], os.environ["PPFLOWER_VGG_WEIGHTS"], "cpu", log=print)
for baseline in ("tanaka", "pixel", "pixel-per-image"):
    r.classifier("resnet20", baseline)
gan = r.gan()
r.classifier("resnet20", "gan", str(gan / "transform.pt"))
print("helper done")
