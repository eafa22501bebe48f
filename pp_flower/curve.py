"""A learning curve of h_θ under the authors' exact recipe: does the method work when given the steps?

The recipe is the authors' ``scripts/train_transformation_model.py`` (ito-hiroki/image_to_perturbation): SGD lr 0.1,
momentum 0.9, weight decay 5e-4, MultiStepLR ×0.2 at epochs 60/120/160 of 200, batch 128, random crop + flip, the
stratified 45k/5k split, PyTorch's default initialisation, ψ frozen in eval mode, and the checkpoint with the lowest
validation L_trans kept. A curve runs the first ``steps`` steps of that 200-epoch schedule (so the learning rate is
0.1 until step 60·352) and measures h_θ every ``eval_every`` steps on fixed validation images.

It trains through the in-process reference (:func:`pp_flower.transform.reference_step`, the same batches, seeds and
schedule as one user of the Flower app): tests/test_flower_app.py proves that path equal to the split protocol.

The run is one checkpoint dict (``last.pt``) rewritten at every measurement, and ``curve.json`` grows with each
point: rerunning the same command resumes, and a larger ``--steps`` extends a finished curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pp_flower.checkpoints import load_resume_point, save_atomic, transform_blob
from pp_flower.config import AppConfig
from pp_flower.data import Splits, to_float, user_shards
from pp_flower.errors import PPFlowerError
from pp_flower.losses import class_loss, feature_loss, transform_loss
from pp_flower.metrics import psnr, ssim
from pp_flower.progress import Bar
from pp_flower.transform import (init_transform_net, make_optimizer, reference_step, set_lr, steps_per_epoch,
                                 train_batch, user_seed)

PATH = "in-process reference (pp_flower.transform.reference_step; proven equal to the Flower app's split step)"
GRID_IMAGES = 8  # validation images whose x̂ is kept at every point, for the image grid


@dataclass
class CurveConfig:
    """The authors' recipe (defaults) and the curve's measurement settings."""

    alpha: float = 0.005
    unet_base: int = 16           # the authors: 64
    unet_depth: int = 4
    unet_arch: str = "paper"
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 200             # the schedule's length: lr × 0.2 at 30/60/80 % (the authors' 60/120/160)
    augment: bool = True
    seed: int = 0
    eval_every: int = 50
    eval_images: int = 1000
    precision: str = "fp32"       # fp32, or bf16 autocast in the training step (measurements are always fp32)
    wire: str = "uint8"           # what ψ sees in training: the 8-bit image (as in the app's default) or float32 x̂

    def app_config(self) -> AppConfig:
        cfg = AppConfig(alpha=self.alpha, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                        momentum=self.momentum, weight_decay=self.weight_decay, augment=self.augment,
                        unet_base=self.unet_base, unet_depth=self.unet_depth, unet_arch=self.unet_arch,
                        seed=self.seed, wire=self.wire)
        cfg.check()
        if self.precision not in ("fp32", "bf16"):
            raise PPFlowerError(f"--precision must be fp32 or bf16, got '{self.precision}'.")
        if self.eval_every < 1 or self.eval_images < 2:
            raise PPFlowerError("--eval-every must be ≥ 1 and --eval-images ≥ 2.")
        return cfg


def pairwise_rms(images: torch.Tensor) -> float:
    """Mean RMS distance between the images of different pairs ((N, C, H, W) in [0, 1]); near 0 = collapse."""
    flat = images.flatten(1).double()
    d = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    n = len(flat)
    return (d.sum() / (n * (n - 1))).item()


@torch.no_grad()
def measure(net: nn.Module, classifier: nn.Module, observer: nn.Module | None, feature_net: nn.Module,
            x: torch.Tensor, y: torch.Tensor, alpha: float, chunk: int = 250) -> tuple[dict[str, float], torch.Tensor]:
    """One curve point on validation images ``x`` (N, 3, H, W) in [0, 1] with labels ``y`` (N,); returns the
    metrics and x̂. h_θ in eval mode (running BatchNorm statistics), everything in fp32.

    ``psi-accuracy-8bit`` is ψ on round(255·x̂)/255, the image a user would store or send; PSNR and SSIM are medians
    over the images (dB; SSIM in [−1, 1], negative = structure inverted, as in a colour negative).
    """
    net.eval()
    xhat = torch.cat([net(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    q = torch.round(xhat * 255) / 255
    logits = torch.cat([classifier(xhat[i:i + chunk]) for i in range(0, len(x), chunk)])
    logits_q = torch.cat([classifier(q[i:i + chunk]) for i in range(0, len(x), chunk)])
    l_class = class_loss(logits, y).item()
    l_feat = sum(feature_loss(feature_net(xhat[i:i + chunk]), feature_net(x[i:i + chunk])).item() * len(x[i:i + chunk])
                 for i in range(0, len(x), chunk)) / len(x)
    point = {
        "psi-accuracy": (logits.argmax(1) == y).float().mean().item(),
        "psi-accuracy-8bit": (logits_q.argmax(1) == y).float().mean().item(),
        "psnr-protected-median": psnr(xhat, x).median().item(),
        "ssim-protected-median": ssim(xhat, x).median().item(),
        "val-l-class": l_class,
        "val-l-feat": l_feat,
        "val-l-trans": transform_loss(torch.tensor(l_class), torch.tensor(l_feat), alpha).item(),
        "saturated-fraction": ((xhat < 1 / 255) | (xhat > 254 / 255)).float().mean().item(),
        "pairwise-rms": pairwise_rms(xhat),
    }
    if observer is not None:
        obs = torch.cat([observer(xhat[i:i + chunk]) for i in range(0, len(x), chunk)])
        point["observer-accuracy"] = (obs.argmax(1) == y).float().mean().item()
    return point, xhat


def run_curve(splits: Splits, classifier: nn.Module, observer: nn.Module | None, feature_net: nn.Module,
              cfg: CurveConfig, steps: int, out: Path, workdir: Path, device: str = "cpu",
              provenance: dict | None = None, log: Callable[[str], None] = print,
              max_seconds: float | None = None) -> dict:
    """Train h_θ for ``steps`` steps (resuming from ``workdir/last.pt``) and write ``out/curve.json``.

    ``curve.json`` holds the config, the provenance, the reference values on plain images and one point per
    ``eval_every`` steps (step 0 included). ``workdir`` gets ``last.pt`` (resume point, with the x̂ of
    :data:`GRID_IMAGES` validation images at every point) and ``best.pt`` (lowest validation L_trans, an h_θ
    checkpoint ``ppflower attack --transform`` takes). ``max_seconds`` bounds this call's wall time: training stops
    at the first step past it and takes a last point (rerun to go on). Raises PPFlowerError on a diverged loss.
    """
    deadline = time.monotonic() + max_seconds if max_seconds else math.inf
    app = cfg.app_config()
    out.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    train_images = splits.train_all.images
    shard = splits.train_ids[user_shards(len(splits.train_ids), 1, "iid", app.seed)[0]]
    spe = steps_per_epoch(len(shard), app.batch_size)
    seed = user_seed(app.seed, 0)
    n_eval = min(cfg.eval_images, len(splits.val))
    x_val = to_float(splits.val.images[:n_eval]).to(device)
    y_val = splits.val.labels[:n_eval].to(device)
    key = {**asdict(cfg), "n-train": len(shard), "n-eval": n_eval,
           "train-ids-head": splits.train_ids[:8].tolist(), "val-ids-head": splits.val_ids[:8].tolist()}

    net = init_transform_net(app.unet_base, app.unet_depth, app.seed, 0, app.unet_arch).to(device)
    opt = make_optimizer(net, app.lr, app.momentum, app.weight_decay)
    classifier, feature_net = classifier.to(device).eval(), feature_net.to(device).eval()
    observer = observer.to(device).eval() if observer is not None else None
    state = {"step": 0, "points": [], "grid": [], "best-val-l-trans": float("inf"), "best-step": None,
             "train-sums": [0.0, 0.0, 0], "wall-seconds": 0.0}
    last = workdir / "last.pt"
    if (blob := load_resume_point(last, "curve", key, "curve")) is not None:
        net.load_state_dict(blob["net"])
        opt.load_state_dict(blob["opt"])
        state = blob["state"]
        log(f"Resuming the curve from {last} at step {state['step']}")

    with torch.no_grad():
        reference = {"psi-accuracy-plain": (torch.cat([classifier(x_val[i:i + 250]) for i in range(0, n_eval, 250)])
                                            .argmax(1) == y_val).float().mean().item(),
                     "pairwise-rms-plain": pairwise_rms(x_val)}
        if observer is not None:
            reference["observer-accuracy-plain"] = (torch.cat([observer(x_val[i:i + 250])
                                                               for i in range(0, n_eval, 250)]).argmax(1)
                                                    == y_val).float().mean().item()

    def write_json() -> None:
        doc = {"config": asdict(cfg), "path": PATH, "device": device, "steps-per-epoch": spe,
               "n-train": len(shard), "n-eval": n_eval, "reference": reference,
               "best-step": state["best-step"], "best-val-l-trans": state["best-val-l-trans"],
               "wall-seconds": state["wall-seconds"], "provenance": provenance or {}, "points": state["points"]}
        tmp = out / ".curve.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(out / "curve.json")

    def point() -> None:
        started, sums = time.time(), state["train-sums"]
        p, xhat = measure(net, classifier, observer, feature_net, x_val, y_val, app.alpha)
        p = {"step": state["step"], "epoch": state["step"] / spe, "lr": opt.param_groups[0]["lr"],
             "train-l-class": sums[0] / sums[2] if sums[2] else None,
             "train-l-feat": sums[1] / sums[2] if sums[2] else None, **p,
             "wall-seconds": round(state["wall-seconds"], 1)}
        state["points"].append(p)
        state["grid"].append(torch.round(xhat[:GRID_IMAGES] * 255).to(torch.uint8).cpu())
        state["train-sums"] = [0.0, 0.0, 0]
        if p["val-l-trans"] < state["best-val-l-trans"]:
            state.update({"best-val-l-trans": p["val-l-trans"], "best-step": state["step"]})
            save_atomic(transform_blob(net, tuple(train_images.shape[-2:]), step=state["step"], curve=asdict(cfg)),
                        workdir / "best.pt")
        state["wall-seconds"] += time.time() - started
        save_atomic({"kind": "curve", "config": key, "net": net.state_dict(), "opt": opt.state_dict(),
                     "state": state}, last)
        write_json()
        log(f"step {p['step']:>6}  ψ {100 * p['psi-accuracy']:5.1f} %  PSNR {p['psnr-protected-median']:5.2f} dB  "
            f"SSIM {p['ssim-protected-median']:.3f}  observer "
            f"{100 * p.get('observer-accuracy', float('nan')):5.1f} %  saturated {100 * p['saturated-fraction']:4.1f} %"
            f"  pairwise {p['pairwise-rms']:.3f}  L_class {p['val-l-class']:.3f}  L_feat {p['val-l-feat']:.3f}")

    if not state["points"]:
        point()
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())
    with Bar(f"h_θ curve (α = {cfg.alpha:g}, width {cfg.unet_base})", total=max(steps - state["step"], 0)) as bar:
        while state["step"] < steps and time.monotonic() < deadline:
            started = time.time()
            step = state["step"]
            ids, x = train_batch(train_images, shard, step, spe, app.batch_size, seed, app.augment)
            set_lr(opt, step // spe, app.epochs, app.lr)
            with autocast:
                l_class, l_feat = reference_step(net, opt, classifier, feature_net, x.to(device),
                                                 splits.train_all.labels[ids].to(device), app.alpha,
                                                 wire=app.wire)
            if not (math.isfinite(l_class) and math.isfinite(l_feat)):
                raise PPFlowerError(f"h_θ diverged at step {step + 1} (L_class {l_class}, L_feat {l_feat}); the "
                                    f"last resume point ({last}) is kept.")
            sums = state["train-sums"]
            state["train-sums"] = [sums[0] + l_class, sums[1] + l_feat, sums[2] + 1]
            state["step"] = step + 1
            state["wall-seconds"] += time.time() - started
            bar.advance()
            if state["step"] % cfg.eval_every == 0 or state["step"] == steps:
                point()
    if state["points"][-1]["step"] != state["step"]:
        point()
    write_json()
    return json.loads((out / "curve.json").read_text()) | {"grid": state["grid"]}


def load_grid(workdir: Path) -> list[torch.Tensor]:
    """The x̂ (uint8, (GRID_IMAGES, 3, H, W)) kept at every curve point of the run in ``workdir``."""
    blob = torch.load(Path(workdir) / "last.pt", map_location="cpu", weights_only=True)
    return blob["state"]["grid"]
