"""Fourth process of the cpu-preset run: ψ on per-image-key images, the GAN and ψ on its images."""
import os
from pathlib import Path

import torch

from sims.reproduce import PRESETS, Reproduction

torch.set_num_threads(1)
r = Reproduction(PRESETS["cpu"], Path("results/cpu-helper2"), Path("runs/reproduce-cpu"),
                 os.environ["PPFLOWER_DATA_DIR"], os.environ["PPFLOWER_VGG_WEIGHTS"], "cpu", log=print)
r.classifier("resnet20", "pixel-per-image")
gan = r.gan()
r.classifier("resnet20", "gan", str(gan / "transform.pt"))
print("helper2 done")
