"""Step (1) of the framework: the provider trains ψ on its labelled images (resumable after a kill).

Recipe (the paper's): SGD, momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 × 0.2 at 30/60/80 % of the
epochs, random crop (pad 4) + horizontal flip; the checkpoint with the lowest validation loss is kept.
Every batch is a pure function of (seed, epoch, step), so a run resumed from ``last.pt`` sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pp_flower.checkpoints import classifier_blob, load_checkpoint, save_atomic
from pp_flower.data import ImageSet, Splits, augment, to_float
from pp_flower.losses import lr_at
from pp_flower.errors import PPFlowerError
from pp_flower.models import build_classifier
from pp_flower.progress import track


@dataclass
class ClassifierConfig:
    arch: str = "resnet20"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = True
    baseline: str = ""  # "" (plain images), "tanaka", "pixel", "pixel-per-image" or "gan": ψ on protected images
    key: int = 0        # the baseline's key
    transform: str = ""  # baseline "gan": the GAN generator's transform_net checkpoint
    checkpoint_every: int = 10  # steps between mid-epoch checkpoints (resume points)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return list(torch.split(perm, batch_size))


@torch.no_grad()
def model_input(images: torch.Tensor, ids: torch.Tensor, cfg: "ClassifierConfig",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """What ψ sees for uint8 images: plain, or encrypted with a baseline's key (augmented when ``generator``).

    Tanaka's encryption is applied after augmenting the plain image (the user encrypts its own augmented
    images; crops would break block alignment otherwise); pixel-based encryption is augmented in the
    encrypted domain, as in Sirichotedumrong et al.
    """
    if cfg.baseline in ("", "tanaka"):
        if generator is not None:
            images = augment(images, generator)
        if cfg.baseline == "tanaka":
            from pp_flower.baselines import TanakaEncryption

            return TanakaEncryption(cfg.key).encrypt(images).float().div(15)
        return to_float(images)
    if cfg.baseline in ("pixel", "pixel-per-image"):
        from pp_flower.baselines import PixelEncryption

        encrypted = PixelEncryption(cfg.key, per_image=cfg.baseline == "pixel-per-image").encrypt(images, ids)
        if generator is not None:
            encrypted = augment(encrypted, generator)
        return to_float(encrypted)
    if cfg.baseline == "gan":  # the user transforms its own (augmented) plain images with G
        if generator is not None:
            images = augment(images, generator)
        return _gan_generator(cfg.transform)(to_float(images))
    raise PPFlowerError(f"Unknown baseline '{cfg.baseline}' (expected tanaka, pixel, pixel-per-image or gan).")


_GENERATORS: dict[str, nn.Module] = {}


def _gan_generator(path: str) -> nn.Module:
    """The GAN-based transformation's generator (read-only, cached per process)."""
    if not path:
        raise PPFlowerError("Baseline 'gan' needs the generator's checkpoint (--transform PATH).")
    if path not in _GENERATORS:
        from pp_flower.checkpoints import load_transform_net

        _GENERATORS[path] = load_transform_net(path)[0].requires_grad_(False).eval()
    return _GENERATORS[path]


def build_model(cfg: "ClassifierConfig", num_classes: int) -> nn.Module:
    """ψ, preceded by Tanaka's adaptation network when ψ works on Tanaka-encrypted images."""
    model = build_classifier(cfg.arch, num_classes)
    if cfg.baseline == "tanaka":
        from pp_flower.baselines.tanaka import AdaptationNetwork

        model = nn.Sequential(AdaptationNetwork(), model)
    return model


def evaluate(model: nn.Module, data: ImageSet, device: str, batch_size: int = 500, desc: str = "Evaluating",
             cfg: "ClassifierConfig | None" = None, ids: torch.Tensor | None = None) -> dict:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (encrypted first when ``cfg`` names a baseline)."""
    model.eval()
    loss, correct = 0.0, 0
    chunks = list(torch.split(torch.arange(len(data)), batch_size))
    ids = torch.arange(len(data)) if ids is None else ids
    for idx in track(chunks, desc):
        images = data.images[idx]
        x = (model_input(images, ids[idx], cfg) if cfg and cfg.baseline else to_float(images)).to(device)
        y = data.labels[idx].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return {"loss": loss / max(len(data), 1), "accuracy": correct / max(len(data), 1)}


def train_classifier(splits: Splits, out_dir: str | Path, cfg: ClassifierConfig, device: str = "cpu",
                     log=print) -> dict:
    """Train ψ, writing ``last.pt`` (resume point), ``best.pt`` (lowest val loss) and ``metrics.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_classes = len(splits.train.classes)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "step": 0, "history": [], "best_val_loss": float("inf"), "train_loss_sum": 0.0,
             "train_seen": 0}
    last = out / "last.pt"
    if last.exists():
        blob = load_checkpoint(last, "classifier")
        if blob["arch"] != cfg.arch or blob["config"] != asdict(cfg):
            raise PPFlowerError(
                f"{last} was written with a different configuration ({blob['config']}); "
                "use another --out directory or delete it to start afresh."
            )
        model.load_state_dict(blob["state_dict"])
        opt.load_state_dict(blob["optimizer"])
        state = blob["progress"]
        log(f"Resuming from {last}: epoch {state['epoch'] + 1}, step {state['step']}")

    def checkpoint() -> None:
        save_atomic(classifier_blob(model, cfg.arch, num_classes, baseline=cfg.baseline, key=cfg.key,
                                    optimizer=opt.state_dict(), progress=state,
                                    config=asdict(cfg), classes=list(splits.train.classes)), last)

    started = time.time()
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg.epochs, cfg.lr)
        batches = epoch_batches(len(splits.train), cfg.batch_size, cfg.seed, epoch)
        model.train()
        steps = range(state["step"], len(batches))
        for step in track(steps, f"ψ epoch {epoch + 1}/{cfg.epochs}", total=len(steps)):
            idx = batches[step]
            generator = torch.Generator().manual_seed(hash((cfg.seed, epoch, step)) & 0xFFFFFFFF)
            x = model_input(splits.train.images[idx], splits.train_ids[idx], cfg, generator if cfg.augment else None)
            x, y = x.to(device), splits.train.labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["train_loss_sum"] += loss.item() * len(idx)
            state["train_seen"] += len(idx)
            state["step"] = step + 1
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                checkpoint()
        val = evaluate(model, splits.val, device, desc="validation", cfg=cfg, ids=splits.val_ids)
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                  "train_loss": state["train_loss_sum"] / max(state["train_seen"], 1),
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        state["history"].append(record)
        log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}  val loss {val['loss']:.4f}  "
            f"val acc {val['accuracy']:.4f}")
        if val["loss"] < state["best_val_loss"]:
            state["best_val_loss"] = val["loss"]
            save_atomic(classifier_blob(model, cfg.arch, num_classes, baseline=cfg.baseline, key=cfg.key,
                                        epoch=epoch + 1, val=val,
                                        classes=list(splits.train.classes)), out / "best.pt")
        state.update(epoch=epoch + 1, step=0, train_loss_sum=0.0, train_seen=0)
        checkpoint()

    best, _ = _load_best(out / "best.pt", device)
    test = evaluate(best, splits.test, device, desc="test", cfg=cfg, ids=splits.test_ids + len(splits.train_all))
    metrics = {"arch": cfg.arch, "baseline": cfg.baseline or "none", "key": cfg.key, "config": asdict(cfg), "test_accuracy": test["accuracy"], "test_loss": test["loss"],
               "best_val_loss": state["best_val_loss"], "history": state["history"],
               "n_train": len(splits.train), "n_val": len(splits.val), "n_test": len(splits.test),
               "wall_seconds_this_session": time.time() - started, "checkpoint": str(out / "best.pt")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"test accuracy {test['accuracy']:.4f} (best.pt, {len(splits.test)} images) → {out / 'metrics.json'}")
    return metrics


def _load_best(path: Path, device: str):
    from pp_flower.checkpoints import load_classifier

    model, blob = load_classifier(path)
    return model.to(device), blob
