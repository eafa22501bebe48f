"""Fifth process of the cpu-preset run: the ITN-Attack on the GAN-based transformation's generator."""
import os
from pathlib import Path

import torch

from pp_flower.attack import network_target
from pp_flower.checkpoints import load_transform_net
from sims.reproduce import PRESETS, Reproduction

torch.set_num_threads(1)
r = Reproduction(PRESETS["cpu"], Path("results/cpu-helper-attack-gan"), Path("runs/reproduce-cpu"),
                 os.environ["PPFLOWER_DATA_DIR"], os.environ["PPFLOWER_VGG_WEIGHTS"], "cpu", log=print)
r.attack("gan", network_target(load_transform_net(Path("runs/reproduce-cpu/gan/transform.pt"))[0]))
print("gan attack done")
