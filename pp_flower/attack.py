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

from pp_flower.checkpoints import load_checkpoint, save_atomic
from pp_flower.data import Splits, to_float
from pp_flower.errors import PPFlowerError
from pp_flower.metrics import psnr, ssim, summary
from pp_flower.models import UNet
from pp_flower.seeds import derive_seed
from pp_flower.training import Job, SGDRecipe, fit

Target = Callable[[torch.Tensor], torch.Tensor]  # plain [0, 1] images → protected images


@dataclass
class AttackConfig(SGDRecipe):
    unet_base: int = 16
    unet_depth: int = 4
    unet_arch: str = "paper"
    perceptual: float = 0.0  # weight of the VGG16 relu2_2 feature loss (0 = the paper's MSE-only ITN)
    checkpoint_every: int = 20

    def __post_init__(self) -> None:
        import math

        super().__post_init__()
        for name, ok, allowed in (("unet-base", self.unet_base >= 4, "≥ 4"),
                                  ("unet-depth", 1 <= self.unet_depth <= 6, "between 1 and 6"),
                                  ("unet-arch", self.unet_arch in ("paper", "ours"), "paper or ours"),
                                  ("perceptual-weight", math.isfinite(self.perceptual) and self.perceptual >= 0,
                                   "a finite number ≥ 0"),
                                  ("checkpoint-every", self.checkpoint_every >= 0, "≥ 0")):
            if not ok:
                value = self.perceptual if name == "perceptual-weight" else getattr(self, name.replace("-", "_"))
                raise PPFlowerError(f"--{name} must be {allowed}, got {value!r}.")


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
                 name: str = "target", log=print, target_id: str | None = None, force: bool = False,
                 observer: tuple[nn.Module, str] | None = None) -> dict:
    """Train the inverse network on (target(x), x), keep the best on validation, evaluate on test.

    Results are cached in ``out_dir`` under what produced them: ``target_id`` (e.g. the hash of h_θ's
    checkpoint), the attack settings and the data sizes. A rerun with the same key reuses them; another key
    is refused unless ``force``, which starts afresh — old numbers are never reported for a new target.
    ``observer`` = (classifier trained on plain images, its id) adds the recognisability of protected images
    and estimates (:func:`evaluate_attack`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from pp_flower.models import check_image_size, check_trainable
    from pp_flower.training import data_key

    size = tuple(splits.train.images.shape[-2:])
    check_image_size(size, cfg.unet_depth, "The images (for the attacker's U-Net, --unet-depth)")
    check_trainable("unet", size, cfg.batch_size, len(splits.train), "the ITN-Attack's inverse network",
                    cfg.unet_depth)
    if len(splits.val) < 1 or len(splits.test) < 1:
        raise PPFlowerError("The attack needs validation and test images: --limit-eval must be ≥ 1 (or 0 for all).")
    # what defines the result: the target, the settings (checkpoint_every aside) and the images (their pixels)
    key = {"target": target_id or name, "attack": asdict(cfg), **data_key(splits),
           **({"observer": observer[1]} if observer else {})}
    if (cached := _cached(out, key, force, log)) is not None:
        return cached
    torch.manual_seed(derive_seed(cfg.seed, "attack-init"))
    in_channels = target(to_float(splits.train.images[:1]).to(device)).shape[1]  # e.g. 6 for Tanaka's encryption
    estimator = UNet(cfg.unet_base, cfg.unet_depth, in_channels=in_channels, arch=cfg.unet_arch).to(device)
    opt = cfg.optimizer(estimator)
    phi = None
    if cfg.perceptual > 0:
        from pp_flower.features import load_feature_net

        phi = load_feature_net(None, device=device)
    train = splits.train.images

    def step(idx: torch.Tensor, g: torch.Generator) -> dict[str, float]:
        x = _flip(to_float(train[idx]), g).to(device)
        estimate = estimator(target(x))
        loss = F.mse_loss(estimate, x)
        if phi is not None:
            with torch.no_grad():
                fx = phi(x)
            loss = loss + cfg.perceptual * F.mse_loss(phi(estimate), fx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"train-loss": loss.item()}

    def save_best(epoch: int, val: dict) -> None:
        save_atomic({"kind": "inverse_net", "base": cfg.unet_base, "depth": cfg.unet_depth, "unet-arch": cfg.unet_arch, "in_channels": in_channels,
                     "state_dict": estimator.state_dict(), "target": name, "epoch": epoch}, out / "best.pt")

    job = Job(kind="attack_state", config=key, modules={"state_dict": estimator},
              optimizers={"optimizer": opt}, step=step,
              validate=lambda: {"val-loss": _val_loss(estimator, target, splits.val.images, device)},
              save_best=save_best, n_train=len(train), epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
              lr=cfg.lr_at, checkpoint_every=cfg.checkpoint_every,
              desc=f"ITN on {name}")
    progress = fit(job, out, log=log)

    estimator.load_state_dict(load_inverse_net(out / "best.pt").state_dict())
    result = evaluate_attack(estimator, target, splits.test.images, device,
                             observer=observer[0] if observer else None, labels=splits.test.labels)
    result.update({"target": name, "cache-key": key, "config": asdict(cfg), "history": progress["history"],
                   "best-epoch": progress["best-epoch"], "n-train": len(train), "n-val": len(splits.val),
                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    (out / "attack.json").write_text(json.dumps(result, indent=2))
    save_attack_grid(estimator, target, splits.test.images[:8], out / "fig6.png", name, device)
    protected = (f"{result['psnr-protected']['median']:.2f} dB" if "psnr-protected" in result
                 else f"n/a ({in_channels} channels)")  # a 6-channel encryption has no PSNR to an RGB image
    log(f"ITN on {name}: median PSNR estimate {result['psnr-estimated']['median']:.2f} dB, protected {protected}; "
        f"median SSIM estimate {result['ssim-estimated']['median']:.3f} (SSIM ∈ [−1, 1]: 1 = same structure, "
        "0 = none, < 0 = inverted, e.g. a negative-like image)")
    return result


def target_fingerprint(path: str | Path) -> str:
    """What identifies an attack target checkpoint: the SHA-256 of its bytes (a retrained h_θ differs)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _cached(out: Path, key: dict, force: bool, log) -> dict | None:
    """The finished result for ``key`` in ``out``, None to (re)compute; results for another key need ``force``."""
    from pp_flower.checkpoints import describe_changes, key_changes

    done, last = out / "attack.json", out / "last.pt"
    found = (json.loads(done.read_text()).get("cache-key") or {}) if done.exists() else None
    if found is None and last.exists():
        found = load_checkpoint(last, "attack_state")["config"]
    # checkpoint_every changes no result; a result from before data fingerprints is reused if all else matches
    changed = key_changes(found, key)[0] if found is not None else []
    if done.exists() and not changed and not force:
        log(f"{done} is up to date (same target, settings and data); reusing it")
        return json.loads(done.read_text())
    if changed and not force:
        raise PPFlowerError(f"{out} holds an attack on another target, with other settings or on other data "
                            f"(differs in: {describe_changes(found, key, changed)}); rerun with --force to recompute "
                            "it, or use another --out.")
    if force:
        for f in (done, last, out / "best.pt", out / "fig6.png"):
            f.unlink(missing_ok=True)
    return None


@torch.no_grad()
def evaluate_attack(estimator: nn.Module, target: Target, images: torch.Tensor, device: str = "cpu",
                    chunk: int = 500, observer: nn.Module | None = None, labels: torch.Tensor | None = None) -> dict:
    """Per-image PSNR and SSIM of estimated vs plain and of protected vs plain images, plus quartiles.

    With an ``observer`` (an independent classifier trained on plain images) and the ``labels``, also the
    recognisability: the observer's accuracy on the protected images and on the estimates. PSNR alone does not
    say whether an image shows its content (a 5 dB image can still show its digit); chance is 1/classes, plain
    images give the observer's own accuracy.
    """
    estimator.eval()
    values: dict[str, list[torch.Tensor]] = {"psnr-estimated": [], "psnr-protected": [], "ssim-estimated": [],
                                             "ssim-protected": []}
    hits: dict[str, list[torch.Tensor]] = {"recognisability-estimated": [], "recognisability-protected": []}
    if observer is not None:
        observer = observer.to(device).eval()
    for idx in torch.split(torch.arange(len(images)), chunk):
        x = to_float(images[idx]).to(device)
        protected = target(x).clamp(0, 1)
        estimate = estimator(protected)
        values["psnr-estimated"].append(psnr(estimate, x).cpu())
        values["ssim-estimated"].append(ssim(estimate, x).cpu())
        if observer is not None:
            y = labels[idx].to(device)
            hits["recognisability-estimated"].append((observer(estimate).argmax(1) == y).cpu())
        if protected.shape == x.shape:  # a 6-channel encryption has no PSNR to the RGB image
            values["psnr-protected"].append(psnr(protected, x).cpu())
            values["ssim-protected"].append(ssim(protected, x).cpu())
            if observer is not None:
                hits["recognisability-protected"].append((observer(protected).argmax(1) == y).cpu())
    per_image = {k: torch.cat(v) for k, v in values.items() if v}
    result = {**{k: summary(v) for k, v in per_image.items()},
              **{k: torch.cat(v).double().mean().item() for k, v in hits.items() if v}}
    return {**result, "per-image": {k: v.tolist() for k, v in per_image.items()}}


def load_inverse_net(path: str | Path) -> nn.Module:
    """The attacker's selected inverse network (``best.pt`` of :func:`train_attack`), in eval mode."""
    blob = load_checkpoint(path, "inverse_net")
    estimator = UNet(blob["base"], blob["depth"], in_channels=blob["in_channels"], arch=blob.get("unet-arch", "ours"))
    estimator.load_state_dict(blob["state_dict"])
    return estimator.eval()


@torch.no_grad()
def attack_columns(estimator: nn.Module, target: Target, x: torch.Tensor, name: str
                   ) -> tuple[list[torch.Tensor], list[str], list[list[str]]]:
    """Fig. 6's two columns for one target: protected images and the ITN estimates, each with its PSNR to x."""
    estimator.eval()
    protected = target(x).clamp(0, 1)
    estimate = estimator(protected)
    rgb = protected.shape[1] == 3  # a 6-channel encryption: its first 3 channels are shown, no PSNR
    prefix = f"{name}: " if name else ""
    return ([protected[:, :3].cpu(), estimate.cpu()],
            [f"{prefix}protected" + ("" if rgb else " (first 3 of 6 channels)"), f"{prefix}ITN estimate"],
            [[f"{v:.1f} dB" for v in psnr(protected, x).tolist()] if rgb else [],
             [f"{v:.1f} dB" for v in psnr(estimate, x).tolist()]])


def save_fig6(x: torch.Tensor, columns: list[tuple[list, list, list]], path: Path, title: str) -> Path:
    """The paper's Fig. 6: plain images, then each target's protected / estimated columns, PSNR under each image."""
    from pp_flower.report import save_pairs_grid

    images, labels, captions = [x.cpu()], ["plain"], [[]]
    for imgs, labs, caps in columns:
        images += imgs
        labels += labs
        captions += caps
    return save_pairs_grid(images, labels, path, captions, title=title)


def save_attack_grid(estimator: nn.Module, target: Target, images: torch.Tensor, path: Path, name: str,
                     device: str = "cpu") -> Path:
    """Fig. 6 for one target (written beside its ``attack.json``)."""
    x = to_float(images).to(device)
    return save_fig6(x, [attack_columns(estimator, target, x, "")], path, f"ITN-Attack on {name}")
