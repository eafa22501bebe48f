"""``ppflower curve``: h_θ's learning curve under the authors' recipe, its figures and its provenance.

The training and the measurements are pp_flower.curve; this module loads what it needs, records how the curve was
made (command, commit, machine, ψ and observer) and draws the figure and the Fig. 5-style image grid after each run.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from experiments.reproduce import PAPER_ACCURACY, git_commit, machine, portable
from pp_flower.errors import PPFlowerError

PAPER_PSNR = (5.4, 6.0)  # the paper's protected PSNR (Fig. 7) across its α: saturated, negative-like images
GRID_POINTS = 6


def _classifier_record(path: Path) -> dict:
    """What a curve needs to say about a classifier: its file and, when beside it, its recipe and test accuracy."""
    record = {"checkpoint": portable(str(Path(path).resolve()))}
    metrics = Path(path).parent / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        record.update({"test-accuracy": m.get("test-accuracy"), "recipe": m.get("config")})
    return record


def run(classifier: Path, observer: Path | None, cfg, steps: int, out: Path, workdir: Path, data_dir=None,
        vgg_weights=None, device: str = "cpu", log=print, max_seconds: float | None = None) -> dict:
    """Train or resume one curve, then redraw ``out/fig_curve.png`` and ``out/fig_grid.png``; returns curve.json."""
    from pp_flower.checkpoints import ensure_writable_dir, load_classifier
    from pp_flower.curve import run_curve
    from pp_flower.data import load_splits
    from pp_flower.features import load_feature_net
    from pp_flower.models import check_image_size

    ensure_writable_dir(out, "--out")
    ensure_writable_dir(workdir, "--workdir")
    psi, psi_blob = load_classifier(classifier)
    if psi_blob.get("baseline"):
        raise PPFlowerError(f"{classifier} is a ψ for {psi_blob['baseline']}-encrypted images; the curve needs ψ "
                            "trained on plain images (`ppflower train-classifier` without --baseline).")
    obs = load_classifier(observer)[0] if observer else None
    splits = load_splits(data_dir)
    check_image_size(tuple(splits.train.images.shape[-2:]), cfg.unet_depth, "The images (for h_θ, --unet-depth)")
    phi = load_feature_net(vgg_weights)
    provenance = {"command": portable(shlex.join(["ppflower", *sys.argv[1:]])), "commit": git_commit(),
                  "machine": machine(), "classifier": _classifier_record(classifier),
                  "observer": _classifier_record(observer) if observer else None}
    curve = run_curve(splits, psi, obs, phi, cfg, steps, out, workdir, device, provenance, log, max_seconds)
    draw(out, workdir, splits)
    return curve


def draw(out: Path, workdir: Path, splits) -> None:
    """The learning-curve figure of ``out/curve.json`` and the image grid of the run in ``workdir``."""
    from pp_flower.curve import GRID_IMAGES, load_grid
    from pp_flower.data import to_float
    from pp_flower.report import save_learning_curve, save_pairs_grid

    curve = json.loads((out / "curve.json").read_text())
    cfg = curve["config"]
    label = f"α = {cfg['alpha']:g}, width {cfg['unet_base']}"
    save_learning_curve({label: curve}, out / "fig_curve.png",
                        paper_accuracy=PAPER_ACCURACY.get(f"alpha{cfg['alpha']:g}", {}).get("resnet20"),
                        paper_psnr=PAPER_PSNR)
    grid, points = load_grid(workdir), curve["points"]
    picks = sorted({round(i * (len(points) - 1) / (GRID_POINTS - 1)) for i in range(GRID_POINTS)})
    plain = to_float(splits.val.images[:GRID_IMAGES])
    rows = [plain] + [to_float(grid[i]) for i in picks]
    labels = ["plain x"] + [f"x̂ at step {points[i]['step']}: ψ {100 * points[i]['psi-accuracy']:.1f} %, "
                            f"PSNR {points[i]['psnr-protected-median']:.1f} dB, observer "
                            f"{100 * points[i].get('observer-accuracy', float('nan')):.1f} %" for i in picks]
    save_pairs_grid(rows, labels, out / "fig_grid.png", title=f"h_θ along its training ({label})")
