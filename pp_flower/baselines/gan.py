"""GAN-based image transformation (Sirichotedumrong & Kiya, EUSIPCO 2020, arXiv:2006.01342).

A U-Net generator G turns a plain image into a visually protected one with no key at use time; ψ is then
trained on G's outputs. G is trained as a conditional GAN (the pix2pix objective the paper builds on): a
PatchGAN discriminator D sees (plain image, protected image) pairs, the "real" protected image being the
plain image encrypted with pixel-based encryption (negative–positive transform + colour shuffling), so G
learns to produce encryption-like images without anyone managing keys:

    L_D = BCE(D(x, E(x)), 1) + BCE(D(x, G(x)), 0)
    L_G = BCE(D(x, G(x)), 1) + λ · ‖G(x) − E(x)‖₁            (λ = 100 as in pix2pix)

Our reading of the paper's description: the target encryption (``target``) and λ are configurable and
reported with the results. A keyed pixel-wise encryption differs from position to position, which
convolutions alone cannot express, so G is a U-Net that also sees a learned positional map
(:class:`~pp_flower.models.PositionalUNet`); the key ends up in G's weights, no key is needed at use time.
Training is resumable (``last.pt``, pp_flower.training); the result is a
``transform_net`` checkpoint, so ``ppflower attack --transform`` and ``protect`` take it like any h_θ.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pp_flower.checkpoints import save_atomic, transform_blob
from pp_flower.data import Splits, augment, to_float
from pp_flower.errors import PPFlowerError
from pp_flower.models import PositionalUNet
from pp_flower.seeds import derive_seed
from pp_flower.training import Job, fit


@dataclass
class GanConfig:
    epochs: int = 200
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    l1_weight: float = 100.0       # λ
    unet_base: int = 16
    unet_depth: int = 4
    unet_arch: str = "paper"
    pos_channels: int = 8          # channels of G's learned positional map
    target: str = "pixel"          # the encryption whose outputs D treats as real: pixel | pixel-per-image
    key: int = 0                   # that encryption's key (only used for training; G itself has no key)
    seed: int = 0

    def __post_init__(self) -> None:
        import math

        checks = (("epochs", self.epochs >= 1, "≥ 1"), ("batch-size", self.batch_size >= 1, "≥ 1"),
                  ("lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
                  ("beta1", math.isfinite(self.beta1) and 0 <= self.beta1 < 1, "in [0, 1)"),
                  ("l1-weight", math.isfinite(self.l1_weight) and self.l1_weight >= 0, "a finite number ≥ 0"),
                  ("unet-base", self.unet_base >= 4, "≥ 4"), ("unet-depth", 1 <= self.unet_depth <= 6, "1…6"),
                  ("pos-channels", self.pos_channels >= 1, "≥ 1"), ("key", self.key >= 0, "≥ 0"),
                  ("seed", self.seed >= 0, "≥ 0"), ("target", self.target in ("pixel", "pixel-per-image"),
                                                    "pixel or pixel-per-image"))
        for name, ok, allowed in checks:
            if not ok:
                raise PPFlowerError(f"--{name} must be {allowed}, got {getattr(self, name.replace('-', '_'))!r}.")


class PatchDiscriminator(nn.Module):
    """PatchGAN: one real/fake logit per overlapping patch of the (plain, protected) pair."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(6, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(4 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * width, 1, 3, 1, 1),
        )

    def forward(self, plain: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([plain, protected], 1))


def target_encryption(cfg: GanConfig):
    from pp_flower.baselines.pixel import PixelEncryption

    if cfg.target not in ("pixel", "pixel-per-image"):
        raise PPFlowerError(f"GAN target must be pixel or pixel-per-image, got '{cfg.target}'.")
    return PixelEncryption(cfg.key, per_image=cfg.target == "pixel-per-image")


def _adv(logits: torch.Tensor, real: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


def train_gan_transform(splits: Splits, out_dir: str | Path, cfg: GanConfig, device: str = "cpu", log=print) -> dict:
    """Train G (and D); write ``transform.pt`` (G as a transform_net checkpoint) and ``metrics.json``."""
    from pp_flower.checkpoints import describe_changes, ensure_writable_dir, key_changes
    from pp_flower.models import check_image_size, check_square, check_trainable
    from pp_flower.training import data_key

    hw = tuple(splits.train.images.shape[-2:])
    check_square(hw)
    check_image_size(hw, cfg.unet_depth, "The images (for the generator's U-Net)")
    check_trainable("unet", hw, cfg.batch_size, len(splits.train), "the GAN's generator", cfg.unet_depth)
    out = ensure_writable_dir(out_dir, "--out")
    done = out / "metrics.json"
    # what defines the generator: its settings and the images it learnt from (train-gan uses no val/test images)
    key = {**asdict(cfg), **data_key(splits, ("train",))}
    if done.exists():
        old = json.loads(done.read_text())
        # metrics.json before 0.3 had no key: its config and n-train stand in (its images cannot be checked)
        old_key = old.get("key") or {**old.get("config", {}), "n-train": old.get("n-train")}
        changed, _ = key_changes(old_key, key)
        if not changed:
            log(f"{done} exists for this configuration and data; skipping (delete it to retrain)")
            return old
        raise PPFlowerError(f"{out} holds a generator trained with other settings or data ("
                            f"{describe_changes(old_key, key, changed)}); use another --out, or delete {done} to "
                            "retrain.")
    torch.manual_seed(derive_seed(cfg.seed, "gan-init"))
    size = hw[-1]
    generator = PositionalUNet(cfg.unet_base, cfg.unet_depth, cfg.pos_channels, size, arch=cfg.unet_arch).to(device)
    discriminator = PatchDiscriminator().to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    encryption = target_encryption(cfg)
    train = splits.train.images

    def step(idx: torch.Tensor, g: torch.Generator) -> dict[str, float]:
        plain_u8 = augment(train[idx], g)
        plain = to_float(plain_u8).to(device)
        real = to_float(encryption.encrypt(plain_u8, splits.train_ids[idx])).to(device)
        fake = generator(plain)
        loss_d = _adv(discriminator(plain, real), True) + _adv(discriminator(plain, fake.detach()), False)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        adv, l1 = _adv(discriminator(plain, fake), True), F.l1_loss(fake, real)
        opt_g.zero_grad(set_to_none=True)
        (adv + cfg.l1_weight * l1).backward()
        opt_g.step()
        return {"loss-d": loss_d.item(), "loss-g-adv": adv.item(), "loss-g-l1": l1.item()}

    job = Job(kind="gan_state", config=key, modules={"generator": generator, "discriminator": discriminator},
              optimizers={"opt_g": opt_g, "opt_d": opt_d}, step=step, validate=None, save_best=None,
              n_train=len(train), epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, desc="GAN")
    progress = fit(job, out, log=log)

    save_atomic(transform_blob(generator.cpu().eval(), baseline="gan", config=asdict(cfg)), out / "transform.pt")
    metrics = {"config": asdict(cfg), "key": key, "history": progress["history"], "n-train": len(train),
               "wall-seconds-this-session": progress["wall-seconds-this-session"],
               "transform": str(out / "transform.pt")}
    done.write_text(json.dumps(metrics, indent=2))
    log(f"GAN-based transformation → {out / 'transform.pt'}")
    return metrics
