"""Report of the finished stages only (α = 0.1 still running): every other stage is found done and skipped."""
import os
from pathlib import Path

from sims.reproduce import reproduce

reproduce("cpu", Path("results/cpu"), Path("runs/reproduce-cpu"), os.environ["PPFLOWER_DATA_DIR"],
          os.environ["PPFLOWER_VGG_WEIGHTS"], "cpu", log=print, alphas=(0.0, 0.001, 0.005, 0.01, 0.05))
