"""The ITN-Attack (Sec. III-D, IV-B): h_θ has no key and may be public, so anyone can make exact pairs
(h_θ(x), x) and train an inverse-transformation network that estimates x from x̂.

The attacker is a U-Net (same family and width options as h_θ) trained with MSE on pairs built from the
training images with random horizontal flips only, the paper's SGD schedule and best-validation-loss
selection; it is evaluated on the test images. ``perceptual > 0`` adds a VGG16 relu2_2 feature term to the
attacker's loss — a stronger attacker than the paper's, reported beside it.
Resumable: ``last.pt`` is written every ``checkpoint_every`` steps; rerunning continues from it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from pp_flower.checkpoints import load_checkpoint, load_resume_point, save_atomic
from pp_flower.data import Splits, to_float
from pp_flower.losses import lr_at
from pp_flower.metrics import psnr, ssim, summary
from pp_flower.models import UNet
from pp_flower.progress import track

Target = Callable[[torch.Tensor], torch.Tensor]  # plain [0, 1] images → protected images


@dataclass
class AttackConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    unet_base: int = 16
    unet_depth: int = 4
    perceptual: float = 0.0  # weight of the VGG16 relu2_2 feature loss (0 = the paper's MSE-only ITN)
    seed: int = 0
    checkpoint_every: int = 20


def network_target(net: nn.Module, device: str = "cpu") -> Target:
    """A transformation network (e.g. a user's h_θ) as an attack target."""
    net = net.to(device).eval()

    @torch.no_grad()
    def target(x: torch.Tensor) -> torch.Tensor:
        return net(x.to(device))

    return target


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(len(x), generator=g) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def _val_loss(estimator: nn.Module, target: Target, images: torch.Tensor, device: str, chunk: int = 500) -> float:
    estimator.eval()
    total = 0.0
    for idx in torch.split(torch.arange(len(images)), chunk):
        x = to_float(images[idx]).to(device)
        total += F.mse_loss(estimator(target(x)), x, reduction="sum").item()
    return total / (len(images) * images[0].numel())


def train_attack(target: Target, splits: Splits, out_dir: str | Path, cfg: AttackConfig, device: str = "cpu",
                 name: str = "target", log=print) -> dict:
    """Train the inverse network on (target(x), x), keep the best on validation, evaluate on test."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "attack.json").exists():
        log(f"{out / 'attack.json'} exists; skipping (delete it to rerun)")
        return json.loads((out / "attack.json").read_text())
    torch.manual_seed(cfg.seed)
    in_channels = target(to_float(splits.train.images[:1]).to(device)).shape[1]  # e.g. 6 for Tanaka's encryption
    estimator = UNet(cfg.unet_base, cfg.unet_depth, in_channels=in_channels).to(device)
    opt = torch.optim.SGD(estimator.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    phi = None
    if cfg.perceptual > 0:
        from pp_flower.features import load_feature_net

        phi = load_feature_net(None, device=device)
    progress = {"epoch": 0, "step": 0, "best_val": float("inf"), "history": []}
    last = out / "last.pt"
    if (blob := load_resume_point(last, "attack_state", asdict(cfg), "attack")) is not None:
        estimator.load_state_dict(blob["state_dict"])
        opt.load_state_dict(blob["optimizer"])
        progress = blob["progress"]
        log(f"Resuming the attack on {name} from {last}: epoch {progress['epoch'] + 1}, step {progress['step']}")

    def checkpoint() -> None:
        save_atomic({"kind": "attack_state", "config": asdict(cfg), "state_dict": estimator.state_dict(),
                     "optimizer": opt.state_dict(), "progress": progress}, last)

    train = splits.train.images
    while progress["epoch"] < cfg.epochs:
        epoch = progress["epoch"]
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg.epochs, cfg.lr)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 10_007 + epoch))
        batches = list(torch.split(order, cfg.batch_size))
        estimator.train()
        steps = range(progress["step"], len(batches))
        for step in track(steps, f"ITN on {name}, epoch {epoch + 1}/{cfg.epochs}", total=len(steps)):
            g = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch * 100_003 + step)
            x = _flip(to_float(train[batches[step]]), g).to(device)
            estimate = estimator(target(x))
            loss = F.mse_loss(estimate, x)
            if phi is not None:
                with torch.no_grad():
                    fx = phi(x)
                loss = loss + cfg.perceptual * F.mse_loss(phi(estimate), fx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress["step"] = step + 1
            if cfg.checkpoint_every and progress["step"] % cfg.checkpoint_every == 0:
                checkpoint()
        val = _val_loss(estimator, target, splits.val.images, device)
        progress["history"].append({"epoch": epoch + 1, "val_mse": val})
        if val < progress["best_val"]:
            progress["best_val"] = val
            save_atomic({"kind": "inverse_net", "base": cfg.unet_base, "depth": cfg.unet_depth, "in_channels": in_channels,
                         "state_dict": estimator.state_dict(), "target": name, "epoch": epoch + 1}, out / "best.pt")
        log(f"ITN on {name}: epoch {epoch + 1} val MSE {val:.5f}")
        progress.update(epoch=epoch + 1, step=0)
        checkpoint()

    best = load_checkpoint(out / "best.pt", "inverse_net")
    estimator.load_state_dict(best["state_dict"])
    result = evaluate_attack(estimator, target, splits.test.images, device)
    result.update(target=name, config=asdict(cfg), history=progress["history"], n_train=len(train),
                  n_val=len(splits.val), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    (out / "attack.json").write_text(json.dumps(result, indent=2))
    save_attack_grid(estimator, target, splits.test.images[:8], out / "fig6.png", name, device)
    protected_median = result.get("psnr_protected", {}).get("median", float("nan"))
    log(f"ITN on {name}: median PSNR estimate {result['psnr_estimated']['median']:.2f} dB, "
        f"protected {protected_median:.2f} dB")
    return result


@torch.no_grad()
def evaluate_attack(estimator: nn.Module, target: Target, images: torch.Tensor, device: str = "cpu",
                    chunk: int = 500) -> dict:
    """Per-image PSNR and SSIM of estimated vs plain and of protected vs plain images, plus quartiles."""
    estimator.eval()
    values: dict[str, list[torch.Tensor]] = {"psnr_estimated": [], "psnr_protected": [], "ssim_estimated": [],
                                             "ssim_protected": []}
    for idx in torch.split(torch.arange(len(images)), chunk):
        x = to_float(images[idx]).to(device)
        protected = target(x).clamp(0, 1)
        estimate = estimator(protected)
        values["psnr_estimated"].append(psnr(estimate, x).cpu())
        values["ssim_estimated"].append(ssim(estimate, x).cpu())
        if protected.shape == x.shape:  # a 6-channel encryption has no PSNR to the RGB image
            values["psnr_protected"].append(psnr(protected, x).cpu())
            values["ssim_protected"].append(ssim(protected, x).cpu())
    per_image = {k: torch.cat(v) for k, v in values.items() if v}
    return {**{k: summary(v) for k, v in per_image.items()}, "per_image": {k: v.tolist() for k, v in per_image.items()}}


@torch.no_grad()
def save_attack_grid(estimator: nn.Module, target: Target, images: torch.Tensor, path: Path, name: str,
                     device: str = "cpu") -> Path:
    """The paper's Fig. 6: plain / protected / estimated images with each image's PSNR under it."""
    from pp_flower.report import save_pairs_grid

    estimator.eval()
    x = to_float(images).to(device)
    protected = target(x).clamp(0, 1)
    estimate = estimator(protected)
    shown = protected[:, :3] if protected.shape[1] != 3 else protected  # 6-channel encryptions: first 3 shown
    p_prot = psnr(protected, x).tolist() if protected.shape[1] == 3 else [float("nan")] * len(x)
    p_est = psnr(estimate, x).tolist()
    return save_pairs_grid([x.cpu(), shown.cpu(), estimate.cpu()], ["plain", "protected", "ITN estimate"], path,
                           captions=[[], [f"{v:.1f} dB" for v in p_prot], [f"{v:.1f} dB" for v in p_est]],
                           title=f"ITN-Attack on {name}")
